-- clamp_candidates.sql — which neurons to clamp, and with which sign, to push a concept.
--
-- Answers: to make the model say more "water", which (layer, neuron) should the clamping command
-- take (`--neuron L:N[:VALUE]`, the `spec` column), and why?
-- A candidate writes the concept: a down-vector top or bottom token is the concept word (matched as
-- in find_concept.sql). Its sign: +1 when the concept is among its top tokens (a positive activation
-- writes it), -1 when among its bottom tokens (a negative activation writes it). It is coherent when
-- it also reads the concept (an up or gate top token is the word): those come first, as reading
-- alone can work against the concept (methods/atlas.md). Then by score = |z| of its down token.
-- Variables (`atlas query` --var NAME=VALUE, or SET VARIABLE by hand; values are strings):
--   concept   required  the word, e.g. water
--   model     optional  model slug                          (default: every model in the outputs)
--   max_rank  optional  only tokens at this rank or better  (default: every stored rank, i.e. k)
--
-- Example:
--   atlas query clamp_candidates --var concept=water --var model=smollm2-135m-instruct
WITH hit AS (
    SELECT * FROM concept_atlas(getvariable('concept'))
    WHERE model = coalesce(getvariable('model'), model)
      AND rank <= coalesce(getvariable('max_rank')::INT, rank)
), writes AS (
    SELECT model, layer, neuron, side, rank, token, z FROM hit WHERE matrix = 'down'
    QUALIFY row_number() OVER (PARTITION BY model, layer, neuron ORDER BY abs(z) DESC, side DESC) = 1
), reads AS (
    SELECT model, layer, neuron, matrix, rank, token, z FROM hit WHERE matrix IN ('up', 'gate') AND side = 'top'
    QUALIFY row_number() OVER (PARTITION BY model, layer, neuron ORDER BY z DESC, matrix DESC) = 1
)
SELECT w.model, format('{}:{}', w.layer, w.neuron) AS spec, w.layer, w.neuron,
       CASE w.side WHEN 'top' THEN 1 ELSE -1 END AS sign,
       w.side = 'top' AND r.neuron IS NOT NULL AS coherent, abs(w.z) AS score,
       CASE WHEN w.side = 'bottom'
                THEN format('writes "{}" when negative (down bottom {}, z={:.2f})', w.token, w.rank, w.z)
            WHEN r.neuron IS NULL
                THEN format('writes "{}" (down top {}, z={:.2f})', w.token, w.rank, w.z)
            ELSE format('reads "{}" ({} top {}, z={:.2f}) and writes "{}" (down top {}, z={:.2f})',
                        r.token, r.matrix, r.rank, r.z, w.token, w.rank, w.z)
       END AS reason
FROM writes AS w LEFT JOIN reads AS r USING (model, layer, neuron)
ORDER BY coherent DESC, score DESC, w.model, w.layer, w.neuron;
