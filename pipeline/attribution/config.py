"""`AttributionConfig`: what `atlas attribute` and `atlas evaluate` run, validated once, stored in the outputs.

Imports no torch, so the command line can offer the choices before loading anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import check_name, config_dict
from pipeline.errors import AtlasError
from pipeline.live import DTYPES

METHOD_NAMES = ("grad_x_act", "ig", "gim", "attnlrp")
LEVELS = ("tokens", "neurons", "both")


@dataclass(frozen=True)
class AttributionConfig:
    """Model, prompts and methods of one attribution or evaluation run."""

    model: str
    prompts: tuple[str, ...]  # JSONL files or shipped task names
    methods: tuple[str, ...] = ("gim",)
    steps: int = 5  # integration steps of ig
    level: str = "both"  # what `attribute` writes
    out: Path = Path("outputs")
    name: str | None = None  # the model's name in the outputs (default: derived from `model`)
    limit: int | None = None  # evaluate: at most this many prompts (that the model gets right) per task
    max_k: int = 10  # evaluate: comprehensiveness over the top 1..max_k tokens
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0  # of the random rankings

    def __post_init__(self) -> None:
        if not self.prompts:
            raise AtlasError("no prompts given: --prompts FILE.jsonl or a task name")
        if unknown := [m for m in self.methods if m not in METHOD_NAMES]:
            raise AtlasError(f"unknown attribution method {unknown[0]!r}; known: {', '.join(METHOD_NAMES)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise AtlasError(f"methods must be distinct and at least one, got {', '.join(self.methods) or 'none'}")
        if self.steps < 1 or self.max_k < 1 or (self.limit is not None and self.limit < 1):
            raise AtlasError("steps, max_k and limit must be at least 1")
        if self.level not in LEVELS:
            raise AtlasError(f"unknown level {self.level!r}: choose from {', '.join(LEVELS)}")
        if self.dtype not in DTYPES:
            raise AtlasError(f"unknown dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        check_name(self.name)

    def as_dict(self) -> dict:
        """The resolved settings, JSON-ready, for the outputs' metadata."""
        return config_dict(self)
