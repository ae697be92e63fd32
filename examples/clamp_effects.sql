-- clamp_effects.sql — what clamping did, next to what the atlas says each clamped neuron writes.
--
-- Answers: for every clamping run under the outputs folder (`atlas clamp`), per neuron and value,
-- the mean next-token probability of the target (probability mode) or the share of answers that
-- mention it (generation mode), joined to the neuron's top down token in the atlas.
-- Variables: none besides atlas_root (set by `atlas query` from --out).
--
-- Example:
--   atlas query examples/clamp_effects.sql
SELECT c.model, c.run, c.layer, c.neuron, c.site, c.positions, c.mode, c.target, c.value, count(*) AS n,
       avg(c.p_target) AS p_target, avg(c.p_target_unclamped) AS p_unclamped,
       avg(c.mentions::INT) AS mentions, avg(c.mentions_unclamped::INT) AS mentions_unclamped,
       any_value(n.top1_token) AS down_top1, any_value(n.bottom1_token) AS down_bottom1
FROM read_parquet(getvariable('atlas_root') || '/clamp/*/*.parquet', hive_partitioning = true) AS c
JOIN neurons AS n ON n.model = c.model AND n.layer = c.layer AND n.neuron = c.neuron AND n.matrix = 'down'
GROUP BY ALL
ORDER BY c.model, c.run, c.layer, c.neuron, c.site, c.positions, c.target, c.value;
