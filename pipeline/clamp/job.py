"""One clamping experiment end to end: check the inputs, load the model, measure, write, plot.

Cheap checks run before the model loads (the prompt file, the candidates query); the neurons, the
site and the target words are checked against the model before the first forward pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from pipeline.clamp.config import ClampConfig, NeuronSpec
from pipeline.clamp.experiment import generation_rows, probability_rows
from pipeline.clamp.inputs import candidate_neurons, read_prompts, target_ids, vocabulary
from pipeline.clamp.plot import plot_dose_response
from pipeline.clamp.results import results_path, run_id, summary, write_results
from pipeline.live.hooks import Clamp, check_clamps, mlps
from pipeline.live.load import load_live
from pipeline.sources import resolve


@dataclass(frozen=True)
class ClampReport:
    """What a clamping run measured and where it is stored."""

    model: str
    run: str
    neurons: tuple[NeuronSpec, ...]
    path: Path
    plot: Path
    summary: pa.Table
    seconds: float


def run_clamp(cfg: ClampConfig, progress: bool = True) -> ClampReport:
    """Run the experiment `cfg` describes and store its rows and plot under `cfg.out/clamp/`."""
    t0 = time.perf_counter()
    prompts = read_prompts(cfg.prompts) if cfg.prompts is not None else []
    neurons = cfg.neurons or candidate_neurons(cfg, resolve(cfg.model).slug)
    live = load_live(cfg.model, dtype=cfg.dtype, device=cfg.device, sha256_cache=cfg.out / ".state" / "sha256.json",
                     progress=progress)
    layers = mlps(live.model)
    check_clamps(layers, [Clamp(spec.layer, spec.neuron, 0.0) for spec in neurons])
    layers[0].site(cfg.site)  # a gate site on a non-gated MLP fails here, before any forward pass
    ids = target_ids(vocabulary(live.tokenizer), cfg.words)
    if cfg.mode == "probability":
        union = sorted({i for found in ids.values() for i in found})
        rows = probability_rows(live, cfg, neurons, prompts, union, progress)
    else:
        rows = generation_rows(live, cfg, neurons, progress)
    specs = [f"{s.layer}:{s.neuron}" + ("" if s.value is None else f":{s.value:g}") for s in neurons]
    settings = {k: v for k, v in cfg.as_dict().items() if k not in ("out", "neurons")}
    run = run_id(cfg.mode, {"config": settings, "neurons": specs, "signs": [s.sign for s in neurons],
                            "prompts": prompts, "source_sha256": live.provenance["source_sha256"]})
    metadata = {**live.provenance, "table": "clamp", "run": run, "mode": cfg.mode, "site": cfg.site,
                "positions": cfg.positions, "neurons": specs, "targets": list(cfg.words), "target_ids": ids,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": cfg.as_dict()}
    path = results_path(cfg.out, live.name, run)
    table = summary(write_results(rows, path, run, metadata))
    plot = plot_dose_response(table, path.with_suffix(".png"), _title(cfg, live.name, len(prompts)))
    return ClampReport(live.name, run, neurons, path, plot, table, time.perf_counter() - t0)


def _title(cfg: ClampConfig, model: str, n_prompts: int) -> str:
    what = (f"mean over {n_prompts} prompts" if cfg.mode == "probability"
            else f"{cfg.samples} answers to {cfg.ask!r}")
    return f"{model}: clamp at {cfg.site}, positions {cfg.positions}; target {'|'.join(cfg.words)}; {what}"
