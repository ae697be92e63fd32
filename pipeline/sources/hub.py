"""Hub ids resolved offline, from the local Hugging Face cache only: never a network call."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import AtlasError

_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
             "*.model", "vocab.json", "merges.txt", "generation_config.json"]


def cached_snapshot(repo_id: str) -> Path:
    """The cached snapshot folder of `repo_id`, or a one-line error saying it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read at call time: the library reads it at import
    try:
        folder = snapshot_download(repo_id, local_files_only=True, allow_patterns=_PATTERNS, cache_dir=cache_dir)
    except LocalEntryNotFoundError:
        where = cache_dir or "the Hugging Face cache"
        raise AtlasError(f"{repo_id} is not in {where}; download it first "
                         f"(`hf download {repo_id}`) or give a local folder") from None
    return Path(folder)
