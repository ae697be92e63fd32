"""Circuits from an edge-score matrix: top-n, the paper's greedy search, pruning, and MIB's CPR and CMD.

Pure functions on a score matrix `[n_sources, n_destinations]` and its `valid` mask; the graph is read
only through the names of its sources and destinations (graph.py's convention): a source "a5.h1" and
the destinations "a5.h1<q>", "<k>", "<v>" are one node; "m5" is both a source and a destination;
"input" is only a source, "logits" only a destination.
- top-n: the n valid edges with the largest |score| (ties: the lower flat index first).
- greedy (Hanna et al. 2024, the authors' `Graph.apply_greedy`): start from the logits; repeatedly add
  the best-|score| edge whose child (destination node) is already in the circuit; the edge's parent
  enters the circuit and its incoming edges become candidates. One heap, no rescans.
- prune: drop nodes (and their edges) lacking an incoming or an outgoing edge (the input needs only an
  outgoing one, the logits only an incoming one), until nothing changes.
- CPR and CMD (MIB, Mueller et al. 2025, `evaluate_area_under_curve`): the area under F and under
  |1 − F| over the requested edge fractions (budget / all edges, not the count left after pruning),
  by the trapezoid rule on a linear x axis, divided by the grid's width so that F ≡ 1 gives CPR = 1
  and CMD = 0 exactly (MIB's own grid 0.001…1 has width 0.999). On MIB's grid — `--edges`' default,
  0.1 %, 0.2 %, 0.5 %, 1 %, 2 %, 5 %, 10 %, 20 %, 50 %, all — the values are MIB's up to that factor.
  A single budget has no width: its F (and |1 − F|) is the value. On a linear axis the large budgets
  weigh most (50 % → all is half the width): the curve, not CPR, shows how small circuits do.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def node_name(name: str) -> str:
    """The node a source or destination belongs to: "a5.h1<q>" -> "a5.h1"; others unchanged."""
    return name.split("<", 1)[0]


@dataclass(frozen=True)
class Nodes:
    """Which node each source and destination belongs to, and which nodes read or write at all."""

    names: tuple[str, ...]
    of_source: torch.Tensor  # [n_sources] node index
    of_destination: torch.Tensor  # [n_destinations] node index
    reads: torch.Tensor  # [n_nodes] bool: the node has destinations (everything but the input)
    writes: torch.Tensor  # [n_nodes] bool: the node has sources (everything but the logits)

    @classmethod
    def of(cls, sources: Sequence[str], destinations: Sequence[str]) -> Nodes:
        """Nodes in order of first appearance, sources first."""
        index: dict[str, int] = {}
        for name in [*sources, *destinations]:
            index.setdefault(node_name(name), len(index))
        of_source = torch.tensor([index[node_name(s)] for s in sources], dtype=torch.long)
        of_destination = torch.tensor([index[node_name(d)] for d in destinations], dtype=torch.long)
        reads = torch.zeros(len(index), dtype=torch.bool)
        writes = torch.zeros(len(index), dtype=torch.bool)
        reads[of_destination] = True
        writes[of_source] = True
        return cls(tuple(index), of_source, of_destination, reads, writes)


def ranked(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The top-n selection order: flat indices of the valid edges, largest |score| first, ties in index order."""
    flat = torch.where(valid, scores.abs().float(), torch.tensor(-1.0)).ravel()
    order = torch.argsort(flat, descending=True, stable=True)
    return order[: int(valid.sum())]


def rank(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each valid edge's rank by |score| (1 = largest), 0 where not valid; `[n_sources, n_destinations]`."""
    order = ranked(scores, valid)
    ranks = torch.zeros(scores.numel(), dtype=torch.long)
    ranks[order] = torch.arange(1, order.numel() + 1)
    return ranks.view(scores.shape)


def top_n(scores: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """The n valid edges with the largest |score| (all valid edges when n exceeds them), as a bool mask."""
    return first(ranked(scores, valid), n, scores.shape)


def greedy_order(scores: torch.Tensor, valid: torch.Tensor, sources: Sequence[str],
                 destinations: Sequence[str]) -> torch.Tensor:
    """Flat indices of the valid edges in the order the greedy search adds them (every edge reachable
    from the logits); the greedy circuit of n edges is the first n, so one search serves every budget."""
    nodes = Nodes.of(sources, destinations)
    size = scores.abs().double().numpy()  # [n_sources, n_destinations]
    ok = valid.numpy()
    n_dst = valid.shape[1]
    by_node: dict[int, list[int]] = {}  # node -> its destination indices
    for d, node in enumerate(nodes.of_destination.tolist()):
        by_node.setdefault(node, []).append(d)
    parent_of = nodes.of_source.tolist()
    in_circuit = [False] * len(nodes.names)
    heap: list[tuple[float, int]] = []  # (-|score|, flat index): ties in index order

    def enter(node: int) -> None:
        in_circuit[node] = True
        for d in by_node.get(node, ()):
            for s in ok[:, d].nonzero()[0].tolist():
                heapq.heappush(heap, (-size[s, d], s * n_dst + d))

    for node in range(len(nodes.names)):  # the logits: the nodes that read but never write
        if nodes.reads[node] and not nodes.writes[node]:
            enter(node)
    order = []
    while heap:
        _, flat = heapq.heappop(heap)
        order.append(flat)
        parent = parent_of[flat // n_dst]
        if not in_circuit[parent]:
            enter(parent)
    return torch.tensor(order, dtype=torch.long)


def first(order: torch.Tensor, n: int, shape: torch.Size) -> torch.Tensor:
    """The first n edges of a selection order (flat indices) as a bool mask of `shape`."""
    keep = torch.zeros(shape.numel(), dtype=torch.bool)
    keep[order[: max(n, 0)]] = True
    return keep.view(shape)


def greedy(scores: torch.Tensor, valid: torch.Tensor, sources: Sequence[str], destinations: Sequence[str],
           n: int) -> torch.Tensor:
    """The paper's greedy circuit of n edges grown from the logits, as a bool mask (before pruning)."""
    return first(greedy_order(scores, valid, sources, destinations), n, scores.shape)


def prune(keep: torch.Tensor, sources: Sequence[str], destinations: Sequence[str]) -> torch.Tensor:
    """`keep` without the edges of nodes lacking an incoming or outgoing edge, repeated until stable."""
    nodes = Nodes.of(sources, destinations)
    keep = keep.clone()
    n_nodes = len(nodes.names)
    while True:
        outgoing = torch.zeros(n_nodes, dtype=torch.bool)
        outgoing[nodes.of_source[keep.any(dim=1)]] = True
        incoming = torch.zeros(n_nodes, dtype=torch.bool)
        incoming[nodes.of_destination[keep.any(dim=0)]] = True
        alive = (incoming | ~nodes.reads) & (outgoing | ~nodes.writes)
        pruned = keep & alive[nodes.of_source][:, None] & alive[nodes.of_destination][None, :]
        if torch.equal(pruned, keep):
            return pruned
        keep = pruned


def area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area of values over fractions (sorted by fraction), divided by the fractions' width."""
    points = sorted(zip(fractions, values))
    if not points:
        raise ValueError("no points to integrate")
    width = points[-1][0] - points[0][0]
    if width <= 0:
        return sum(v for _, v in points) / len(points)
    total = sum((x2 - x1) * (y1 + y2) / 2 for (x1, y1), (x2, y2) in itertools.pairwise(points))
    return total / width


def cpr(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Circuit performance ratio: normalised area under F (higher is better; F ≡ 1 gives 1)."""
    return area(fractions, faithfulness)


def cmd(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Circuit-model difference: normalised area under |1 − F| (lower is better; F ≡ 1 gives 0)."""
    return area(fractions, [abs(1.0 - f) for f in faithfulness])
