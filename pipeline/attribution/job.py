"""`atlas attribute`: every prompt of a set through one method, token and neuron scores to Parquet.

One file per (model, task, method), written atomically (schema.py has the layout); a rerun replaces it.
Neuron files hold every (layer, neuron) of every prompt, one row group per prompt, so SQL can join any
of them to the atlas. The prompts are parsed and checked before the model loads, so a bad line costs
nothing; the checks that need the tokenizer (no-token target, length) run before any attribution.
"""
from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.atlas.schema import atomic_parquet
from pipeline.attribution.config import AttributionConfig
from pipeline.attribution.estimators import Attribution, attribute, method
from pipeline.attribution.inputs import Encoded, PromptSet, encode, load_prompts
from pipeline.attribution.schema import NEURON_SCORES, TOKEN_SCORES, scores_path
from pipeline.errors import AtlasError
from pipeline.live.load import LiveModel, load_live


@dataclass(frozen=True)
class Task:
    """A prompt set encoded for one model."""

    prompts: PromptSet
    items: tuple[Encoded, ...]


@dataclass(frozen=True)
class AttributionReport:
    """What a run wrote, for the command's summary line."""

    model: str
    paths: tuple[Path, ...]
    n_prompts: int
    seconds: float


def prepare(cfg: AttributionConfig, progress: bool) -> tuple[LiveModel, list[Task]]:
    """Parse the prompt sets, load the model, encode every prompt against it (errors name file:line)."""
    sets = [load_prompts(p) for p in cfg.prompts]
    if len({s.task for s in sets}) != len(sets):
        raise AtlasError(f"two prompt sets share a task name: {', '.join(s.task for s in sets)}")
    live = load_live(cfg.model, name=cfg.name, dtype=cfg.dtype, device=cfg.device, progress=progress)
    context = getattr(live.model.config.get_text_config(), "max_position_embeddings", None)
    return live, [Task(s, tuple(encode(s, live.tokenizer, context))) for s in sets]


def run_method(live: LiveModel, item: Encoded, name: str, steps: int) -> Attribution:
    """One prompt's scores under one method, with the method's baseline (inputs.Encoded.baseline)."""
    dev = live.model.device
    baseline = item.baseline(name, live.tokenizer)
    return attribute(live.model, item.ids.to(dev), item.target, method(name, steps),
                     baseline_ids=None if baseline is None else baseline.to(dev))


def metadata(live: LiveModel, cfg: AttributionConfig, task: Task, table: str, **extra: object) -> dict:
    """The key-value metadata of an attribution file: the model's provenance, the run, the prompts."""
    return {**live.provenance, "table": table, "task": task.prompts.task, "prompts": task.prompts.source,
            "config": cfg.as_dict(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra}


def _token_rows(live: LiveModel, task: str, name: str, item: Encoded, scores: torch.Tensor) -> pa.Table:
    ids = item.ids.tolist()
    n = len(ids)
    return pa.table({
        "model": [live.name] * n, "task": [task] * n, "method": [name] * n, "prompt_id": [item.prompt.id] * n,
        "position": np.arange(n, dtype=np.int32), "token_id": np.asarray(ids, dtype=np.int32),
        "token": [live.tokenizer.decode([i]) for i in ids], "score": scores.float().cpu().numpy(),
    }, schema=TOKEN_SCORES)


def _neuron_rows(live: LiveModel, task: str, name: str, item: Encoded, got: Attribution) -> pa.Table:
    n_layers, d_ff = got.neurons.shape
    n = n_layers * d_ff
    return pa.table({
        "model": [live.name] * n, "task": [task] * n, "method": [name] * n, "prompt_id": [item.prompt.id] * n,
        "layer": np.repeat(np.arange(n_layers, dtype=np.int32), d_ff),
        "neuron": np.tile(np.arange(d_ff, dtype=np.int32), n_layers),
        "score": got.neurons.float().cpu().numpy().ravel(), "activation": got.activations.float().cpu().numpy().ravel(),
    }, schema=NEURON_SCORES)


def run_attribution(cfg: AttributionConfig, progress: bool = True) -> AttributionReport:
    """Attribute every prompt of every set with every method of `cfg`; write the tables `cfg.level` asks for."""
    start = time.perf_counter()
    live, tasks = prepare(cfg, progress)
    levels = ("tokens", "neurons") if cfg.level == "both" else (cfg.level,)
    paths: list[Path] = []
    total = sum(len(t.items) for t in tasks) * len(cfg.methods)
    with tqdm(total=total, desc=f"attribute {live.name}", unit="prompt", file=sys.stderr,
              disable=None if progress else True) as bar:
        for task in tasks:
            for name in cfg.methods:
                paths += _write_method(live, cfg, task, name, levels, bar)
    n_prompts = sum(len(t.items) for t in tasks)
    return AttributionReport(live.name, tuple(paths), n_prompts, time.perf_counter() - start)


def _write_method(live: LiveModel, cfg: AttributionConfig, task: Task, name: str, levels: tuple[str, ...],
                  bar: tqdm) -> list[Path]:
    """One (task, method) file per level: tokens in one row group, neurons one row group per prompt."""
    paths = {level: scores_path(cfg.out, level, live.name, task.prompts.task, name) for level in levels}
    schemas = {"tokens": TOKEN_SCORES, "neurons": NEURON_SCORES}
    extra = {"method": name, "steps": cfg.steps if name == "ig" else 1}
    with ExitStack() as stack:
        writers = {level: stack.enter_context(atomic_parquet(
            path, schemas[level], metadata(live, cfg, task, f"attributions.{level}", **extra)))
            for level, path in paths.items()}
        token_rows = []
        for item in task.items:
            got = run_method(live, item, name, cfg.steps)
            token_rows.append(_token_rows(live, task.prompts.task, name, item, got.tokens))
            if "neurons" in writers:
                writers["neurons"].write_table(_neuron_rows(live, task.prompts.task, name, item, got))
            bar.update(1)
        if "tokens" in writers:
            writers["tokens"].write_table(pa.concat_tables(token_rows))
    return list(paths.values())
