-- specialised_neurons.sql — the most specialised neurons of every layer, with the tokens they stand for.
--
-- Answers: in each (matrix, layer), which neurons single out a token most sharply (highest max_z:
-- the top token's distance above the neuron's other logits, in standard deviations), and what are
-- their strongest top and bottom tokens?
-- One row per neuron: max_z, min_z, top_tokens and bottom_tokens (strongest first).
-- Variables (`atlas query` --var NAME=VALUE, or SET VARIABLE by hand; values are strings):
--   model      optional  model slug                    (default: every model in the outputs)
--   matrix     optional  up | gate | down              (default: all three)
--   per_layer  optional  neurons per (matrix, layer)   (default: 3)
--   tokens     optional  tokens listed per side        (default: 5)
--
-- Example:
--   atlas query specialised_neurons --var matrix=down --var per_layer=1
WITH best AS (
    SELECT model, matrix, layer, neuron, max_z, min_z
    FROM neurons
    WHERE model = coalesce(getvariable('model'), model) AND matrix = coalesce(getvariable('matrix'), matrix)
    QUALIFY row_number() OVER (PARTITION BY model, matrix, layer ORDER BY max_z DESC, neuron)
            <= coalesce(getvariable('per_layer')::INT, 3)
)
SELECT model, matrix, layer, neuron, any_value(max_z) AS max_z, any_value(min_z) AS min_z,
       list(token ORDER BY rank) FILTER (WHERE side = 'top') AS top_tokens,
       list(token ORDER BY rank) FILTER (WHERE side = 'bottom') AS bottom_tokens
FROM best JOIN atlas USING (model, matrix, layer, neuron)
WHERE rank <= coalesce(getvariable('tokens')::INT, 5)
GROUP BY model, matrix, layer, neuron
ORDER BY model, matrix, layer, max_z DESC, neuron;
