"""The pictures of a circuit run: faithfulness against edges kept, and one circuit drawn layer by layer."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.collections import LineCollection

from pipeline.atlas.schema import write_atomic
from pipeline.circuits.select import node_name

MAX_DRAWN = 300  # a circuit picture shows at most this many edges, the strongest


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path


def plot_curves(rows: list[dict], path: Path, title: str) -> Path:
    """F against the number of edges kept (after pruning; symmetric log x, so 0 shows), one line per method."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        curve = sorted((r["n_edges"], r["F"]) for r in rows if r["method"] == method)
        cpr = next(r["cpr"] for r in rows if r["method"] == method)
        ax.plot([x for x, _ in curve], [y for _, y in curve], "--" if method == "random" else "-", marker="o",
                markersize=3, label=f"{method} (CPR {cpr:.2f})")
    ax.set_xscale("symlog", linthresh=1)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("edges in the circuit (after pruning)")
    ax.set_ylabel("faithfulness F")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def node_positions(graph) -> dict[str, tuple[float, float]]:
    """Where each node sits: input at the bottom, per layer the heads in a row and the MLP above them to
    the right, the logits on top."""
    pos = {"input": (0.0, -1.0), "logits": (0.0, 2.0 * graph.n_layers)}
    middle = (graph.n_heads - 1) / 2
    for name in graph.sources[1:]:
        layer, _, head = name[1:].partition(".h")
        if name.startswith("a"):
            pos[name] = (int(head) - middle, 2.0 * int(layer))
        else:
            pos[name] = (middle + 1.0, 2.0 * int(layer) + 1)  # right of the heads, off the input-logits line
    return pos


def plot_circuit(graph, scores: torch.Tensor, keep: torch.Tensor, path: Path, title: str) -> Path:
    """The circuit `keep` (bool `[n_sources, n_destinations]`): its nodes by layer, its strongest edges
    (at most MAX_DRAWN) with width ∝ |score| and colour by sign and size; other nodes faint."""
    pos = node_positions(graph)
    src, dst = torch.nonzero(keep, as_tuple=True)
    values = scores[src, dst].float()
    strongest = torch.argsort(values.abs(), descending=True, stable=True)[:MAX_DRAWN]
    src, dst, values = src[strongest], dst[strongest], values[strongest]
    height = max(4.0, 0.2 * (2 * graph.n_layers + 2))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * graph.n_heads + 3), height))
    xs, ys = zip(*pos.values())
    ax.scatter(xs, ys, s=12, color="lightgrey", zorder=1)
    if len(values):
        top = float(values.abs().max()) or 1.0
        segments = [(pos[graph.sources[s]], pos[node_name(graph.destinations[d])])
                    for s, d in zip(src.tolist(), dst.tolist())]
        lines = LineCollection(segments, cmap="coolwarm", linewidths=(0.4 + 3.0 * values.abs() / top).tolist(),
                               alpha=0.7, zorder=2)
        lines.set_array(values.numpy())
        lines.set_clim(-top, top)
        ax.add_collection(lines)
        fig.colorbar(lines, ax=ax, label="edge score", shrink=min(0.6, 6 / height))
        used = {graph.sources[s] for s in src.tolist()} | {node_name(graph.destinations[d]) for d in dst.tolist()}
        ax.scatter([pos[n][0] for n in used], [pos[n][1] for n in used], s=28, color="black", zorder=3)
    ax.set_yticks([-1.0, *[2.0 * layer for layer in range(graph.n_layers)], 2.0 * graph.n_layers],
                  ["input", *[f"L{layer}" for layer in range(graph.n_layers)], "logits"], fontsize=7)
    ax.set_xticks([])
    shown = f"{len(values)} of {int(keep.sum())} edges" if keep.sum() > len(values) else f"{len(values)} edges"
    ax.set_title(f"{title}\n{shown}; heads in rows, each MLP above and right of its layer", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
