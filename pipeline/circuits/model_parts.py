"""Which module plays which role in each family, and how each graph node's output is read from them.

A `Layout` per family names, relative to the decoder body and layer, the attention's input norm, the
q/k/v projections (GPT-2 fuses them in one Conv1D `c_attn`, `[d, 3d]`, q | k | v by columns), the
output projection, the MLP's input norm and the optional sandwich norms of Gemma 2/3.
Node outputs (graph.py): the input is the residual entering layer 0 (Gemma's √d scale and GPT-2's
wte + wpe included); head h writes `o_h @ W_O[h]` (o_h = its slice of the o_proj input) — in Gemma's
sandwich, `γ ⊙ o_h / σ(Σ_h o_h)` with σ the RMS of the whole attention output, so the heads still sum
to the block's write; output-projection biases stay in the residual as constants (equal in every
run); an MLP writes its output (after `post_feedforward_layernorm` in Gemma 2/3).
`ungrouped` repeats k/v projections so grouped-query attention has one k/v head per query head.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from pipeline.arch import live_family
from pipeline.circuits.graph import KINDS, Graph
from pipeline.errors import AtlasError


@dataclass(frozen=True)
class Layout:
    """Attribute paths of each role: `layers` and `final_norm` on the body, the rest on a decoder layer."""

    layers: str
    final_norm: str
    attn: str
    attn_norm: str
    qkv: tuple[str, str, str]  # the same module three times where q, k and v are fused
    out: str
    attn_post_norm: str | None
    mlp_norm: str
    mlp: str
    mlp_post_norm: str | None
    norm: str = "rms"  # "rms" | "layer" (LayerNorm: mean subtracted, bias)
    gain_offset: float = 0.0  # Gemma's RMSNorm multiplies by 1 + weight: set from pipeline.arch
    conv1d: bool = False  # GPT-2's Conv1D keeps weights as [in, out]


_LLAMA = Layout("layers", "norm", "self_attn", "input_layernorm",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
                None, "post_attention_layernorm", "mlp", None)
_SANDWICH = replace(_LLAMA, attn_post_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
                    mlp_post_norm="post_feedforward_layernorm")
_GPT2 = Layout("h", "ln_f", "attn", "ln_1", ("attn.c_attn",) * 3, "attn.c_proj", None, "ln_2", "mlp", None,
               norm="layer", conv1d=True)
LAYOUTS: dict[str, Layout] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
                              "gemma": _LLAMA, "gemma2": _SANDWICH,
                              "gemma3_text": _SANDWICH, "gpt2": _GPT2}


@dataclass(frozen=True)
class Block:
    """One decoder layer's modules by role; `qkv_offsets` are the columns where q, k, v start."""

    layer: nn.Module
    attn: nn.Module
    attn_norm: nn.Module
    qkv: tuple[nn.Module, nn.Module, nn.Module]
    qkv_offsets: tuple[int, int, int]
    out: nn.Module
    attn_post_norm: nn.Module | None
    mlp_norm: nn.Module
    mlp: nn.Module
    mlp_post_norm: nn.Module | None


@dataclass(frozen=True)
class Parts:
    """A live model's blocks, final norm and attention shape."""

    family: str
    layout: Layout
    blocks: tuple[Block, ...]
    final_norm: nn.Module
    n_heads: int
    head_dim: int


def _module(layer: nn.Module, path: str | None) -> nn.Module | None:
    return None if path is None else layer.get_submodule(path)


def parts_of(model: nn.Module) -> Parts:
    """The modules of a supported Hugging Face causal LM, by role, or one clear line."""
    family = model.config.model_type
    layout = LAYOUTS.get(family)
    if layout is None:
        raise AtlasError(f"circuits do not support {family!r} models; supported: {', '.join(sorted(LAYOUTS))}")
    layout = replace(layout, gain_offset=live_family(family).norm_offset)  # arch.py knows the convention
    body = model.base_model
    n_heads = model.config.get_text_config().num_attention_heads
    blocks = []
    for layer in body.get_submodule(layout.layers):
        attn = layer.get_submodule(layout.attn)
        qkv = tuple(layer.get_submodule(p) for p in layout.qkv)
        width = n_heads * attn.head_dim
        offsets = (0, width, 2 * width) if qkv[0] is qkv[1] else (0, 0, 0)
        block = Block(layer, attn, _module(layer, layout.attn_norm), qkv, offsets, _module(layer, layout.out),
                      _module(layer, layout.attn_post_norm), _module(layer, layout.mlp_norm),
                      _module(layer, layout.mlp), _module(layer, layout.mlp_post_norm))
        if block.attn_post_norm is not None and getattr(block.out, "bias", None) is not None:
            raise AtlasError(f"{family}: an output-projection bias under a post-attention norm is not supported")
        blocks.append(block)
    return Parts(family, layout, tuple(blocks), body.get_submodule(layout.final_norm), n_heads, blocks[0].attn.head_dim)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype differences and scores are kept in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def qkv_weights(parts: Parts, block: Block, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-head weights `[H, dh, d]` and bias `[H, dh]` of a projection: head h's output is `y @ W[h]ᵀ + b[h]`."""
    t = KINDS.index(kind)
    module, start = block.qkv[t], block.qkv_offsets[t]
    cols = slice(start, start + parts.n_heads * parts.head_dim)
    weight = module.weight[:, cols].t() if parts.layout.conv1d else module.weight[cols]  # [H·dh, d]
    bias = None if module.bias is None else module.bias[cols].view(parts.n_heads, parts.head_dim)
    return weight.reshape(parts.n_heads, parts.head_dim, -1), bias


def out_weights(parts: Parts, block: Block) -> torch.Tensor:
    """Per-head output projection `[H, dh, d]`: head h writes `o_h @ W[h]`."""
    weight = block.out.weight if parts.layout.conv1d else block.out.weight.t()  # [H·dh, d]
    return weight.reshape(parts.n_heads, parts.head_dim, -1)


def _eps(norm: nn.Module) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


def head_writes(parts: Parts, block: Block, o_in: torch.Tensor, o_out: torch.Tensor) -> torch.Tensor:
    """Each head's write to the residual, `[H, B, S, d]` in the work dtype, from the o_proj input and output."""
    work = work_dtype(o_in.dtype)
    heads = o_in.unflatten(-1, (parts.n_heads, parts.head_dim)).to(work)  # [B, S, H, dh]
    z = torch.einsum("bshe,hed->hbsd", heads, out_weights(parts, block).to(work))
    post = block.attn_post_norm
    if post is not None:
        o = o_out.to(work)
        gain = post.weight.to(work) + parts.layout.gain_offset
        z = z * gain * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + _eps(post))
    return z


def norm_input_grad(parts: Parts, norm: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient at a norm's input `x` `[..., d]` from gradients `g` `[k, ..., d]` at its output, analytically.

    With x̂ = (x − μ)·r, r = (mean((x − μ)²) + ε)^(-1/2) (μ = 0 for RMSNorm) and g_γ = γ ⊙ g:
    ∂L/∂x = r·(g_γ − mean(g_γ) − x̂·mean(g_γ ⊙ x̂)), the mean(g_γ) term for LayerNorm only.
    """
    work = work_dtype(x.dtype)
    x, g = x.to(work), g.to(work)
    if parts.layout.norm == "layer":
        x = x - x.mean(-1, keepdim=True)
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _eps(norm))
    x_hat = x * r
    g = g * (norm.weight.to(work) + parts.layout.gain_offset)
    if parts.layout.norm == "layer":
        g = g - g.mean(-1, keepdim=True)
    return r * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    """A decoder layer's call arguments with the hidden states replaced by `x`."""
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


@contextmanager
def capture_sources(parts: Parts, graph: Graph, write: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Call `write(first source index, outputs [k, B, S, d])` for every node output of each forward."""
    def on_input(m: nn.Module, args: tuple, kwargs: dict) -> None:
        write(0, hidden_of(args, kwargs)[None])

    def on_heads(block: Block, start: int):
        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            write(start, head_writes(parts, block, args[0], out))

        return hook

    def on_mlp(index: int):
        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            write(index, out[None])

        return hook

    handles = [parts.blocks[0].layer.register_forward_pre_hook(on_input, with_kwargs=True)]
    try:
        for l, block in enumerate(parts.blocks):
            handles.append(block.out.register_forward_hook(on_heads(block, graph.head_sources(l).start)))
            mlp_out = block.mlp if block.mlp_post_norm is None else block.mlp_post_norm
            handles.append(mlp_out.register_forward_hook(on_mlp(graph.mlp_source(l))))
        yield
    finally:
        for handle in handles:
            handle.remove()


def add_destination_hooks(handles: list, parts: Parts, graph: Graph, on_qkv: Callable, at_residual: Callable) -> None:
    """Hook every destination of `graph`, appending the handles: `on_qkv(l, block, module)` makes the forward
    hook of each distinct q/k/v projection, `at_residual(n upstream sources, column)` the forward pre-hook
    of each MLP norm and of the final norm."""
    for l, block in enumerate(parts.blocks):
        for module in dict.fromkeys(block.qkv):  # distinct modules, in q, k, v order
            handles.append(module.register_forward_hook(on_qkv(l, block, module)))
        handles.append(block.mlp_norm.register_forward_pre_hook(
            at_residual(graph.upstream(l, "mlp"), graph.mlp_destination(l))))
    handles.append(parts.final_norm.register_forward_pre_hook(at_residual(len(graph.sources), graph.logits_destination)))


def last_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The last position's logits `[B, vocab]`, without a KV cache."""
    kwargs: dict = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return model(input_ids=input_ids, **kwargs).logits[:, -1]


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters do not require gradients inside the block; their flags are restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _repeated(param: nn.Parameter, head_dim: int, groups: int) -> nn.Parameter:
    """A k/v projection's weight or bias with each head's rows repeated `groups` times (query-head order)."""
    rows = param.detach().unflatten(0, (-1, head_dim)).repeat_interleave(groups, 0).flatten(0, 1)
    return nn.Parameter(rows, requires_grad=param.requires_grad)


@contextmanager
def ungrouped(model: nn.Module) -> Iterator[None]:
    """Inside the block each query head has its own key/value head (k/v projections repeated), so the
    gradient at a projection's head slice is that query head's; the model is restored on exit."""
    parts = parts_of(model)
    saved: list[tuple[nn.Module, int, list[tuple[nn.Module, nn.Parameter, nn.Parameter | None, int]]]] = []
    try:
        for block in parts.blocks:
            groups = getattr(block.attn, "num_key_value_groups", 1)
            if groups == 1:
                continue
            projections = [(p, p.weight, p.bias, p.out_features) for p in block.qkv[1:]]
            saved.append((block.attn, groups, projections))
            for module, weight, bias, _ in projections:
                module.weight = _repeated(weight, parts.head_dim, groups)
                if bias is not None:
                    module.bias = _repeated(bias, parts.head_dim, groups)
                module.out_features = module.weight.shape[0]
            block.attn.num_key_value_groups = 1
        yield
    finally:
        for attn, groups, projections in saved:
            attn.num_key_value_groups = groups
            for module, weight, bias, out_features in projections:
                module.weight, module.out_features = weight, out_features
                if bias is not None:
                    module.bias = bias
