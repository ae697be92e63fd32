-- top_tokens.sql — the tokens one neuron reads or writes most (or least), strongest first.
--
-- Answers: what does neuron N of layer L stand for, in every matrix and model that has it?
-- Variables (`atlas query` --var NAME=VALUE, or SET VARIABLE by hand; values are strings):
--   layer   required  layer index
--   neuron  required  neuron index within the layer
--   model   optional  model slug                       (default: every model in the outputs)
--   matrix  optional  up | gate | down                 (default: all three, reading beside writing)
--   side    optional  top | bottom                     (default: top)
--
-- Example:
--   atlas query top_tokens --var layer=5 --var neuron=17 --var matrix=down
SELECT model, matrix, layer, neuron, side, rank, token_id, token, logit, z
FROM atlas
WHERE layer = getvariable('layer')::INT
  AND neuron = getvariable('neuron')::INT
  AND model = coalesce(getvariable('model'), model)
  AND matrix = coalesce(getvariable('matrix'), matrix)
  AND side = coalesce(getvariable('side'), 'top')
ORDER BY model, matrix, rank;
