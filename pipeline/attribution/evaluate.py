"""`atlas evaluate`: how faithful each method is on a model's prompts, per task, as a table and curves.

For every task, only the prompts the model gets right are explained (the GIM paper's true positives),
the first `limit` of them. Per prompt and method (faithfulness.py has the definitions):
- tokens: comprehensiveness (top 1..max_k tokens → the space token; higher is better) and sufficiency
  (least important 50..99 % → space; lower is better), relative to |f(x)|;
- neurons: area of the drop curve when the top 1..256 neurons by score are set to zero or to their
  mean over the evaluated prompts of the task (higher is better; logit units);
- cost: the method's seconds over those of one plain forward + backward on the same prompt (timed here,
  on this machine, so a shared CPU makes it noisy; the median over prompts is reported).
Floors: `random` (tokens and neurons) and `activation` (neurons by Σ|activation|; it has no token score).
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.atlas.schema import atomic_parquet
from pipeline.attribution import faithfulness as F
from pipeline.attribution import layers as L
from pipeline.attribution.config import AttributionConfig
from pipeline.attribution.estimators import capture_neurons, neuron_means
from pipeline.attribution.inputs import Encoded, is_right
from pipeline.attribution.job import Task, metadata, prepare, run_method
from pipeline.attribution.plot import plot_curves
from pipeline.attribution.schema import FAITHFULNESS, curves_path, faithfulness_path
from pipeline.attribution.targets import space_token
from pipeline.errors import AtlasError
from pipeline.live.load import LiveModel

FLOORS = ("random", "activation")


@dataclass(frozen=True)
class EvaluationReport:
    """The summary table (one row per task × method), the files written, and the time taken."""

    model: str
    summary: pa.Table
    paths: tuple[Path, ...]
    plot: Path
    seconds: float


def _forward_backward_seconds(model: torch.nn.Module, item: Encoded) -> float:
    """Time of one plain forward + backward to the input embeddings: the unit of cost."""
    start = time.perf_counter()
    embeds = L.input_embeddings(model, item.ids[None].to(model.device)).detach().requires_grad_(True)
    with capture_neurons(model) as acts:
        value = item.target(model(inputs_embeds=embeds, use_cache=False).logits)[0]
    torch.autograd.grad(value, [embeds, *acts])
    return time.perf_counter() - start


def _prompt_rows(live: LiveModel, cfg: AttributionConfig, task: str, item: Encoded, means: torch.Tensor) -> list[dict]:
    """One row per method and floor for one prompt."""
    model, ids, target = live.model, item.ids.to(live.model.device), item.target
    unit = _forward_backward_seconds(model, item)
    space = space_token(live.tokenizer)
    rankings: dict[str, tuple[torch.Tensor | None, torch.Tensor, float | None]] = {}
    for name in cfg.methods:
        start = time.perf_counter()
        got = run_method(live, item, name, cfg.steps)
        rankings[name] = (got.tokens, got.neurons, time.perf_counter() - start)
    seed = cfg.seed + item.prompt.id
    shape = next(iter(rankings.values()))[1].shape
    rankings["random"] = (F.random_scores(tuple(ids.shape), seed), F.random_scores(tuple(shape), seed + 1), None)
    rankings["activation"] = (None, F.activation_scores(model, ids), None)
    rows = []
    for name, (tokens, neurons, seconds) in rankings.items():
        tf = None if tokens is None else F.token_faithfulness(model, ids, target, tokens, space, max_k=cfg.max_k)
        token_cols = {"comprehensiveness": None, "sufficiency": None, "comprehensiveness_curve": None,
                      "sufficiency_curve": None} if tf is None else {
            "comprehensiveness": tf.comprehensiveness, "sufficiency": tf.sufficiency,
            "comprehensiveness_curve": list(tf.comprehensiveness_curve),
            "sufficiency_curve": list(tf.sufficiency_curve)}
        zero = F.neuron_ablation_curve(model, ids, target, neurons, mode="zero")
        mean = F.neuron_ablation_curve(model, ids, target, neurons, mode="mean", means=means)
        rows.append({
            "model": live.name, "task": task, "method": name, "prompt_id": item.prompt.id, "metric": zero.metric,
            **token_cols, "area_zero": zero.area, "area_mean": mean.area, "seconds": seconds,
            "cost": None if seconds is None else seconds / unit,
            "zero_curve": list(zero.drops), "mean_curve": list(mean.drops),
        })
    return rows


def _summary(model: str, rows: list[dict], accuracy: dict[str, str]) -> pa.Table:
    """Mean of each measure per task × method (cost: median), tasks and methods in run order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"]), []).append(row)

    def mean(rs: list[dict], key: str) -> float | None:
        values = [r[key] for r in rs if r[key] is not None]
        return sum(values) / len(values) if values else None

    out = []
    for (task, method), rs in groups.items():
        costs = [r["cost"] for r in rs if r["cost"] is not None]
        out.append({"model": model, "task": task, "accuracy": accuracy[task], "prompts": len(rs), "method": method,
                    "comprehensiveness": mean(rs, "comprehensiveness"), "sufficiency": mean(rs, "sufficiency"),
                    "area_zero": mean(rs, "area_zero"), "area_mean": mean(rs, "area_mean"),
                    "cost": statistics.median(costs) if costs else None})
    return pa.Table.from_pylist(out)


def run_evaluation(cfg: AttributionConfig, progress: bool = True, log=lambda message: None) -> EvaluationReport:
    """Faithfulness of every method of `cfg` on every prompt set; Parquet per task, one PNG, a summary."""
    start = time.perf_counter()
    live, tasks = prepare(cfg, progress)
    chosen: list[tuple[Task, list[Encoded]]] = []
    accuracy: dict[str, str] = {}
    for task in tasks:
        right = [item for item in task.items if is_right(live.model, item)]
        accuracy[task.prompts.task] = f"{len(right)}/{len(task.items)}"
        log(f"{task.prompts.task}: {live.name} gets {len(right)} of {len(task.items)} prompts right")
        if not right:
            raise AtlasError(f"{task.prompts.source}: {live.name} gets none of its {len(task.items)} prompts right; "
                             "nothing to explain")
        chosen.append((task, right[: cfg.limit]))
    rows: list[dict] = []
    paths = []
    total = sum(len(items) for _, items in chosen)
    with tqdm(total=total, desc=f"evaluate {live.name}", unit="prompt", file=sys.stderr,
              disable=None if progress else True) as bar:
        for task, items in chosen:
            means = neuron_means(live.model, [item.ids.to(live.model.device) for item in items])
            task_rows = []
            for item in items:
                task_rows += _prompt_rows(live, cfg, task.prompts.task, item, means)
                bar.update(1)
            path = faithfulness_path(cfg.out, live.name, task.prompts.task)
            meta = metadata(live, cfg, task, "attributions.faithfulness", prompt_ids=[i.prompt.id for i in items],
                            ablation_steps=list(F.ABLATION_STEPS), sufficiency_ratios=list(F.SUFFICIENCY_RATIOS))
            with atomic_parquet(path, FAITHFULNESS, meta) as writer:
                writer.write_table(pa.Table.from_pylist(task_rows, schema=FAITHFULNESS))
            paths.append(path)
            rows += task_rows
    plot = plot_curves(rows, curves_path(cfg.out, live.name), live.name)
    return EvaluationReport(live.name, _summary(live.name, rows, accuracy), tuple(paths), plot,
                            time.perf_counter() - start)

