"""The `WeightSource` protocol: named tensors read one at a time, plus the config and tokenizer."""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.errors import AtlasError

if TYPE_CHECKING:
    import torch

    from pipeline.tokens import TokenTable


class WeightSource(Protocol):
    """A checkpoint whose tensors are read lazily, one at a time, as float32 in HF `[out, in]` order."""

    format: str  # "safetensors" | "gguf"
    path: Path  # what the user named: a folder or a file
    model_type: str  # HF config `model_type`, or the GGUF architecture name
    n_layers: int
    config: dict

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, rows: slice | None = None, compact: bool = False) -> torch.Tensor:
        """A new float32 tensor each call, owned by the caller (never a view of a mapping): it may be
        changed in place. `compact`: a tensor stored in bf16 or fp16 comes as stored, exact in float32
        later and half the bytes to move to an accelerator."""

    def files(self) -> list[Path]: ...

    def token_table(self) -> TokenTable: ...


_HUB_BLOB = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: Path, cache_file: Path | None = None) -> str:
    """SHA-256 of a file's content; reuses the hub cache's blob name or a cached digest when unchanged."""
    return _digests([Path(path)], cache_file)[0]


def source_sha256(source: WeightSource, cache_file: Path | None = None, expected: str | None = None) -> str:
    """One digest over every weight file of a source (a single file's digest when there is one), refused
    unless it is `expected` where that is known (a packaged model's cached copy)."""
    files = sorted(source.files())
    digests = _digests(files, cache_file)
    digest = digests[0] if len(digests) == 1 else hashlib.sha256(
        "".join(f"{p.name}:{d}\n" for p, d in zip(files, digests)).encode()).hexdigest()
    if expected is not None and digest != expected:
        raise AtlasError(f"{source.path}: SHA-256 {digest[:16]}…, not the {expected[:16]}… its package ships: "
                         f"a damaged copy; delete it and rerun to have it assembled again")
    return digest


def _digests(paths: list[Path], cache_file: Path | None) -> list[str]:
    """Each file's SHA-256: from its hub blob name, from `cache_file` (keyed by path, size and mtime), or
    read, the shards of a checkpoint in parallel (hashlib releases the GIL), and added to the cache."""
    real = [Path(os.path.realpath(p)) for p in paths]
    keys = [f"{r}:{st.st_size}:{st.st_mtime_ns}" for r, st in ((r, r.stat()) for r in real)]
    cache = _load_json(cache_file)
    known = {k: r.name for k, r in zip(keys, real) if r.parent.name == "blobs" and _HUB_BLOB.fullmatch(r.name)}
    missing = {k: r for k, r in zip(keys, real) if k not in known and k not in cache}
    if missing:
        with ThreadPoolExecutor(min(len(missing), os.cpu_count() or 1)) as pool:
            cache.update(zip(missing, pool.map(_read_sha256, missing.values())))
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=0))
            os.replace(tmp, cache_file)
    return [known.get(k) or cache[k] for k in keys]


def _read_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _load_json(path: Path | None) -> dict:
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}
