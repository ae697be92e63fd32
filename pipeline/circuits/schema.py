"""The circuit tables as explicit Arrow schemas, their rows, and where each file lives under OUT/circuits/.

Hive layout, one file per (model, task, method), so a rerun replaces exactly what it recomputed:
    circuits/edges/model=<m>/task=<t>/method=<x>.parquet         one row per valid edge of the graph
    circuits/faithfulness/model=<m>/task=<t>/method=<x>.parquet  one row per edge budget
    circuits/faithfulness/model=<m>/task=<t>/curves.png          F against edges, every method of the run
    circuits/faithfulness/model=<m>/task=<t>/circuit.png         the best method's circuit, by layer
Edges: `src` and `dst` are graph.py's names ("input", "a3.h2", "m3"; "a5.h1<q>", "m5", "logits");
`kind` is the destination's (q, k, v, mlp, logits); `src_layer` / `dst_layer` are null for the input
and the logits. An MLP node ("m<l>") joins the atlas's `neurons` view on (model, layer).
Faithfulness: `budget` as asked (a count, a percentage, or all), `n_requested` the edge count it means,
`fraction` = n_requested / all edges (CPR's x), `n_edges` the count kept after pruning; `m_*` are the
metric's means over the pairs; `cpr`, `cmd`, `seconds` (scoring) and `cost` (seconds over one forward +
backward pass on the same batches) are per method and repeat on each of its rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

EDGES = pa.schema([
    ("model", pa.string()), ("task", pa.string()), ("method", pa.string()), ("src", pa.string()),
    ("dst", pa.string()), ("kind", pa.string()), ("src_layer", pa.int32()), ("dst_layer", pa.int32()),
    ("score", pa.float32()), ("rank", pa.int32()),
])
FAITHFULNESS = pa.schema([
    ("model", pa.string()), ("task", pa.string()), ("method", pa.string()), ("selection", pa.string()),
    ("budget", pa.string()), ("n_requested", pa.int64()), ("fraction", pa.float64()), ("n_edges", pa.int64()),
    ("F", pa.float64()), ("metric", pa.string()), ("m_circuit", pa.float64()), ("m_full", pa.float64()),
    ("m_empty", pa.float64()), ("cpr", pa.float64()), ("cmd", pa.float64()), ("seconds", pa.float64()),
    ("cost", pa.float64()),
])


def edges_path(out: Path, model: str, task: str, method: str) -> Path:
    """Where one (model, task, method) file of edge scores lives."""
    return out / "circuits" / "edges" / f"model={model}" / f"task={task}" / f"method={method}.parquet"


def faithfulness_path(out: Path, model: str, task: str, method: str) -> Path:
    """Where one (model, task, method) faithfulness curve lives."""
    return out / "circuits" / "faithfulness" / f"model={model}" / f"task={task}" / f"method={method}.parquet"


def plot_paths(out: Path, model: str, task: str) -> tuple[Path, Path]:
    """The curves PNG and the circuit PNG of a (model, task), beside its faithfulness files."""
    folder = out / "circuits" / "faithfulness" / f"model={model}" / f"task={task}"
    return folder / "curves.png", folder / "circuit.png"


def edge_rows(model: str, task: str, method: str, graph, scores, ranks) -> pa.Table:
    """One row per valid edge of `graph`, with its score and rank (1 = largest |score|), in rank order."""
    valid = graph.valid.cpu().numpy()
    src, dst = np.nonzero(valid)  # row-major: sources outer
    rank = ranks.cpu().numpy()[src, dst].astype(np.int32)
    order = np.argsort(rank, kind="stable")
    src, dst, rank = src[order], dst[order], rank[order]
    n = len(src)
    sources = np.array(graph.sources, dtype=object)
    destinations = np.array(graph.destinations, dtype=object)
    kinds = np.array([graph.kind(d) for d in range(len(graph.destinations))], dtype=object)
    src_layers = pa.array([graph.layer_of_source(s) for s in range(len(graph.sources))], pa.int32())
    dst_layers = pa.array([graph.layer_of_destination(d) for d in range(len(graph.destinations))], pa.int32())
    return pa.table({
        "model": [model] * n, "task": [task] * n, "method": [method] * n,
        "src": sources[src].tolist(), "dst": destinations[dst].tolist(), "kind": kinds[dst].tolist(),
        "src_layer": src_layers.take(pa.array(src)), "dst_layer": dst_layers.take(pa.array(dst)),
        "score": scores.float().cpu().numpy()[src, dst], "rank": rank,
    }, schema=EDGES)
