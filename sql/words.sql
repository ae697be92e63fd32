-- words.sql — what a person means by a word: the matching rule every concept look-up uses.
--
-- Answers: nothing by itself; views.sql, the concept files in sql/ and the clamping command's
-- --target all match tokens to words with these macros, so there is one rule.
-- Variables: none.
--
-- Example: SELECT same_word(concept_word(' Dogs'), concept_word('dog'));  -- true

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
