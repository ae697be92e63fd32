-- find_concept.sql — neurons whose top (or bottom) tokens are a concept word, most specialised first.
--
-- Answers: which neurons read or write "dog"? A token matches as a person means it: case and the
-- leading space or '▁'/'Ġ' marker do not matter, nor does a simple English plural (' dog', 'Dog',
-- ' dogs', 'DOGS' all match dog), but other words containing it do not ('dogma', 'hotdog').
-- The rules are the macros concept_word and same_word in words.sql.
-- One row per neuron: its best matching token (rank, z), every matching token, and the neuron's own
-- top-1 token and max_z. Ranked by |z| of the best match (z is negative on the bottom side).
-- Variables (`atlas query` --var NAME=VALUE, or SET VARIABLE by hand; values are strings):
--   concept   required  the word, e.g. dog
--   model     optional  model slug                        (default: every model in the outputs)
--   matrix    optional  up | gate | down                  (default: all three)
--   side      optional  top | bottom                      (default: top)
--   max_rank  optional  only matches at this rank or better (default: every stored rank, i.e. k)
--
-- Example:
--   atlas query find_concept --var concept=water --var matrix=down
SELECT model, matrix, layer, neuron, side,
       arg_max(rank, abs(z)) AS rank, arg_max(token, abs(z)) AS token, arg_max(z, abs(z)) AS z,
       list(token ORDER BY rank) AS matches, any_value(n.top1_token) AS top1_token,
       any_value(n.max_z) AS max_z
FROM concept_atlas(getvariable('concept'))
JOIN neurons AS n USING (model, matrix, layer, neuron)
WHERE model = coalesce(getvariable('model'), model)
  AND matrix = coalesce(getvariable('matrix'), matrix)
  AND side = coalesce(getvariable('side'), 'top')
  AND rank <= coalesce(getvariable('max_rank')::INT, rank)
GROUP BY model, matrix, layer, neuron, side
ORDER BY max(abs(z)) DESC, model, matrix, layer, neuron;
