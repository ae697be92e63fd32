"""`atlas report`: one model's atlas as a static HTML page a person can read, built from the sql/ files.

Sections: overview (provenance), layers (z-score distribution, glitch tokens, per-layer summary),
agreement with another model (with --compare), the most specialised neurons of every layer with
their top and bottom tokens, and concept look-ups (with --concept). Every number comes from a file in
sql/, so what the page shows a user can re-run with `atlas query`.
"""
from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path

import pyarrow.compute as pc

from pipeline.atlas.schema import read_kv_metadata, tokens_path, write_atomic
from pipeline.errors import AtlasError
from pipeline.query import connect, run_sql
from pipeline.report import page
from pipeline.report.compare import CompareConfig, Comparison, agreement_text, compare, ensure_atlas
from pipeline.report.plots import glitch_plot, zscore_plot
from pipeline.sources import slugify

TOKEN_COLUMNS = ("token", "top1_token", "bottom1_token", "most_common_top1", "top_tokens", "bottom_tokens",
                 "matches", "read_token", "write_token", "base_top1", "other_top1")
OVERVIEW_KEYS = ("model_id", "source_path", "source_sha256", "source_format", "architecture", "n_layers",
                 "n_neurons", "d_model", "vocab_size", "tied_head", "norm", "center", "k", "dtype",
                 "package_version", "created_at")


@dataclass(frozen=True)
class ReportConfig:
    """What `atlas report` puts on the page."""

    model: str
    out: Path = Path("outputs")
    compare: str | None = None
    concepts: tuple[str, ...] = ()
    per_layer: int = 3  # most specialised neurons shown per (matrix, layer)
    tokens: int = 5  # tokens shown per side of a neuron
    rows: int = 15  # rows shown per concept table

    def __post_init__(self) -> None:
        if min(self.per_layer, self.tokens, self.rows) < 1:
            raise AtlasError("per-layer, tokens and rows must be at least 1")
        if bad := [c for c in self.concepts if not c.strip()]:
            raise AtlasError(f"empty concept {bad[0]!r}: give a word, e.g. --concept water")


def _overview(out: Path, model: str) -> str:
    meta = read_kv_metadata(tokens_path(out, model))
    rows = "".join(f"<tr><th>{key}</th><td>{escape(meta[key])}</td></tr>"
                   for key in OVERVIEW_KEYS if key in meta)
    return f"<table>{rows}</table>"


def _max_z(out: Path, model: str) -> dict[str, dict[int, list[float]]]:
    con = connect(out)
    try:
        rows = con.execute("SELECT matrix, layer, list(max_z) FROM neurons WHERE model = ? GROUP BY 1, 2",
                           [model]).fetchall()
    finally:
        con.close()
    by_matrix: dict[str, dict[int, list[float]]] = {}
    for matrix, layer, values in rows:
        by_matrix.setdefault(matrix, {})[layer] = values
    return {m: by_matrix[m] for m in ("up", "gate", "down") if m in by_matrix}


def _layers(cfg: ReportConfig, model: str) -> list[tuple[str, str, str]]:
    summary = run_sql(cfg.out, "layer_summary", {"model": model})
    glitch = run_sql(cfg.out, "glitch_tokens", {"model": model})
    return [
        page.section("zscores", "How specialised, per layer", page.image(zscore_plot(_max_z(cfg.out, model)),
                                                                        "max z-score per layer")),
        page.section("glitch-tokens", "Glitch tokens", page.image(glitch_plot(summary.to_pylist()), "glitch tokens"),
                     page.paragraph("Tokens that are the top-1 of at least 20 neurons of a matrix "
                                    "(atlas query glitch_tokens):", note=True),
                     page.table(glitch, TOKEN_COLUMNS, limit=30)),
        page.section("layers", "Layer summary", page.paragraph("atlas query layer_summary", note=True),
                     page.table(summary.drop_columns(["model"]), TOKEN_COLUMNS)),
    ]


def _agreement(c: Comparison) -> tuple[str, str, str]:
    return page.section("agreement", f"Agreement with {c.other}", page.image(c.plot.read_bytes(), "agreement"),
                        f"<pre>{escape(agreement_text(c))}</pre>")


def _specialised(cfg: ReportConfig, model: str) -> tuple[str, str, str]:
    rows = run_sql(cfg.out, "specialised_neurons", {"model": model, "per_layer": str(cfg.per_layer),
                                                     "tokens": str(cfg.tokens)})
    parts = [page.details(f"{matrix} ({'reads' if matrix != 'down' else 'writes'})",
                          page.table(rows.filter(pc.equal(rows["matrix"], matrix)).drop_columns(["model", "matrix"]),
                                     TOKEN_COLUMNS), open_=matrix == "down")
             for matrix in ("up", "gate", "down") if matrix in rows["matrix"].to_pylist()]
    intro = page.paragraph(f"The {cfg.per_layer} neurons of each layer with the highest max z-score, and their "
                           f"{cfg.tokens} strongest top and bottom tokens (atlas query specialised_neurons).",
                           note=True)
    return page.section("specialised", "Most specialised neurons", intro, *parts)


def _concept(cfg: ReportConfig, model: str, concept: str) -> tuple[str, str, str]:
    variables = {"concept": concept, "model": model}
    found = run_sql(cfg.out, "find_concept", variables, cfg.rows).drop_columns(["model"])
    coherent = run_sql(cfg.out, "coherent_neurons", variables, cfg.rows).drop_columns(["model"])
    candidates = run_sql(cfg.out, "clamp_candidates", variables, cfg.rows).drop_columns(["model"])
    return page.section(
        f"concept-{slugify(concept)}", f"Concept: {concept}",
        page.paragraph(f"Neurons whose top tokens are {concept!r} (any case, leading space, plural), "
                       f"most specialised first (atlas query find_concept):", note=True),
        page.table(found, TOKEN_COLUMNS),
        page.paragraph("Coherent neurons, reading and writing it (coherent_neurons):", note=True),
        page.table(coherent, TOKEN_COLUMNS),
        page.paragraph("Clamping candidates, for `atlas clamp --neuron SPEC` (clamp_candidates):", note=True),
        page.table(candidates, TOKEN_COLUMNS))


def write_report(cfg: ReportConfig, progress: bool = True, log=lambda msg: None) -> Path:
    """Build or reuse the atlas (and the comparison), then write OUT/report/MODEL[--vs--OTHER].html."""
    model = ensure_atlas(cfg.model, cfg.out, progress, log)
    sections = [page.section("overview", "Overview", _overview(cfg.out, model))]
    comparison = None
    if cfg.compare:
        comparison = compare(CompareConfig(cfg.model, cfg.compare, cfg.out), progress, log)
    sections += _layers(cfg, model)
    if comparison:
        sections.append(_agreement(comparison))
    sections.append(_specialised(cfg, model))
    sections += [_concept(cfg, model, c) for c in cfg.concepts]
    name = f"{model}--vs--{comparison.other}" if comparison else model
    path = cfg.out / "report" / f"{name}.html"
    subtitle = (f"What each MLP neuron of {model} reads (up, gate) and writes (down), projected through its "
                f"LM head. Made by Neuron Atlas from {cfg.out}.")
    write_atomic(path, page.page(f"Neuron atlas of {model}", subtitle, sections).encode())
    return path
