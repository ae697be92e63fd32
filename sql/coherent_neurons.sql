-- coherent_neurons.sql — neurons that write what they read: a top token of their up or gate vector
-- (what they read) and a top token of their down vector (what they write) are the same word.
--
-- Answers: which neurons are the natural clamping candidates? (methods/atlas.md: a neuron that only
-- reads " water" can lower P(" water") when clamped high; one that reads and writes it raises it.)
-- Words are compared with the macros concept_word and same_word of words.sql (case, leading space,
-- markers, punctuation and simple plurals do not matter).
-- One row per neuron, its best pair of tokens; score = least(read z, write z), highest first (ties:
-- the pair of better ranks).
-- Variables (`atlas query` --var NAME=VALUE, or SET VARIABLE by hand; values are strings):
--   concept   optional  only pairs on this word, e.g. water  (default: any word)
--   model     optional  model slug                          (default: every model in the outputs)
--   read      optional  up | gate                           (default: either)
--   max_rank  optional  only tokens at this rank or better  (default: every stored rank, i.e. k)
--
-- Example:
--   atlas query coherent_neurons --var concept=water
WITH word AS (
    SELECT model, matrix, layer, neuron, rank, token, z, concept_word(token) AS word
    FROM atlas
    WHERE side = 'top' AND model = coalesce(getvariable('model'), model)
      AND rank <= coalesce(getvariable('max_rank')::INT, rank)
)
SELECT r.model, r.layer, r.neuron, r.word,
       r.matrix AS read_matrix, r.token AS read_token, r.rank AS read_rank, r.z AS read_z,
       w.token AS write_token, w.rank AS write_rank, w.z AS write_z, least(r.z, w.z) AS score
FROM word AS r
JOIN word AS w ON w.model = r.model AND w.layer = r.layer AND w.neuron = r.neuron
               AND word_key(w.word) = word_key(r.word) AND same_word(r.word, w.word)
WHERE r.matrix IN ('up', 'gate') AND w.matrix = 'down'
  AND r.matrix = coalesce(getvariable('read'), r.matrix)
  AND same_word(r.word, concept_word(coalesce(getvariable('concept'), r.word)))
QUALIFY row_number() OVER (PARTITION BY r.model, r.layer, r.neuron
                           ORDER BY score DESC, r.rank + w.rank, read_matrix DESC) = 1
ORDER BY score DESC, r.model, r.layer, r.neuron;
