-- views.sql — the atlas as three views, over the Parquet files of one outputs folder.
--
-- Answers: nothing by itself; every other file in sql/ starts from these views.
-- Variables: atlas_root — the outputs folder (`atlas query` sets it from --out; by hand:
--            SET VARIABLE atlas_root = 'outputs';).
--
--   atlas   one row per (model, matrix, layer, neuron, side, rank): token_id, token, logit, z
--   neurons one row per (model, matrix, layer, neuron): norm, logit_mean, logit_std, max_z, min_z,
--           top1_token_id, top1_token, bottom1_token_id, bottom1_token
--   tokens  one row per (model, token_id): token (readable), piece (as stored), raw bytes,
--           is_special, is_word
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
       top1_token_id, top1_token, bottom1_token_id, bottom1_token
FROM read_parquet(getvariable('atlas_root') || '/neurons/*/*/*.parquet', hive_partitioning = true);

CREATE OR REPLACE VIEW tokens AS
SELECT model, token_id, token, piece, raw, is_special, is_word
FROM read_parquet(getvariable('atlas_root') || '/tokens/*/*.parquet', hive_partitioning = true);

-- concept_word(token): the word a token stands for, as a person would type it: lower case, without
-- the leading space (any Unicode space), SentencePiece '▁' / byte-level 'Ġ' markers and punctuation
-- at either end (' Dog' → 'dog', '▁water.' → 'water'; '.' → '', which matches nothing).
CREATE OR REPLACE MACRO concept_word(token) AS
    lower(regexp_replace(token, '^[\s\p{Z}▁Ġ[:punct:]]+|[\s\p{Z}▁Ġ[:punct:]]+$', '', 'g'));

-- same_word(a, b): two concept words name the same thing: equal, or one is the simple English plural
-- of the other (+s, +es, y → ies; stems of 3 letters or more, so 'as' is not the plural of 'a').
-- Whole words only: 'dogma' and 'hotdog' are not 'dog'.
CREATE OR REPLACE MACRO same_word(a, b) AS a <> '' AND (
    a = b
    OR (length(a) >= 3 AND b IN (a || 's', a || 'es', regexp_replace(a, 'y$', 'ies')))
    OR (length(b) >= 3 AND a IN (b || 's', b || 'es', regexp_replace(b, 'y$', 'ies'))));

-- word_key(word): equal for any two words same_word accepts (a plural keeps the first 2 letters of its
-- 3+ letter stem), so a join can hash on it before testing same_word.
CREATE OR REPLACE MACRO word_key(word) AS left(word, 2);

-- concept_atlas(concept): the atlas rows whose token is the concept word (any model, matrix, side).
CREATE OR REPLACE MACRO concept_atlas(concept) AS TABLE
SELECT atlas.* FROM atlas
SEMI JOIN (SELECT model, token_id FROM tokens WHERE same_word(concept_word(token), concept_word(concept))) AS hit
    USING (model, token_id);
