"""Run a model with edges cut, and a circuit's faithfulness (Hanna et al. 2024, §2 and §4).

The clean input runs; every destination reads `x − Σ_u cut[u, v] · (z_u(current) − z_u(corrupted))`,
x the residual the destination would read, cut = 1 − keep: with keep = 1 the edge carries the current
run's output, with keep = 0 the corrupted run's (fractional keeps interpolate; the finite-difference
tests use them). Heads read per-(head, q|k|v) residuals: a forward hook on each projection replaces the
head slices of cut heads by `norm(x_{h,t}) @ W_t[h]ᵀ + b_t[h]`, so RoPE, q/k norms, masks and attention
stay transformers' own code; the MLP's input norm and the final norm get pre-hooks.
Faithfulness: F = (m(C) − m(∅)) / (m(full) − m(∅)), m(∅) the corrupted run scored with clean labels.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pipeline.circuits.graph import KINDS, Graph
from pipeline.circuits.model_parts import (
    Block,
    Parts,
    add_destination_hooks,
    capture_sources,
    hidden_of,
    last_logits,
    qkv_weights,
    ungrouped,
    work_dtype,
)
from pipeline.circuits.scores import PairBatch, check_model, metric_value
from pipeline.errors import AtlasError


@contextmanager
def _patch_hooks(parts: Parts, graph: Graph, diff: torch.Tensor, cut: torch.Tensor) -> Iterator[None]:
    """Make every destination read the residual minus `cut`-weighted differences `diff` (filled as the
    forward goes: z(current) − z(corrupted))."""
    flat = diff.flatten(1)  # [n_sources, B·S·d]
    residual: dict[int, torch.Tensor] = {}

    def removed(n: int, weights: torch.Tensor) -> torch.Tensor:  # weights [n, k] -> [k, B, S, d]
        return (weights.T @ flat[:n]).view(weights.shape[1], *diff.shape[1:])

    def on_qkv(l: int, block: Block, module: nn.Module):
        kinds = [(k, block.qkv_offsets[t]) for t, k in enumerate(KINDS) if block.qkv[t] is module]
        n, width = graph.upstream(l, "attn"), parts.n_heads * parts.head_dim

        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            new = None
            for kind, offset in kinds:
                weights = cut[:n, graph.qkv_destinations(l, kind)]  # [n, H]
                heads = weights.any(0).nonzero().flatten()
                if len(heads) == 0:
                    continue
                x = residual[l]
                xs = x.to(flat.dtype) - removed(n, weights[:, heads])  # [k, B, S, d]
                normed = block.attn_norm(xs.to(x.dtype))
                w, b = qkv_weights(parts, block, kind)
                proj = torch.einsum("kbsd,ked->bske", normed, w[heads])  # [B, S, k, dh]
                if b is not None:
                    proj = proj + b[heads]
                new = out.clone() if new is None else new
                new[..., offset: offset + width].unflatten(-1, (parts.n_heads, parts.head_dim))[:, :, heads] = proj
            return new

        return hook

    def reader(n: int, column: int):
        def hook(m: nn.Module, args: tuple) -> tuple | None:
            weights = cut[:n, column: column + 1]
            if not weights.any():
                return None
            x = args[0]
            return ((x.to(flat.dtype) - removed(n, weights)[0]).to(x.dtype), *args[1:])

        return hook

    handles = []
    try:
        for l, block in enumerate(parts.blocks):
            handles.append(block.layer.register_forward_pre_hook(
                lambda m, args, kwargs, l=l: residual.__setitem__(l, hidden_of(args, kwargs)), with_kwargs=True))
        add_destination_hooks(handles, parts, graph, on_qkv, reader)
        yield
    finally:
        for handle in handles:
            handle.remove()


def _patched_and_corrupted(model: nn.Module, graph: Graph, batch: PairBatch,
                           keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last logits of the patched clean run and of the corrupted run, `[B, vocab]` each."""
    parts = check_model(model, graph)
    if tuple(keep.shape) != tuple(graph.valid.shape):
        raise AtlasError(f"keep must be [n_sources, n_destinations] = {tuple(graph.valid.shape)}, "
                         f"got {tuple(keep.shape)}")
    shape = (len(graph.sources), *batch.clean.shape, model.config.get_text_config().hidden_size)
    diff = torch.zeros(shape, dtype=work_dtype(model.dtype), device=batch.clean.device)
    cut = (1 - keep.to(diff.device, diff.dtype)) * graph.valid.to(diff.device)
    with ungrouped(model), torch.no_grad():
        with capture_sources(parts, graph, lambda i, z: diff[i: i + len(z)].sub_(z)):
            corrupted = last_logits(model, batch.corrupted)
        with capture_sources(parts, graph, lambda i, z: diff[i: i + len(z)].add_(z)), \
                _patch_hooks(parts, graph, diff, cut):
            patched = last_logits(model, batch.clean)
    return patched, corrupted


def patched_logits(model: nn.Module, graph: Graph, batch: PairBatch, keep: torch.Tensor) -> torch.Tensor:
    """Last-position logits [B, vocab] of the clean input where every destination sees, per parent, the
    current run's output if (parent, destination) is kept and the corrupted run's output if cut."""
    return _patched_and_corrupted(model, graph, batch, keep)[0]


def faithfulness(model: nn.Module, graph: Graph, batches: list[PairBatch], keep: torch.Tensor,
                 metric: str) -> dict:
    """{'m_circuit','m_full','m_empty','F'} with means over all pairs; F = (m(C) − m(∅)) / (m(full) − m(∅))."""
    totals = {"m_circuit": 0.0, "m_full": 0.0, "m_empty": 0.0}
    pairs = 0
    for batch in batches:
        patched, corrupted = _patched_and_corrupted(model, graph, batch, keep)
        with torch.no_grad():
            clean = last_logits(model, batch.clean)
        for name, logits in (("m_circuit", patched), ("m_full", clean), ("m_empty", corrupted)):
            totals[name] += float(metric_value(logits, batch, metric, clean).sum())
        pairs += len(batch.clean)
    if pairs == 0:
        raise AtlasError("faithfulness needs at least one pair")
    means = {name: total / pairs for name, total in totals.items()}
    span = means["m_full"] - means["m_empty"]
    means["F"] = (means["m_circuit"] - means["m_empty"]) / span if span != 0 else float("nan")
    return means
