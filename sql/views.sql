-- views.sql — the atlas as three views, over the Parquet files of one outputs folder.
--
-- Answers: nothing by itself; every other file in sql/ starts from these views.
-- Variables: atlas_root — the outputs folder (`atlas query` sets it from --out; by hand:
--            SET VARIABLE atlas_root = 'outputs';).
--
--   atlas   one row per (model, matrix, layer, neuron, side, rank): token_id, token, logit, z
--   neurons one row per (model, matrix, layer, neuron): norm, logit_mean, logit_std, max_z, min_z,
--           top1_token_id, top1_token, bottom1_token_id, bottom1_token, and top_token_ids /
--           bottom_token_ids (the k ids of each side in rank order, as lists)
--   tokens  one row per (model, token_id): token (readable), piece (as stored), raw bytes,
--           is_special, is_word
-- The word macros (concept_word, same_word, word_key) come from words.sql, run before this file.
--
-- Example: top tokens of layer 5 up neuron 17 of the default model
--   SELECT rank, token, logit, z FROM atlas
--   WHERE model = 'smollm2-135m-instruct' AND matrix = 'up' AND layer = 5 AND neuron = 17
--     AND side = 'top' ORDER BY rank;

CREATE OR REPLACE VIEW atlas AS
SELECT model, matrix, layer, neuron, side, rank, token_id, token, logit, z
FROM read_parquet(getvariable('atlas_root') || '/atlas/*/*/*.parquet', hive_partitioning = true);

CREATE OR REPLACE VIEW neurons AS
SELECT model, matrix, layer, neuron, norm, logit_mean, logit_std, max_z, min_z,
       top1_token_id, top1_token, bottom1_token_id, bottom1_token, top_token_ids, bottom_token_ids
FROM read_parquet(getvariable('atlas_root') || '/neurons/*/*/*.parquet', hive_partitioning = true);

CREATE OR REPLACE VIEW tokens AS
SELECT model, token_id, token, piece, raw, is_special, is_word
FROM read_parquet(getvariable('atlas_root') || '/tokens/*/*.parquet', hive_partitioning = true);

-- concept_atlas(concept): the atlas rows whose token is the concept word (any model, matrix, side).
CREATE OR REPLACE MACRO concept_atlas(concept) AS TABLE
SELECT atlas.* FROM atlas
SEMI JOIN (SELECT model, token_id FROM tokens WHERE same_word(concept_word(token), concept_word(concept))) AS hit
    USING (model, token_id);
