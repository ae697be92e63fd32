"""Which tokens a person means by a word: the rule of sql/words.sql, so SQL and Python never disagree."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb
import pyarrow as pa

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"  # the repository's sql/ folder


def define_word_macros(con: duckdb.DuckDBPyConnection) -> None:
    """Create the macros concept_word, same_word and word_key on a connection."""
    con.execute((SQL_DIR / "words.sql").read_text())


def matching_token_ids(tokens: Sequence[str], word: str) -> list[int]:
    """Ids of the readable tokens that name `word` (' Dog', 'dogs', '▁dog' for 'dog'), ascending."""
    con = duckdb.connect()
    try:
        define_word_macros(con)
        vocab = pa.table({"token_id": pa.array(range(len(tokens)), pa.int64()), "token": pa.array(tokens, pa.string())})
        con.register("vocab", vocab)
        rows = con.execute("SELECT token_id FROM vocab WHERE same_word(concept_word(token), concept_word($word)) "
                           "ORDER BY token_id", {"word": word}).fetchall()
        return [r[0] for r in rows]
    finally:
        con.close()
