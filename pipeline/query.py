"""Run a file of sql/ over an outputs folder: the views first, then the file, its variables bound by name.

A file reads a variable with `getvariable('name')` and casts it where it needs a number
(`getvariable('layer')::INT`); values always arrive as strings and are never pasted into SQL text.
A variable read as `coalesce(getvariable('name'), default)` at every use is optional; any other use
makes it required. Comments are not scanned for reads, so a header may show them as examples; the header's
`Variables` lines (`--   name  required|optional  description`) do limit values: a description that
starts `a | b | c` allows only those, one that starts `model slug` only a model with an atlas under the
outputs folder. Either mistake would otherwise match no row, silently.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa

from pipeline.errors import AtlasError
from pipeline.words import SQL_DIR, define_word_macros

TABLES = ("atlas", "neurons", "tokens")
_COMMENT = re.compile(r"--[^\n]*")
_READ = re.compile(r"getvariable\(\s*'(\w+)'\s*\)", re.IGNORECASE)
_DEFAULTED = re.compile(r"coalesce\(\s*getvariable\(\s*'(\w+)'\s*\)", re.IGNORECASE)
_DOCUMENTED = re.compile(r"^--\s+(\w+)\s+(?:required|optional)\s+(.*)$", re.MULTILINE)
_CHOICES = re.compile(r"\w+(?:\s*\|\s*\w+)+")


def find_sql(name: str | Path) -> Path:
    """The file as given, else (for a bare name, `.sql` optional) the one in the repository's sql/."""
    path = Path(name)
    candidates = [path]
    if path.parent == Path("."):
        candidates.append(SQL_DIR / (path.name if path.suffix == ".sql" else f"{path.name}.sql"))
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise AtlasError(f"no SQL file {name} (looked for {', '.join(map(str, candidates))})")
    return found


def check_variables(name: str, sql: str, given: dict[str, str]) -> None:
    """Fail before running on a variable the file never reads, or a required one not given."""
    code = _COMMENT.sub("", sql)
    reads = Counter(name for name in _READ.findall(code) if name != "atlas_root")  # always set, from --out
    if unknown := sorted(set(given) - set(reads)):
        known = ", ".join(sorted(reads)) or "none"
        raise AtlasError(f"{name} reads no variable {', '.join(unknown)} (it reads: {known})")
    required = reads - Counter(_DEFAULTED.findall(code))
    if missing := sorted(set(required) - set(given)):
        raise AtlasError(f"{name} needs {' '.join(f'--var {v}=VALUE' for v in missing)}")


def check_values(name: str, sql: str, given: dict[str, str], out: Path) -> None:
    """Fail before running on a value the file's header rules out (see the module's docstring)."""
    for variable, description in _DOCUMENTED.findall(sql):
        if variable not in given:
            continue
        value = given[variable]
        if choices := _CHOICES.match(description):
            allowed = [c.strip() for c in choices.group().split("|")]
            if value not in allowed:
                raise AtlasError(f"{name}: {variable} must be one of {', '.join(allowed)}, not {value!r}")
        elif description.startswith("model slug") and value not in (models := atlas_models(out)):
            raise AtlasError(f"{name}: no atlas of model {value!r} under {out} (it has: {', '.join(models)})")


def atlas_models(out: Path) -> list[str]:
    """The slugs of the models with neuron tables under `out`."""
    return sorted(p.name.removeprefix("model=") for p in (out / "neurons").glob("model=*")
                  if any(p.rglob("*.parquet")))


def check_atlas(out: Path) -> None:
    """An outputs folder without Parquet files for every view would fail inside DuckDB, obscurely."""
    if missing := [t for t in TABLES if not any((out / t).rglob("*.parquet"))]:
        raise AtlasError(f"no atlas under {out}: no Parquet files in {', '.join(f'{t}/' for t in missing)}; "
                         f"build one with `atlas build MODEL --out {out}`")


def connect(out: Path, variables: dict[str, str] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the variables bound, the word macros and the views over `out` defined."""
    check_atlas(out)
    con = duckdb.connect()
    try:
        for name, value in {"atlas_root": str(out), **(variables or {})}.items():
            con.execute(f'SET VARIABLE "{name}" = ?', [value])
        define_word_macros(con)
        con.execute((SQL_DIR / "views.sql").read_text())
    except duckdb.Error as e:
        con.close()
        raise AtlasError(f"the atlas under {out} cannot be read: {str(e).splitlines()[0]}") from None
    return con


def run_sql(out: Path, sql_file: str | Path, variables: dict[str, str], limit: int | None = None) -> pa.Table:
    """The rows of the file's last statement (earlier ones are executed first), at most `limit` of them."""
    path = find_sql(sql_file)
    sql = path.read_text()
    check_variables(path.name, sql, variables)
    con = connect(out, variables)
    try:
        check_values(path.name, sql, variables, out)
        statements = con.extract_statements(sql)
        if not statements:
            raise AtlasError(f"{path.name} holds no SQL statement")
        for statement in statements[:-1]:
            con.execute(statement)
        result = con.sql(statements[-1].query)
        return (result if limit is None else result.limit(limit)).to_arrow_table()
    except duckdb.Error as e:
        raise AtlasError(f"{path.name}: {str(e).splitlines()[0]}") from None
    finally:
        con.close()


def _cell(value: object, table: bool) -> str:
    """NULL as empty, lists as JSON (spaces stay visible); tables get short floats and escaped controls."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if table else repr(value)
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) if table else text


def render(table: pa.Table, fmt: str) -> str:
    """The result as an aligned text table, CSV, or a JSON array of one object per row (one per line)."""
    rows = table.to_pylist()
    if fmt == "json":
        return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False, default=str) for r in rows) + "\n]\n"
    cells = [table.column_names, *([_cell(v, fmt == "table") for v in r.values()] for r in rows)]
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(cells)
        return buffer.getvalue()
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) for t in table.schema.types]
    widths = [max(len(row[i]) for row in cells) for i in range(len(numeric))]
    lines = ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\n({len(rows)} rows)\n"
