"""Job configuration: one frozen dataclass per job, validated once; the CLI only maps options onto it."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import AtlasError

MATRICES = ("up", "gate", "down")
NORMS = ("raw", "final", "both")
DTYPES = ("auto", "float32", "bfloat16")  # compute dtype of the product; results are exact in each
ENGINES = ("local", "ray")  # where a build's shards run (pipeline/atlas/engines.py)


def parse_layers(spec: str) -> tuple[int, ...]:
    """Parse a layer spec such as `0-3,10` into sorted unique indices."""
    layers: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise AtlasError(f"invalid layer spec {spec!r}: expected e.g. '0-3,10'")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise AtlasError(f"invalid layer spec {spec!r}: range {lo}-{hi} is backwards")
        layers.update(range(lo, hi + 1))
    return tuple(sorted(layers))


def parse_matrices(spec: str) -> tuple[str, ...]:
    """Parse `up,down` into matrix names in canonical order."""
    names = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = names - set(MATRICES)
    if unknown or not names:
        raise AtlasError(f"invalid matrices {spec!r}: choose from {', '.join(MATRICES)}")
    return tuple(m for m in MATRICES if m in names)


@dataclass(frozen=True)
class AtlasConfig:
    """Everything that decides what `atlas build` writes; stored in every output file's metadata."""

    model: str
    out: Path = Path("outputs")
    name: str | None = None  # slug override; default derived from `model`
    k: int = 20
    norm: str = "raw"
    center: bool = False
    matrices: tuple[str, ...] | None = None  # None: every matrix the family has
    layers: tuple[int, ...] | None = None  # None: all layers
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 4096  # neurons per Parquet row group (and projection block): large groups write and query faster
    force: bool = False
    engine: str = "local"  # local: this process, or a process pool with workers > 1; ray: a Ray cluster
    workers: int | None = None  # shards at once; None: 1 locally, one per 4 CPUs of a Ray cluster
    lanes: int | None = None  # partitions at once in a process; None: one per core, 3 on an accelerator

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise AtlasError(f"unknown engine {self.engine!r}: choose from {', '.join(ENGINES)}")
        if self.workers is not None and self.workers < 1:
            raise AtlasError(f"workers must be at least 1, got {self.workers}")
        if self.lanes is not None and self.lanes < 1:
            raise AtlasError(f"lanes must be at least 1, got {self.lanes}")
        if self.k < 1:
            raise AtlasError(f"k must be at least 1, got {self.k}")
        if self.norm not in NORMS:
            raise AtlasError(f"unknown normalisation {self.norm!r}: choose from {', '.join(NORMS)}")
        if self.dtype not in DTYPES:
            raise AtlasError(f"unknown dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        if self.block_size < 1:
            raise AtlasError(f"block size must be positive, got {self.block_size}")
        check_name(self.name)

    def as_dict(self) -> dict:
        return config_dict(self)


def check_name(name: str | None) -> None:
    """A `--name` for a model in the outputs must be safe in a path and a hive partition value."""
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise AtlasError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-'")


def config_dict(cfg) -> dict:
    """A job config, JSON-ready, for the outputs' metadata."""
    d = asdict(cfg)
    d["out"] = str(d["out"])
    return d
