-- attributed_neurons.sql — neurons that name a concept, ranked by how much they carry on attributed prompts.
--
-- Answers: which neurons with a "water" top token carry the most attribution on these prompts?
-- Reads the neuron scores `atlas attribute` wrote to OUT/attributions/neurons/ (one row per prompt,
-- layer and neuron) and the atlas. A neuron qualifies when one of its top tokens, in any matrix
-- (up/gate: what it reads; down: what it writes), is the concept word (matched as in find_concept.sql).
-- One row per (model, task, method, neuron): its mean score over the prompts (positive: it pushes the
-- target), its rank by mean score among all the model's neurons for that task and method, its mean
-- activation, and the matching matrices and token. Highest mean score first.
-- Variables (`atlas query` --var NAME=VALUE, or SET VARIABLE by hand; values are strings):
--   concept     required  the word, e.g. water
--   atlas_root  required  the outputs folder (`atlas query` sets it from --out)
--   model       optional  model slug                       (default: every model with attributions)
--   task        optional  prompt set, e.g. capital          (default: every task)
--   method      optional  gim | attnlrp | ig | grad_x_act   (default: every method)
--   matrix      optional  up | gate | down                  (default: all three)
--
-- Example:
--   atlas query attributed_neurons --var concept=water --var task=capital --var method=gim
WITH scores AS (
    SELECT model, task, method, layer, neuron, avg(score) AS mean_score, avg(activation) AS mean_activation,
           count(*) AS prompts
    FROM read_parquet(getvariable('atlas_root') || '/attributions/neurons/*/*/*.parquet', hive_partitioning = true)
    WHERE model = coalesce(getvariable('model'), model)
      AND task = coalesce(getvariable('task'), task)
      AND method = coalesce(getvariable('method'), method)
    GROUP BY model, task, method, layer, neuron
), ranked AS (
    SELECT *, rank() OVER (PARTITION BY model, task, method ORDER BY mean_score DESC) AS attribution_rank,
           count(*) OVER (PARTITION BY model, task, method) AS of_neurons
    FROM scores
), hit AS (
    SELECT model, layer, neuron, list(DISTINCT matrix ORDER BY matrix) AS matrices,
           arg_max(token, z) AS token, max(z) AS z
    FROM concept_atlas(getvariable('concept'))
    WHERE side = 'top' AND matrix = coalesce(getvariable('matrix'), matrix)
    GROUP BY model, layer, neuron
)
SELECT r.model, r.task, r.method, r.layer, r.neuron, h.matrices, h.token, h.z, r.mean_score,
       r.attribution_rank, r.of_neurons, r.mean_activation, r.prompts
FROM ranked AS r JOIN hit AS h USING (model, layer, neuron)
ORDER BY r.mean_score DESC, r.model, r.task, r.method, r.layer, r.neuron;
