"""The torch device a command asked for, checked once for every job that computes."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import AtlasError

if TYPE_CHECKING:
    import torch


def torch_device(device: str) -> torch.device:
    """A torch device that exists on this machine, or one clear line."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AtlasError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AtlasError("--device cuda was asked for, but torch sees no CUDA device here")
    return dev
