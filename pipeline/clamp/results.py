"""Clamping results as Parquet (`<out>/clamp/model=<name>/<run>.parquet`) and their printed summary.

One row per (neuron, value, prompt) in probability mode, per (neuron, value, sample) in generation
mode; the columns of the other mode are null. Rows join to `neurons` on (model, layer, neuron). The
run id is a digest of everything that decides the numbers, so rerunning an experiment replaces its
file rather than adding a twin; `atlas.*` key-value metadata records the model's provenance and config.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa

from pipeline.atlas.schema import atomic_parquet

CLAMP = pa.schema([
    ("run", pa.string()), ("mode", pa.string()), ("model", pa.string()), ("layer", pa.int32()),
    ("neuron", pa.int32()), ("site", pa.string()), ("value", pa.float64()), ("positions", pa.string()),
    ("prompt", pa.string()), ("sample", pa.int32()), ("seed", pa.int64()), ("target", pa.string()),
    ("p_target", pa.float64()), ("p_target_unclamped", pa.float64()), ("log_odds_change", pa.float64()),
    ("kl", pa.float64()), ("top1", pa.string()), ("top1_unclamped", pa.string()),
    ("text", pa.string()), ("text_unclamped", pa.string()), ("mentions", pa.bool_()),
    ("mentions_unclamped", pa.bool_()),
])


def run_id(mode: str, settings: dict) -> str:
    """`<mode>-<12 hex digits>`, stable for the same settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return f"{mode}-{digest[:12]}"


def results_path(out: Path, model: str, run: str) -> Path:
    return out / "clamp" / f"model={model}" / f"{run}.parquet"


def write_results(rows: list[dict], path: Path, run: str, metadata: dict) -> pa.Table:
    """Write the rows atomically with their metadata; return them as the table written."""
    table = pa.Table.from_pylist([{**row, "run": run} for row in rows], schema=CLAMP)
    with atomic_parquet(path, CLAMP, metadata) as writer:
        writer.write_table(table)
    return table


def summary(table: pa.Table) -> pa.Table:
    """One row per (neuron, value), in the order measured: means over prompts, or shares of samples."""
    groups: dict[tuple, list[dict]] = {}
    for row in table.to_pylist():
        groups.setdefault((row["layer"], row["neuron"], row["site"], row["value"]), []).append(row)
    out = []
    for (layer, neuron, site, value), rows in groups.items():
        head = {"neuron": f"{layer}:{neuron}", "site": site, "value": value, "n": len(rows)}
        if rows[0]["mode"] == "probability":
            out.append({**head, "p_target": _mean(rows, "p_target"), "p_unclamped": _mean(rows, "p_target_unclamped"),
                        "log_odds_change": _mean(rows, "log_odds_change"), "kl": _mean(rows, "kl"),
                        "top1": _most_common(rows, "top1")})
        else:
            out.append({**head, "mentions": _mean(rows, "mentions"),
                        "mentions_unclamped": _mean(rows, "mentions_unclamped"), "example": _short(rows[0]["text"])})
    return pa.Table.from_pylist(out)


def _mean(rows: list[dict], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def _short(text: str, width: int = 60) -> str:
    """A text on one line, cut to `width` characters for the summary table."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _most_common(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return max(dict.fromkeys(values), key=values.count)
