-- compare_models.sql — how much two atlases of the same shapes agree, e.g. a base model and its
-- instruct fine-tune (fine-tuning keeps neuron indices, so neuron i is compared with neuron i).
--
-- Answers: what share of neurons keep their top-1 token, overall, per matrix and per layer; how much
-- their top-k token sets overlap (Jaccard); and which neurons changed most.
-- One long result; `level` says what a row describes:
--   overall  all neurons of both models             (matrix, layer, neuron empty)
--   matrix   one matrix                             (layer, neuron empty)
--   layer    one (matrix, layer)                    (neuron empty)
--   neuron   one of the most changed neurons: lowest Jaccard first, the more specialised (higher
--            max_z in base) first among ties; base_top1 / other_top1 name its two top-1 tokens;
--            a neuron whose top-1 token and top-k set are both unchanged is never listed
-- Columns: neurons (compared), same_top1 (how many keep their top-1 token), top1_agreement
-- (same_top1 / neurons), mean_jaccard (mean over the neurons of |A ∩ B| / |A ∪ B| of top-k sets).
-- Tokens are compared by token_id, so both models must share a tokenizer. Only neurons present in
-- both atlases are compared (`atlas query` refuses a model name with no atlas in the outputs).
-- Variables (`atlas query` --var NAME=VALUE, or SET VARIABLE by hand; values are strings):
--   base     required  model slug of the reference atlas
--   other    required  model slug of the atlas compared with it
--   k        optional  top-k size for Jaccard     (default: every stored rank)
--   changed  optional  how many neuron rows       (default: 20)
--
-- Example:
--   atlas query compare_models --var base=smollm2-135m --var other=smollm2-135m-instruct
WITH pair AS (
    SELECT matrix, layer, neuron, b.top1_token_id = o.top1_token_id AS same,
           b.top1_token AS base_top1, o.top1_token AS other_top1, b.max_z AS base_max_z,
           b.top_token_ids[1:coalesce(getvariable('k')::INT, len(b.top_token_ids))] AS base_ids,
           o.top_token_ids[1:coalesce(getvariable('k')::INT, len(o.top_token_ids))] AS other_ids
    FROM neurons AS b JOIN neurons AS o USING (matrix, layer, neuron)
    WHERE b.model = getvariable('base') AND o.model = getvariable('other')
), compared AS (
    -- a neuron's top-k ids are distinct, so |A ∪ B| = |A| + |B| − |A ∩ B|; list_filter with a lambda
    -- is 20× faster here than list_intersect
    SELECT * EXCLUDE (overlap), overlap / (len(base_ids) + len(other_ids) - overlap) AS jaccard
    FROM (SELECT *, len(list_filter(base_ids, lambda t: list_contains(other_ids, t))) AS overlap FROM pair)
)
SELECT CASE WHEN grouping(matrix) = 1 THEN 'overall' WHEN grouping(layer) = 1 THEN 'matrix' ELSE 'layer' END
           AS level,
       matrix, layer, NULL::INT AS neuron, count(*) AS neurons, count(*) FILTER (same) AS same_top1,
       count(*) FILTER (same) / count(*) AS top1_agreement, avg(jaccard) AS mean_jaccard
FROM compared
GROUP BY GROUPING SETS ((), (matrix), (matrix, layer))
UNION ALL BY NAME
(SELECT 'neuron' AS level, matrix, layer, neuron, 1 AS neurons, same::INT AS same_top1,
        same::INT AS top1_agreement, jaccard AS mean_jaccard, base_top1, other_top1
 FROM compared
 WHERE NOT same OR jaccard < 1
 ORDER BY jaccard, base_max_z DESC
 LIMIT coalesce(getvariable('changed')::INT, 20))
ORDER BY list_position(['overall', 'matrix', 'layer', 'neuron'], level),
         CASE WHEN level = 'neuron' THEN mean_jaccard END, matrix, layer, neuron;
