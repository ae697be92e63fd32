-- glitch_tokens.sql — tokens that are the top-1 of an unusual number of neurons.
--
-- Answers: which tokens top many neurons for a reason shared by all of them (a bias direction, an
-- under-trained embedding row) rather than because each neuron means them? methods/atlas.md found
-- " strugg" topping 301 of SmolLM2's 46,080 up-neurons; building with --center or ranking by z is
-- the remedy.
-- One row per (model, matrix, token): neurons it tops, in how many layers, and their share of the
-- matrix's neurons. Most neurons first.
-- Variables (`atlas query` --var NAME=VALUE, or SET VARIABLE by hand; values are strings):
--   min_neurons  optional  only tokens topping at least this many neurons  (default: 20)
--   model        optional  model slug          (default: every model in the outputs)
--   matrix       optional  up | gate | down    (default: all three)
--
-- Example:
--   atlas query glitch_tokens --var matrix=up --var min_neurons=100
WITH counted AS (
    SELECT model, matrix, top1_token_id AS token_id, any_value(top1_token) AS token, count(*) AS neurons,
           count(DISTINCT layer) AS layers, count(*) / sum(count(*)) OVER (PARTITION BY model, matrix) AS share
    FROM neurons
    WHERE model = coalesce(getvariable('model'), model) AND matrix = coalesce(getvariable('matrix'), matrix)
    GROUP BY model, matrix, top1_token_id
)
SELECT * FROM counted
WHERE neurons >= coalesce(getvariable('min_neurons')::INT, 20)
ORDER BY neurons DESC, model, matrix, token_id;
