-- layer_summary.sql — one line per (model, matrix, layer): how specialised and how varied its neurons are.
--
-- Answers: where in the network do sharp, token-specific neurons live, and does one token dominate?
-- Columns: neurons; mean_max_z and median_max_z (max z-score of each neuron's logits: its top token's
-- distance above the rest, in standard deviations); distinct_top1_share (distinct top-1 tokens /
-- neurons: 1 when every neuron has its own top-1); most_common_top1 and how many neurons it tops
-- (ties: the lowest token id).
-- Variables (`atlas query` --var NAME=VALUE, or SET VARIABLE by hand; values are strings):
--   model   optional  model slug          (default: every model in the outputs)
--   matrix  optional  up | gate | down    (default: all three)
--
-- Example:
--   atlas query layer_summary --var matrix=up
WITH picked AS (
    SELECT * FROM neurons
    WHERE model = coalesce(getvariable('model'), model) AND matrix = coalesce(getvariable('matrix'), matrix)
), common AS (
    SELECT model, matrix, layer, top1_token AS most_common_top1, count(*) AS most_common_top1_neurons
    FROM picked
    GROUP BY model, matrix, layer, top1_token_id, top1_token
    QUALIFY row_number() OVER (PARTITION BY model, matrix, layer ORDER BY count(*) DESC, top1_token_id) = 1
)
SELECT model, matrix, layer, count(*) AS neurons, avg(max_z) AS mean_max_z, median(max_z) AS median_max_z,
       count(DISTINCT top1_token_id) / count(*) AS distinct_top1_share,
       any_value(most_common_top1) AS most_common_top1,
       any_value(most_common_top1_neurons) AS most_common_top1_neurons
FROM picked JOIN common USING (model, matrix, layer)
GROUP BY model, matrix, layer
ORDER BY model, matrix, layer;
