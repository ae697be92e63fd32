"""Where a live Hugging Face decoder keeps its layers, attention and norms (its MLPs: `live.hooks.mlps`).

Supports decoders whose layers have `self_attn` dispatching through transformers' AttentionInterface:
Llama, Mistral, Qwen2/3, Gemma 1/2/3.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.arch import live_family
from pipeline.errors import AtlasError

def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks in order, or a clear error for a model that does not keep them in `.layers`."""
    body = getattr(model, "base_model", model)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise AtlasError(f"{type(model).__name__}: no decoder layers at .base_model.layers; "
                         "attribution supports Llama, Mistral, Qwen2/3 and Gemma-family models")
    return list(layers)


def attention(layer: nn.Module) -> nn.Module:
    """The layer's self-attention module."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or not hasattr(attn, "num_key_value_groups"):
        raise AtlasError(f"{type(layer).__name__}: no self_attn dispatching through transformers' AttentionInterface")
    return attn


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """Every normalisation module of the model (RMSNorm or LayerNorm, by class name)."""
    return [m for m in model.modules() if "Norm" in type(m).__name__]


def norm_gain_offset(model: nn.Module) -> float:
    """What HF checkpoints of this family add to a norm's weight: 1 for Gemma (`1 + weight`), else 0."""
    return live_family(model.config.model_type).norm_offset


def input_embeddings(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The embeddings the first layer reads (Gemma's √d scale included), `[batch, seq, d_model]`."""
    return model.get_input_embeddings()(input_ids)
