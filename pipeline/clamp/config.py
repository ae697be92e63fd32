"""What a clamping experiment does, as one frozen dataclass validated once; parsers for its options.

No torch here: the CLI builds a `ClampConfig` before anything heavy is imported.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import AtlasError
from pipeline.live import DTYPES, SITES
from pipeline.sources.embedded import DEFAULT_MODEL

POSITIONS = ("all", "prompt", "generated", "last")
DEFAULT_VALUES = (0.0, 5.0, 10.0, 20.0, 50.0)
_NEURON = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*(?::\s*(\S+)\s*)?")


@dataclass(frozen=True)
class NeuronSpec:
    """A neuron to clamp: its own value, or the dose range times `sign` (-1 for a neuron that writes
    the concept when negative, as clamp_candidates.sql reports)."""

    layer: int
    neuron: int
    value: float | None = None
    sign: int = 1

    def doses(self, values: tuple[float, ...]) -> tuple[float, ...]:
        return (self.value,) if self.value is not None else tuple(self.sign * v + 0.0 for v in values)  # + 0.0: no -0.0


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AtlasError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise AtlasError(f"{what}: {text!r} is not a finite number")
    return value


def parse_neuron(spec: str) -> NeuronSpec:
    """`L:N` or `L:N:VALUE`, e.g. `23:1413` or `23:1413:50`."""
    m = _NEURON.fullmatch(spec)
    if not m:
        raise AtlasError(f"invalid neuron {spec!r}: expected LAYER:NEURON or LAYER:NEURON:VALUE, e.g. 23:1413:50")
    value = None if m[3] is None else _number(m[3], f"neuron {spec!r}")
    return NeuronSpec(int(m[1]), int(m[2]), value)


def parse_values(spec: str) -> tuple[float, ...]:
    """A comma list of clamp values, e.g. `0,5,10,20,50`, in the order given."""
    values = tuple(_number(v.strip(), f"values {spec!r}") for v in spec.split(",") if v.strip())
    if not values:
        raise AtlasError(f"invalid values {spec!r}: expected e.g. 0,5,10,20,50")
    return values


def parse_variables(items: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """`NAME=VALUE` pairs for a candidates SQL file."""
    if bad := [v for v in items if "=" not in v or not v.split("=", 1)[0]]:
        raise AtlasError(f"{bad[0]!r} is not NAME=VALUE")
    return tuple(tuple(v.split("=", 1)) for v in items)  # type: ignore[misc]


@dataclass(frozen=True)
class ClampConfig:
    """Everything that decides what `atlas clamp` measures; stored in its output's metadata."""

    model: str = DEFAULT_MODEL
    out: Path = Path("outputs")
    neurons: tuple[NeuronSpec, ...] = ()
    candidates: str | None = None  # a sql/ file name or path whose rows have `spec` (and `sign`) columns
    variables: tuple[tuple[str, str], ...] = ()
    top: int = 5
    values: tuple[float, ...] = DEFAULT_VALUES
    site: str = "act"
    positions: str = "all"
    prompts: Path | None = None  # probability mode
    targets: tuple[str, ...] = ()
    ask: str | None = None  # generation mode
    samples: int = 20
    max_new_tokens: int = 40
    temperature: float = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if bool(self.neurons) == (self.candidates is not None):
            raise AtlasError("give the neurons to clamp: --neuron L:N[:VALUE] (repeatable) or --candidates FILE.sql")
        if self.variables and self.candidates is None:
            raise AtlasError("--var sets variables of a --candidates SQL file; there is none")
        if (self.prompts is None) == (self.ask is None):
            raise AtlasError("choose one mode: --prompts FILE (probability of --target) or --ask TEXT (generation)")
        if not self.words:
            raise AtlasError("--target WORD is needed (or --var concept=WORD with --candidates)")
        if self.mode == "probability" and self.positions == "generated":
            raise AtlasError("--positions generated needs generation mode (--ask); --prompts generates nothing")
        checks = [(self.site in SITES, f"unknown site {self.site!r}: choose from {', '.join(SITES)}"),
                  (self.positions in POSITIONS,
                   f"unknown positions {self.positions!r}: choose from {', '.join(POSITIONS)}"),
                  (self.dtype in DTYPES, f"unknown dtype {self.dtype!r}: choose from {', '.join(DTYPES)}"),
                  (bool(self.values), "--values needs at least one value"),
                  (self.top >= 1, f"--top must be at least 1, got {self.top}"),
                  (self.samples >= 1, f"--samples must be at least 1, got {self.samples}"),
                  (self.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {self.max_new_tokens}"),
                  (self.temperature > 0, f"--temperature must be positive, got {self.temperature}")]
        if failed := [message for ok, message in checks if not ok]:
            raise AtlasError(failed[0])

    @property
    def mode(self) -> str:
        return "probability" if self.prompts is not None else "generation"

    @property
    def words(self) -> tuple[str, ...]:
        """The concept measured: the --target words, else the candidates' `concept` variable."""
        return self.targets or tuple(value for name, value in self.variables if name == "concept")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(out=str(self.out), prompts=None if self.prompts is None else str(self.prompts))
        return d
