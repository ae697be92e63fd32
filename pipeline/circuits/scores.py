"""EAP and EAP-IG edge scores (Hanna et al. 2024, §3) on a live Hugging Face model.

s(u→v) = Σ_examples Σ_positions Δ_u · ∂L/∂(input of v), with Δ_u = z_u(corrupted) − z_u(clean) and
L = −metric summed over the batch: the first-order change of L when the edge is patched to its
corrupted value, so a positive score means the edge carries the clean behaviour. EAP takes the gradient
at the clean input; EAP-IG ("inputs") averages it over m points e' + (k/m)(e − e'), k = 1..m, where only
the residual entering layer 0 moves from the corrupted (e') to the clean (e) embedding.

Memory: one buffer Δ `[n_sources, B, S, d]` filled by two no-grad passes; backward hooks fold gradients
into the `[n_sources, n_destinations]` matrix as they arrive. A head's q/k/v gradient is read at its
projection's output slice (k/v un-grouped), mapped to the norm's output by the head's weight slice and
through the norm analytically — transient `[H, B, S, d]` per projection, no per-head residual copy
kept across layers. MLP and logits inputs: a pre-hook aliases the norm's input, so its gradient is
from the norm path only.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.circuits.graph import KINDS, Graph
from pipeline.circuits.model_parts import (
    Block,
    Parts,
    add_destination_hooks,
    capture_sources,
    frozen,
    last_logits,
    norm_input_grad,
    parts_of,
    qkv_weights,
    ungrouped,
    with_hidden,
    work_dtype,
)
from pipeline.circuits.config import METRICS
from pipeline.errors import AtlasError

METHODS = ("eap", "eap-ig")


@dataclass(frozen=True)
class PairBatch:
    """Clean and corrupted prompts of equal token length (the caller buckets by length; no padding)."""

    clean: torch.Tensor  # [B, S] token ids
    corrupted: torch.Tensor  # [B, S]
    target: torch.Tensor  # [B] token ids
    foil: torch.Tensor  # [B]

    def __post_init__(self) -> None:
        if self.clean.ndim != 2 or self.clean.shape != self.corrupted.shape:
            raise AtlasError(f"clean and corrupted prompts must be [batch, seq] of equal token length, got "
                             f"{tuple(self.clean.shape)} and {tuple(self.corrupted.shape)}")
        if self.target.shape != (len(self.clean),) or self.foil.shape != (len(self.clean),):
            raise AtlasError(f"target and foil need one token per pair ({len(self.clean)}), got "
                             f"{tuple(self.target.shape)} and {tuple(self.foil.shape)}")


def metric_value(logits_last: torch.Tensor, batch: PairBatch, metric: str,
                 clean_logits_last: torch.Tensor | None = None) -> torch.Tensor:
    """The metric per pair `[B]`, higher = more of the clean behaviour; `kl` is −KL(clean ‖ this)."""
    logits = logits_last.to(work_dtype(logits_last.dtype))
    rows = torch.arange(len(logits), device=logits.device)
    if metric == "logit_diff":
        return logits[rows, batch.target] - logits[rows, batch.foil]
    if metric == "prob_diff":
        probs = logits.softmax(-1)
        return probs[rows, batch.target] - probs[rows, batch.foil]
    if metric == "kl":
        if clean_logits_last is None:
            raise AtlasError("the kl metric needs the clean run's logits")
        log_p = clean_logits_last.to(logits.dtype).log_softmax(-1)
        return -(log_p.exp() * (log_p - logits.log_softmax(-1))).sum(-1)
    raise AtlasError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def check_model(model: nn.Module, graph: Graph) -> Parts:
    """The model's parts, or one clear line for a model in training mode (dropout would make runs differ)
    or a graph of another shape."""
    if model.training:
        raise AtlasError("circuits need the model in eval mode (call model.eval())")
    parts = parts_of(model)
    if (len(parts.blocks), parts.n_heads) != (graph.n_layers, graph.n_heads):
        raise AtlasError(f"the graph is for {graph.n_layers} layers × {graph.n_heads} heads, the model has "
                         f"{len(parts.blocks)} × {parts.n_heads}")
    return parts


def source_differences(model: nn.Module, parts: Parts, graph: Graph,
                       batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Δ = z(corrupted) − z(clean) `[n_sources, B, S, d]`, the clean last logits and the clean input residual."""
    shape = (len(graph.sources), *batch.clean.shape, model.config.get_text_config().hidden_size)
    delta = torch.zeros(shape, dtype=work_dtype(model.dtype), device=batch.clean.device)
    with torch.no_grad():
        with capture_sources(parts, graph, lambda i, z: delta[i: i + len(z)].sub_(z)):
            clean_last = last_logits(model, batch.clean)
        clean_input = -delta[0]
        with capture_sources(parts, graph, lambda i, z: delta[i: i + len(z)].add_(z)):
            last_logits(model, batch.corrupted)
    return delta, clean_last, clean_input


def qkv_input_grad(parts: Parts, block: Block, kind: str, x: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor:
    """Gradient at the attention norm's input `x` `[B, S, d]` through each head's `kind` projection alone,
    `[H, B, S, d]`, from the gradient `g_out` `[B, S, H·dh]` at that projection's output."""
    weight, _ = qkv_weights(parts, block, kind)  # [H, dh, d]
    work = work_dtype(x.dtype)
    g_heads = g_out.unflatten(-1, (parts.n_heads, parts.head_dim)).to(work)  # [B, S, H, dh]
    g_normed = torch.einsum("bshe,hed->hbsd", g_heads, weight.to(work))
    return norm_input_grad(parts, block.attn_norm, x, g_normed)


@contextmanager
def _gradient_hooks(parts: Parts, graph: Graph, delta: torch.Tensor, scores: torch.Tensor, weight: float,
                    start: torch.Tensor) -> Iterator[None]:
    """During the forward inside the block, feed `start` into layer 0 and arrange for the backward to add
    `weight · Σ Δ_u · grad_v` into `scores` at every destination."""
    flat = delta.flatten(1)  # [n_sources, B·S·d]
    attn_inputs: dict[int, torch.Tensor] = {}

    def fold(n: int, columns: slice | int, grads: torch.Tensor) -> None:  # grads [k, B, S, d]
        added = weight * (flat[:n] @ grads.to(flat.dtype).flatten(1).T)  # [n, k]
        scores[:n, columns] += added[:, 0] if isinstance(columns, int) else added

    def on_qkv(l: int, block: Block, module: nn.Module):
        kinds = [(k, block.qkv_offsets[t]) for t, k in enumerate(KINDS) if block.qkv[t] is module]
        width = parts.n_heads * parts.head_dim

        def fold_qkv(g: torch.Tensor) -> None:
            for kind, offset in kinds:
                g_x = qkv_input_grad(parts, block, kind, attn_inputs[l], g[..., offset: offset + width])
                fold(graph.upstream(l, "attn"), graph.qkv_destinations(l, kind), g_x)

        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            out.register_hook(fold_qkv)

        return hook

    def alias(n: int, column: int):
        def hook(m: nn.Module, args: tuple) -> tuple:
            x = args[0].view_as(args[0])
            x.register_hook(lambda g: fold(n, column, g[None]))
            return (x, *args[1:])

        return hook

    handles = [parts.blocks[0].layer.register_forward_pre_hook(
        lambda m, args, kwargs: with_hidden(args, kwargs, start), with_kwargs=True)]
    try:
        for l, block in enumerate(parts.blocks):
            handles.append(block.attn_norm.register_forward_pre_hook(
                lambda m, args, l=l: attn_inputs.__setitem__(l, args[0].detach())))
        add_destination_hooks(handles, parts, graph, on_qkv, alias)
        yield
    finally:
        for handle in handles:
            handle.remove()


def edge_scores(model: nn.Module, graph: Graph, batch: PairBatch, method: str, metric: str,
                steps: int = 5) -> torch.Tensor:
    """[n_sources, n_destinations] float32, summed over the batch (not averaged), 0 where not valid;
    method 'eap' | 'eap-ig'."""
    if method not in METHODS:
        raise AtlasError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if metric not in METRICS:
        raise AtlasError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if steps < 1:
        raise AtlasError(f"EAP-IG needs at least one step, got {steps}")
    parts = check_model(model, graph)
    with ungrouped(model), frozen(model):
        delta, clean_last, clean_input = source_differences(model, parts, graph, batch)
        scores = torch.zeros(graph.valid.shape, dtype=delta.dtype, device=delta.device)
        alphas = [1.0] if method == "eap" else [k / steps for k in range(1, steps + 1)]
        for alpha in alphas:
            # e' + α(e − e') = e + (1 − α)Δ_input; exactly e at α = 1
            start = (clean_input + (1 - alpha) * delta[0]).to(model.dtype).requires_grad_(True)
            with torch.enable_grad(), _gradient_hooks(parts, graph, delta, scores, 1 / len(alphas), start):
                loss = -metric_value(last_logits(model, batch.clean), batch, metric, clean_last).sum()
                loss.backward()
    return (scores * graph.valid.to(scores.device)).float()
