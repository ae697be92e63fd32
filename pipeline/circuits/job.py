"""`atlas circuit`: score every edge of a model's graph with each method, select circuits, measure them.

Pairs: a JSONL file in attribution's format (inputs.py) where every row has `corrupted` and `foil`, or a
shipped task (equal token lengths under SmolLM2's tokenizer, made here):
- ioi (120, attribution's own ioi task, which already has clean/corrupted pairs): "When Luke and Jane
  went to the store, Jane gave a drink to" → " Luke" over " Jane"; corrupted: a third name in place of
  the repeated subject;
- greater-than (144): "The war lasted from the year 1742 to the year 17" → "5" over "3": SmolLM2 writes
  years digit by digit, so the next token is the end year's tens digit; target = the start's tens digit
  + 1 (a later decade), foil = − 1 (an earlier one, which would end the war before it began); corrupted:
  the start year 1701 (the paper's YY = 01), after which both digits are later;
- capital (121): "The capital of France is" → " Paris" over " Lima"; corrupted: another country of the
  same token length ("The capital of Peru is") whose capital is the foil. Single-token capitals only.
Flow: parse and check the pairs (before the model loads), load the model once, encode, bucket pairs by
token length into batches of `batch_size`, then per method: scores summed over batches and divided by
the number of pairs (random: seeded normal scores on the valid edges, the floor); a selection order
(select.py) from which each budget's circuit is a prefix, pruned; faithfulness (patching.py) per budget;
CPR and CMD. Files are written atomically (schema.py has the layout), one per (model, task, method).
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.atlas.schema import atomic_parquet
from pipeline.attribution import inputs
from pipeline.attribution.inputs import Encoded, PromptSet, encode
from pipeline.circuits import select
from pipeline.circuits.config import CircuitConfig, resolve_budgets
from pipeline.circuits.graph import Graph
from pipeline.circuits.patching import faithfulness
from pipeline.circuits.plot import plot_circuit, plot_curves
from pipeline.circuits.schema import (
    EDGES,
    FAITHFULNESS,
    edge_rows,
    edges_path,
    faithfulness_path,
    plot_paths,
)
from pipeline.circuits.scores import PairBatch, edge_scores
from pipeline.errors import AtlasError
from pipeline.live.load import LiveModel, load_live

TASK_FILES = {"ioi": inputs.TASK_FILES["ioi"],  # attribution's ioi task already has the pairs
              **{name: inputs.shipped_task("pipeline.circuits", name) for name in ("greater-than", "capital")}}
TASKS = tuple(TASK_FILES)
GOOD_F = 0.8  # the circuit pictured: the smallest budget of the best method reaching this faithfulness


@dataclass(frozen=True)
class CircuitReport:
    """What a run measured and wrote, for the command's tables and summary line."""

    model: str
    task: str
    curves: pa.Table  # one row per budget: edges kept and F per method
    summary: pa.Table  # one row per method: CPR, CMD, seconds, cost
    paths: tuple[Path, ...]
    plots: tuple[Path, Path]
    n_pairs: int
    n_right: int
    seconds: float


def load_pairs(spec: str, limit: int | None = None) -> PromptSet:
    """The pairs of a task or file, each with `corrupted` and `foil` (else an error naming the line)."""
    pairs = inputs.read_prompts(inputs.task_path(spec, TASK_FILES, "pairs"))
    for p in pairs.prompts:
        if missing := [f for f in ("corrupted", "foil") if getattr(p, f) is None]:
            raise AtlasError(f"{pairs.source}:{p.id}: a circuit pair needs {' and '.join(missing)} "
                             "(the prompt with the answer-relevant part changed, and the competing answer)")
    return PromptSet(pairs.task, pairs.source, pairs.prompts[:limit])


def make_batches(items: list[Encoded], batch_size: int, device: torch.device) -> list[PairBatch]:
    """Pairs bucketed by token length (file order within a length), in batches of at most `batch_size`."""
    by_length: dict[int, list[Encoded]] = {}
    for item in items:
        by_length.setdefault(item.ids.numel(), []).append(item)
    batches = []
    for length in sorted(by_length):
        bucket = by_length[length]
        for i in range(0, len(bucket), batch_size):
            chunk = bucket[i: i + batch_size]
            batches.append(PairBatch(
                clean=torch.stack([c.ids for c in chunk]).to(device),
                corrupted=torch.stack([c.corrupted for c in chunk]).to(device),
                target=torch.tensor([c.target.token for c in chunk], device=device),
                foil=torch.tensor([c.target.foil for c in chunk], device=device)))
    return batches


def synchronized(device: torch.device) -> float:
    """`time.perf_counter()` once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def forward_backward(model: torch.nn.Module, batches: list[PairBatch]) -> tuple[float, int]:
    """Seconds of one plain forward + backward (logit difference to the input embeddings) over every
    batch — the unit of cost, timed after one untimed batch warms up — and how many pairs have the
    target's logit above the foil's."""

    def one(b: PairBatch) -> int:
        embeds = model.get_input_embeddings()(b.clean).detach().requires_grad_(True)
        last = model(inputs_embeds=embeds, use_cache=False).logits[:, -1].float()
        rows = torch.arange(len(b.target), device=last.device)
        diff = last[rows, b.target] - last[rows, b.foil]
        torch.autograd.grad(diff.sum(), embeds)
        return int((diff > 0).sum())

    one(batches[0])
    start = synchronized(model.device)
    right = sum(one(b) for b in batches)
    return synchronized(model.device) - start, right


def method_scores(live: LiveModel, graph: Graph, batches: list[PairBatch], cfg: CircuitConfig, method: str,
                  bar: tqdm) -> torch.Tensor:
    """Mean edge scores over the pairs, `[n_sources, n_destinations]`, 0 off the valid edges."""
    if method == "random":
        generator = torch.Generator().manual_seed(cfg.seed)
        return torch.randn(graph.valid.shape, generator=generator) * graph.valid
    total = torch.zeros(graph.valid.shape, dtype=torch.float32)
    for b in batches:
        total += edge_scores(live.model, graph, b, method, cfg.metric, steps=cfg.steps).float().cpu()
        bar.update(1)
    return total / sum(len(b.target) for b in batches)


def _metadata(live: LiveModel, cfg: CircuitConfig, pairs: PromptSet, table: str, method: str, graph: Graph) -> dict:
    return {**live.provenance, "table": table, "task": pairs.task, "pairs": pairs.source,
            "pairs_sha256": hashlib.sha256(Path(pairs.source).read_bytes()).hexdigest(),
            "n_pairs": len(pairs.prompts), "method": method, "metric": cfg.metric,
            "steps": cfg.steps if method == "eap-ig" else 1, "selection": cfg.selection,
            "n_edges_total": graph.n_edges, "config": cfg.as_dict(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def run_circuit(cfg: CircuitConfig, progress: bool = True, log=lambda message: None) -> CircuitReport:
    """Score, select and measure circuits for every method of `cfg`; write Parquet and the two PNGs."""
    start = time.perf_counter()
    pairs = load_pairs(cfg.pairs, cfg.limit)
    live = load_live(cfg.model, name=cfg.name, dtype=cfg.dtype, device=cfg.device, progress=progress)
    context = getattr(live.model.config.get_text_config(), "max_position_embeddings", None)
    batches = make_batches(encode(pairs, live.tokenizer, context), cfg.batch_size, live.model.device)
    graph = Graph.for_model(live.model)
    budgets = resolve_budgets(cfg.edges, graph.n_edges)
    unit, n_right = forward_backward(live.model, batches)
    log(f"{pairs.task}: {live.name} puts the target above the foil on {n_right} of {len(pairs.prompts)} pairs; "
        f"{graph.n_edges} edges; one forward + backward over the pairs takes {unit:.2f} s")
    if cfg.metric == "kl" and "eap" in cfg.methods:
        log("note: with the kl metric plain eap has zero gradient at the clean input; its scores are ~0")
    rows: dict[str, list[dict]] = {}
    chosen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # method -> (scores, selection order)
    paths: list[Path] = []
    total = len(batches) * sum(m != "random" for m in cfg.methods) + len(budgets) * len(cfg.methods)
    with tqdm(total=total, desc=f"circuit {live.name} {pairs.task}", unit="step", file=sys.stderr,
              disable=None if progress else True) as bar:
        for method in cfg.methods:
            began = synchronized(live.model.device)
            scores = method_scores(live, graph, batches, cfg, method, bar)
            seconds = synchronized(live.model.device) - began
            order = selection_order(scores, graph, cfg.selection)
            chosen[method] = (scores, order)
            rows[method] = []
            for label, n in budgets:
                keep = circuit(order, n, graph)
                got = faithfulness(live.model, graph, batches, keep, cfg.metric)
                rows[method].append({
                    "model": live.name, "task": pairs.task, "method": method, "selection": cfg.selection,
                    "budget": label, "n_requested": n, "fraction": n / graph.n_edges, "n_edges": int(keep.sum()),
                    "F": float(got["F"]), "metric": cfg.metric, "m_circuit": float(got["m_circuit"]),
                    "m_full": float(got["m_full"]), "m_empty": float(got["m_empty"]),
                    "seconds": None if method == "random" else seconds,
                    "cost": None if method == "random" else seconds / unit})
                bar.update(1)
            curve = rows[method]
            fractions, values = [r["fraction"] for r in curve], [r["F"] for r in curve]
            for r in curve:
                r.update(cpr=select.cpr(fractions, values), cmd=select.cmd(fractions, values))
            paths += _write(live, cfg, pairs, graph, method, scores, curve)
    curves_png, circuit_png = plot_paths(cfg.out, live.name, pairs.task)
    plot_curves([r for m in cfg.methods for r in rows[m]], curves_png, f"{live.name} · {pairs.task} · {cfg.metric}")
    best, label, n = pictured(rows, cfg.methods)
    scores, order = chosen[best]
    plot_circuit(graph, scores, circuit(order, n, graph), circuit_png,
                 f"{live.name} · {pairs.task} · {best} · {label} ({cfg.selection})")
    return CircuitReport(live.name, pairs.task, curves_table(rows, cfg.methods), summary_table(rows, cfg.methods),
                         tuple(paths), (curves_png, circuit_png), len(pairs.prompts), n_right,
                         time.perf_counter() - start)


def selection_order(scores: torch.Tensor, graph: Graph, selection: str) -> torch.Tensor:
    """The order in which `selection` (greedy or topn) adds edges; a budget's circuit is a prefix."""
    valid = graph.valid.cpu()
    if selection == "greedy":
        return select.greedy_order(scores, valid, graph.sources, graph.destinations)
    return select.ranked(scores, valid)


def circuit(order: torch.Tensor, n: int, graph: Graph) -> torch.Tensor:
    """The first n edges of a selection order, pruned; bool `[n_sources, n_destinations]`."""
    return select.prune(select.first(order, n, graph.valid.shape), graph.sources, graph.destinations)


def pictured(rows: dict[str, list[dict]], methods: tuple[str, ...]) -> tuple[str, str, int]:
    """(method, budget label, edge count) of the circuit to draw: the method with the best CPR (random
    only when alone) at its smallest budget with F >= GOOD_F short of all, else its largest short of all."""
    candidates = [m for m in methods if m != "random"] or list(methods)
    best = max(candidates, key=lambda m: rows[m][0]["cpr"])
    curve = [r for r in rows[best] if r["budget"] != "all"] or rows[best]
    row = next((r for r in curve if r["F"] >= GOOD_F), curve[-1])
    return best, row["budget"], row["n_requested"]


def curves_table(rows: dict[str, list[dict]], methods: tuple[str, ...]) -> pa.Table:
    """One row per budget: the edges each method kept after pruning, and its faithfulness F."""
    first = rows[methods[0]]
    columns: dict[str, list] = {"budget": [r["budget"] for r in first], "requested": [r["n_requested"] for r in first]}
    for m in methods:
        columns[f"{m} edges"] = [r["n_edges"] for r in rows[m]]
        columns[f"{m} F"] = [r["F"] for r in rows[m]]
    return pa.table(columns)


def summary_table(rows: dict[str, list[dict]], methods: tuple[str, ...]) -> pa.Table:
    """One row per method: CPR (higher is better), CMD (lower is better), scoring seconds and cost."""
    return pa.Table.from_pylist([{key: rows[m][0][key] for key in ("method", "cpr", "cmd", "seconds", "cost")}
                                 for m in methods],
                                schema=pa.schema([("method", pa.string()), ("cpr", pa.float64()), ("cmd", pa.float64()),
                                                  ("seconds", pa.float64()), ("cost", pa.float64())]))


def _write(live: LiveModel, cfg: CircuitConfig, pairs: PromptSet, graph: Graph, method: str,
           scores: torch.Tensor, curve: list[dict]) -> list[Path]:
    """The method's edges and faithfulness files, each written whole under a temporary name, then renamed."""
    ranks = select.rank(scores, graph.valid.cpu())
    tables = {"edges": (edges_path, EDGES, edge_rows(live.name, pairs.task, method, graph, scores, ranks)),
              "faithfulness": (faithfulness_path, FAITHFULNESS, pa.Table.from_pylist(curve, schema=FAITHFULNESS))}
    paths = []
    for table, (where, schema, rows) in tables.items():
        paths.append(where(cfg.out, live.name, pairs.task, method))
        with atomic_parquet(paths[-1], schema, _metadata(live, cfg, pairs, f"circuits.{table}", method, graph)) as w:
            w.write_table(rows)
    return paths
