"""`atlas compare`: two atlases of the same shapes (a base model and its fine-tune) built or reused, compared.

Fine-tuning keeps neuron indices, so neuron i of one model is compared with neuron i of the other, and
each model is decoded with its own LM head (methods/atlas.md). The numbers are those of
sql/compare_models.sql; this module checks that the pair can be compared, and stores and plots them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from pipeline import __version__
from pipeline.atlas.schema import atomic_parquet, read_kv_metadata, tokens_path, write_atomic
from pipeline.config import AtlasConfig
from pipeline.errors import AtlasError
from pipeline.query import connect, render, run_sql
from pipeline.report.plots import agreement_plot


@dataclass(frozen=True)
class CompareConfig:
    """What `atlas compare` compares, and how much it lists."""

    base: str
    other: str
    out: Path = Path("outputs")
    k: int | None = None  # top-k size for Jaccard; None: the smaller of the two atlases' k
    changed: int = 20  # most changed neurons listed

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise AtlasError(f"k must be at least 1, got {self.k}")
        if self.changed < 0:
            raise AtlasError(f"changed must be 0 or more, got {self.changed}")


@dataclass(frozen=True)
class Comparison:
    """The long result of compare_models.sql and where it was written."""

    base: str
    other: str
    k: int
    table: pa.Table
    parquet: Path
    plot: Path


def ensure_atlas(spec: str, out: Path, progress: bool, log) -> str:
    """The name of SPEC's atlas in OUT, building what is missing with the settings already used there."""
    from pipeline.atlas.job import AtlasJob
    from pipeline.sources import resolve

    try:
        slug = resolve(spec).slug
    except AtlasError:
        if (out / "neurons" / f"model={spec}").is_dir():
            return spec  # a model known only by its name in the outputs (built from elsewhere, or --name)
        raise
    markers = sorted((out / ".state" / "atlas" / slug).glob("*.json"))
    built = json.loads(markers[0].read_text()) if markers else {}
    settings = {key: built[key] for key in ("k", "norm", "center", "dtype") if key in built}
    job = AtlasJob(AtlasConfig(model=spec, out=out, **settings))
    job.run(progress=progress, log=log)
    return job.model


def _shapes(con, model: str) -> dict[str, tuple[int, int]]:
    rows = con.execute("SELECT matrix, count(DISTINCT layer), count(*) FROM neurons WHERE model = ? GROUP BY 1",
                       [model]).fetchall()
    return {matrix: (layers, neurons) for matrix, layers, neurons in rows}


def check_comparable(out: Path, base: str, other: str) -> None:
    """Refuse a pair whose neurons or tokens do not line up: different shapes or tokenizers."""
    con = connect(out)
    try:
        shapes = {m: _shapes(con, m) for m in (base, other)}
        for model, shape in shapes.items():
            if not shape:
                raise AtlasError(f"no atlas of {model} in {out}")
        for matrix in sorted(shapes[base].keys() & shapes[other].keys()):
            (lb, nb), (lo, no) = shapes[base][matrix], shapes[other][matrix]
            if (lb, nb) != (lo, no):
                raise AtlasError(f"cannot compare {base} and {other}: their {matrix} atlases differ in shape "
                                 f"({lb} layers, {nb} neurons vs {lo} layers, {no} neurons)")
        if not shapes[base].keys() & shapes[other].keys():
            raise AtlasError(f"cannot compare {base} and {other}: they share no matrix")
        vocab = dict(con.execute("SELECT model, count(*) FROM tokens WHERE model IN (?, ?) GROUP BY 1",
                                 [base, other]).fetchall())
        if vocab.get(base) != vocab.get(other):
            raise AtlasError(f"cannot compare {base} and {other}: vocabularies of {vocab.get(base)} and "
                             f"{vocab.get(other)} tokens (tokens are compared by id, so the tokenizer must match)")
        differ = con.execute(
            "SELECT count(*) FROM tokens AS b JOIN tokens AS o USING (token_id) WHERE b.model = ? AND o.model = ? "
            "AND b.piece IS DISTINCT FROM o.piece AND NOT (b.is_special AND o.is_special)",
            [base, other]).fetchone()[0]
        if differ:
            raise AtlasError(f"cannot compare {base} and {other}: {differ} tokens differ between their tokenizers")
    finally:
        con.close()


def compare(cfg: CompareConfig, progress: bool = True, log=lambda msg: None) -> Comparison:
    """Build or reuse both atlases, compare them, and write OUT/compare/BASE--vs--OTHER.{parquet,png}."""
    base = ensure_atlas(cfg.base, cfg.out, progress, log)
    other = ensure_atlas(cfg.other, cfg.out, progress, log)
    if base == other:
        raise AtlasError(f"both models are {base}: compare two different models")
    check_comparable(cfg.out, base, other)
    meta = {m: read_kv_metadata(tokens_path(cfg.out, m)) for m in (base, other)}
    stored_k = min(int(meta[m].get("k", 0)) or 10**9 for m in (base, other))
    if cfg.k is not None and cfg.k > stored_k:
        raise AtlasError(f"k={cfg.k} is more than the {stored_k} tokens per neuron the atlases store")
    k = cfg.k or stored_k
    table = run_sql(cfg.out, "compare_models", {"base": base, "other": other, "k": str(k),
                                                "changed": str(cfg.changed)})
    stem = cfg.out / "compare" / f"{base}--vs--{other}"
    provenance = {"table": "compare", "base": base, "other": other, "k": k,
                  "decoded_with": "each model's own LM head", "package_version": __version__,
                  "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  **{f"{role}_{key}": meta[m].get(key, "") for role, m in (("base", base), ("other", other))
                     for key in ("model_id", "source_sha256", "norm", "center", "k")}}
    with atomic_parquet(stem.with_suffix(".parquet"), table.schema, provenance) as writer:
        writer.write_table(table)
    layers = [r for r in table.to_pylist() if r["level"] == "layer"]
    png = agreement_plot(layers, f"{other} vs {base}: agreement per layer (top-{k}, each with its own LM head)")
    write_atomic(stem.with_suffix(".png"), png)
    return Comparison(base, other, k, table, stem.with_suffix(".parquet"), stem.with_suffix(".png"))


def agreement_text(c: Comparison) -> str:
    """The agreement table as a person reads it: a row per layer, a column per matrix, then the changed neurons."""
    rows = c.table.to_pylist()
    matrices = [m for m in ("up", "gate", "down") if any(r["matrix"] == m for r in rows)]
    cell = {(r["matrix"], r["layer"] if r["level"] == "layer" else "all"):
            f"{100 * r['top1_agreement']:5.1f}%  {r['mean_jaccard']:.3f}"
            for r in rows if r["level"] in ("matrix", "layer")}
    layers = ["all", *sorted({r["layer"] for r in rows if r["level"] == "layer"})]
    pivot = pa.table({"layer": [str(layer) for layer in layers],
                      **{f"{m}: top-1 same, Jaccard": [cell.get((m, layer), "") for layer in layers]
                         for m in matrices}})
    (overall,) = [r for r in rows if r["level"] == "overall"]
    changed = pa.Table.from_pylist([{"matrix": r["matrix"], "layer": r["layer"], "neuron": r["neuron"],
                                     "jaccard": r["mean_jaccard"], "base_top1": r["base_top1"],
                                     "other_top1": r["other_top1"]} for r in rows if r["level"] == "neuron"])
    head = (f"{c.other} vs {c.base}: {100 * overall['top1_agreement']:.1f}% of {overall['neurons']} neurons keep "
            f"their top-1 token; mean top-{c.k} Jaccard {overall['mean_jaccard']:.3f} "
            f"(each model decoded with its own LM head)\n")
    text = head + render(pivot, "table")
    if changed.num_rows:
        text += "\nMost changed neurons (lowest top-k Jaccard first):\n" + render(changed, "table")
    return text
