"""The `WeightSource` protocol: named tensors read one at a time, plus the config and tokenizer."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

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

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """A new float32 tensor each call, owned by the caller (never a view of a mapping): it may be
        changed in place."""

    def files(self) -> list[Path]: ...

    def token_table(self) -> TokenTable: ...


_HUB_BLOB = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: Path, cache_file: Path | None = None) -> str:
    """SHA-256 of a file's content; reuses the hub cache's blob name or a cached digest when unchanged."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _HUB_BLOB.fullmatch(real.name):
        return real.name  # the Hugging Face cache names LFS blobs by their SHA-256
    st = real.stat()
    key = f"{real}:{st.st_size}:{st.st_mtime_ns}"
    cache = _load_json(cache_file)
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    cache[key] = digest.hexdigest()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=0))
        os.replace(tmp, cache_file)
    return cache[key]


def source_sha256(source: WeightSource, cache_file: Path | None = None) -> str:
    """One digest over every weight file of a source (a single file's digest when there is one)."""
    digests = [(p.name, file_sha256(p, cache_file)) for p in sorted(source.files())]
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{n}:{d}\n" for n, d in digests).encode()).hexdigest()


def _load_json(path: Path | None) -> dict:
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}
