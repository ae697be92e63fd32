"""Where a live Hugging Face decoder keeps its layers, attention, gated MLP and norms.

Private to attribution for now (to be folded into pipeline/live). Supports decoders whose layers have
`self_attn` (dispatching through transformers' AttentionInterface) and a gated `mlp` with separate
`gate_proj`, `up_proj`, `down_proj` and an `act_fn` module: Llama, Mistral, Qwen2/3, Gemma 1/2/3.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.arch import family_for
from pipeline.errors import AtlasError

_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks in order, or a clear error for a model that does not keep them in `.layers`."""
    body = getattr(model, "base_model", model)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise AtlasError(f"{type(model).__name__}: no decoder layers at .base_model.layers; "
                         "attribution supports Llama, Mistral, Qwen2/3 and Gemma-family models")
    return list(layers)


def gated_mlp(layer: nn.Module) -> nn.Module:
    """The layer's gated MLP (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`)."""
    mlp = getattr(layer, "mlp", None)
    missing = [part for part in _MLP_PARTS if not isinstance(getattr(mlp, part, None), nn.Module)]
    if missing:
        raise AtlasError(f"{type(mlp).__name__}: not a gated MLP with separate gate/up projections "
                         f"(missing {', '.join(missing)})")
    return mlp


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
    return family_for(model.config.model_type, "hf").norm_offset


def input_embeddings(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The embeddings the first layer reads (Gemma's √d scale included), `[batch, seq, d_model]`."""
    return model.get_input_embeddings()(input_ids)
