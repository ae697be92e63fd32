"""Turn whatever the user typed (alias, folder, .gguf file, cached hub id) into a `WeightSource`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import AtlasError
from pipeline.sources.embedded import ALIASES

if TYPE_CHECKING:
    from pipeline.sources.base import WeightSource

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec resolved to a local path, with the id and slug that name it in outputs."""

    spec: str
    model_id: str
    slug: str
    path: Path
    sha256: str | None = None  # what the file must hash to (a packaged model's cached copy), or unknown


def resolve(spec: str) -> ResolvedModel:
    """Find the local files behind a model spec; one clear error when there are none."""
    if spec in ALIASES:
        model_id, locate = ALIASES[spec]
        return ResolvedModel(spec, model_id, spec, *locate())
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f"; did you mean the file {ggufs[0]}?" if ggufs else ""
            raise AtlasError(f"{path}: not a model folder (no config.json){hint}")
        name = path.resolve().name
        slug_base = name.removesuffix(".gguf") if path.is_file() else name
        return ResolvedModel(spec, str(path), slugify(slug_base), path)
    if spec.endswith(".gguf") or "/" not in spec or spec.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(spec):
        raise AtlasError(f"no such model {spec!r}: give a model folder, a .gguf file, a hub id in the local "
                         f"cache, or one of the aliases {', '.join(ALIASES)}")
    from pipeline.sources.hub import cached_snapshot

    return ResolvedModel(spec, spec, slugify(spec.replace("/", "--")), cached_snapshot(spec))


def slugify(name: str) -> str:
    """A model name that is safe in a path and a hive partition value."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"


def open_source(path: Path) -> WeightSource:
    """Open a resolved path with the reader its format needs."""
    if path.is_file():
        from pipeline.sources.gguf import GGUFSource

        if path.suffix != ".gguf":
            raise AtlasError(f"{path}: unsupported file type; give a .gguf file or a model folder")
        return GGUFSource(path)
    from pipeline.sources.safetensors import SafetensorsSource

    return SafetensorsSource(path)
