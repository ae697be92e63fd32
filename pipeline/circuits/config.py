"""`CircuitConfig`: what `atlas circuit` runs, validated once, stored in the outputs' metadata.

Imports no torch, so the command line can offer its choices before loading anything (scores.py takes
METRICS from here).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import check_name, config_dict
from pipeline.errors import AtlasError
from pipeline.live import DTYPES

METHODS = ("eap", "eap-ig", "random")
METRICS = ("logit_diff", "prob_diff", "kl")
SELECTIONS = ("greedy", "topn")
# MIB's grid of edge fractions (select.MIB_FRACTIONS): CPR and CMD on it are comparable with MIB's.
DEFAULT_EDGES = "0.1%,0.2%,0.5%,1%,2%,5%,10%,20%,50%,all"


def parse_methods(spec: str) -> tuple[str, ...]:
    """`eap,random` -> ('eap', 'random'), in the order given; unknown or repeated names are errors."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    if unknown := [m for m in names if m not in METHODS]:
        raise AtlasError(f"unknown circuit method {unknown[0]!r}; known: {', '.join(METHODS)}")
    if not names or len(set(names)) != len(names):
        raise AtlasError(f"methods must be distinct and at least one, got {spec!r}")
    return names


def parse_edges(spec: str) -> tuple[int | str, ...]:
    """`10,1%,all` -> (10, '1%', 'all'): edge counts, percentages of the full graph, or all of it."""
    budgets: list[int | str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part == "all":
            budgets.append(part)
        elif re.fullmatch(r"\d+", part):
            budgets.append(int(part))
        elif (m := re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)%", part)) and 0 < float(m[1]) <= 100:
            budgets.append(f"{float(m[1]):g}%")
        else:
            raise AtlasError(f"invalid edge budget {part!r} in {spec!r}: use counts, percentages (0.1%) or all")
    return tuple(budgets)


def resolve_budgets(edges: tuple[int | str, ...], total: int) -> list[tuple[str, int]]:
    """(label, edge count) per distinct budget, smallest first; a percentage floors as MIB does and a
    count above the graph's `total` edges means all of them."""
    counts: dict[int, str] = {}
    for budget in edges:
        if budget == "all":
            n = total
        elif isinstance(budget, int):
            n = min(budget, total)
        else:
            n = int(float(budget[:-1]) / 100 * total)
        counts.setdefault(n, str(budget))
    return [(label, n) for n, label in sorted(counts.items())]


@dataclass(frozen=True)
class CircuitConfig:
    """Model, clean/corrupted pairs, methods and budgets of one `atlas circuit` run."""

    model: str
    pairs: str  # a JSONL file or a shipped task name
    methods: tuple[str, ...] = METHODS
    steps: int = 5  # integration steps of eap-ig
    metric: str = "logit_diff"
    edges: tuple[int | str, ...] = parse_edges(DEFAULT_EDGES)
    selection: str = "greedy"
    limit: int | None = None  # at most this many pairs (the file's first)
    batch_size: int = 16
    out: Path = Path("outputs")
    name: str | None = None  # the model's name in the outputs (default: derived from `model`)
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0  # of the random scores

    def __post_init__(self) -> None:
        parse_methods(",".join(self.methods))
        if self.metric not in METRICS:
            raise AtlasError(f"unknown metric {self.metric!r}: choose from {', '.join(METRICS)}")
        if self.selection not in SELECTIONS:
            raise AtlasError(f"unknown selection {self.selection!r}: choose from {', '.join(SELECTIONS)}")
        if not self.edges:
            raise AtlasError("no edge budgets: give --edges, e.g. 10,100,1%,all")
        parse_edges(",".join(map(str, self.edges)))
        if self.steps < 1 or self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise AtlasError("steps, batch size and limit must be at least 1")
        if self.dtype not in DTYPES:
            raise AtlasError(f"unknown dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        check_name(self.name)

    def as_dict(self) -> dict:
        """The resolved settings, JSON-ready, for the outputs' metadata."""
        return config_dict(self)
