"""Load a live transformers model and tokenizer from any spec the atlas accepts, with provenance.

The spec goes through `pipeline.sources.resolve` (alias, model folder, cached hub id, .gguf file), so
an experiment runs on exactly the checkpoint its atlas was built from; the same content hash goes
into its outputs. GGUF files are dequantised by transformers (needs `accelerate`). Float32 on CPU
unless the user picks otherwise. Nothing is ever downloaded.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
import transformers.modeling_gguf_pytorch_utils as gguf_loader

from pipeline import __version__
from pipeline.device import torch_device
from pipeline.errors import AtlasError
from pipeline.live import DTYPES
from pipeline.sources import ResolvedModel, open_source, resolve
from pipeline.sources.base import source_sha256


@dataclass(frozen=True)
class LiveModel:
    """A loaded model in eval mode, its tokenizer, where it came from, and what outputs should record."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    resolved: ResolvedModel
    name: str  # the model's name in the outputs (joins to the atlas tables)
    provenance: dict

    @property
    def device(self) -> torch.device:
        return self.model.device


@contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """transformers' loading bars only when asked for and stderr is a terminal (tqdm's disable=None rule).
    Its GGUF loader draws its own tqdm bar, which transformers' switch does not reach."""
    if show and sys.stderr.isatty():
        yield
        return
    enabled, gguf_bar = transformers.utils.logging.is_progress_bar_enabled(), gguf_loader.tqdm
    transformers.utils.logging.disable_progress_bar()
    gguf_loader.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        gguf_loader.tqdm = gguf_bar
        if enabled:
            transformers.utils.logging.enable_progress_bar()


def load_live(spec: str, *, name: str | None = None, dtype: str = "float32", device: str = "cpu",
              sha256_cache: Path | None = None, progress: bool = True) -> LiveModel:
    """Resolve `spec`, load model and tokenizer offline in `dtype` on `device`, hash the weights."""
    if dtype not in DTYPES:
        raise AtlasError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    dev = torch_device(device)
    resolved = resolve(spec)
    source = open_source(resolved.path)  # refuses unsupported files before transformers tries them
    folder, extra = ((resolved.path.parent, {"gguf_file": resolved.path.name}) if resolved.path.is_file()
                     else (resolved.path, {}))
    try:
        with _progress_bars(progress):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, dtype), local_files_only=True, **extra)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AtlasError(f"{resolved.path}: transformers cannot load it as a causal LM: {first}") from None
    model = model.to(dev).eval()
    config = model.config.get_text_config()
    provenance = {
        "model": name or resolved.slug, "model_id": resolved.model_id, "source_path": str(resolved.path),
        "source_sha256": source_sha256(source, sha256_cache, resolved.sha256), "source_format": source.format,
        "architecture": config.model_type, "n_layers": config.num_hidden_layers,
        "vocab_size": model.get_output_embeddings().weight.shape[0], "dtype": dtype, "device": str(dev),
        "package_version": __version__, "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    return LiveModel(model, tokenizer, resolved, name or resolved.slug, provenance)
