"""Faithfulness by perturbation: does removing what a method ranks first change the prediction?

Tokens, as in the GIM paper's evaluation (Edin et al. 2025; also DeYoung et al.'s ERASER metrics),
with f the target metric and the first and last positions never replaced:
- comprehensiveness = mean over k = 1..K of (f(x) − f(x with its top-k tokens → baseline token)) / |f(x)|
  (higher is better). The paper fixes K = 50 and counts missing k of short prompts as 0; we average over
  the k a prompt has.
- sufficiency = mean over r ∈ {50, 80, 90, 95, 99 %} of (f(x) − f(x with its least important r of
  tokens → baseline token)) / |f(x)| (lower is better).
Neurons: replace the top-k (layer, neuron) activations of a ranking — by score, descending, across all
layers — by zero or by their mean activation at every position, for increasing k; the drop
m(x) − m(ablated) is the curve, its area the trapezoid mean over the steps (each step weighted equally).
Floors: a random ranking, and for neurons the |activation| ranking. All curves of one prompt run as one
batched forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn

from pipeline.attribution.estimators import capture_neurons
from pipeline.attribution.targets import Target
from pipeline.errors import AtlasError
from pipeline.live.hooks import mlps

SUFFICIENCY_RATIOS = (0.5, 0.8, 0.9, 0.95, 0.99)
ABLATION_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ABLATION_MODES = ("zero", "mean")


@dataclass(frozen=True)
class TokenFaithfulness:
    """Comprehensiveness and sufficiency of one prompt's token ranking, with their curves."""

    comprehensiveness: float
    sufficiency: float
    comprehensiveness_curve: tuple[float, ...]  # relative drop after replacing the top 1, 2, ... tokens
    sufficiency_curve: tuple[float, ...]  # relative drop after replacing the bottom r of tokens, per ratio


@dataclass(frozen=True)
class AblationCurve:
    """The target metric's drop as the top-k neurons of a ranking are ablated."""

    ks: tuple[int, ...]
    drops: tuple[float, ...]  # m(x) − m(x with the top-k neurons ablated), per k
    area: float  # trapezoid mean of the drops over the steps
    metric: float  # m(x)


def _metric(model: nn.Module, input_ids: torch.Tensor, target: Target) -> torch.Tensor:
    """The target per row of a batch of prompts, without gradients."""
    with torch.no_grad():
        return target(model(input_ids=input_ids, use_cache=False).logits).double()


def token_faithfulness(model: nn.Module, input_ids: torch.Tensor, target: Target, scores: torch.Tensor,
                       baseline_token: int, *, max_k: int = 50,
                       ratios: tuple[float, ...] = SUFFICIENCY_RATIOS) -> TokenFaithfulness:
    """Comprehensiveness and sufficiency of `scores` `[seq]` for one prompt `[seq]` or `[1, seq]`."""
    ids = input_ids.reshape(-1)
    if scores.shape != ids.shape:
        raise AtlasError(f"{scores.numel()} token scores for a prompt of {ids.numel()} tokens")
    if ids.numel() < 3:
        raise AtlasError("token faithfulness needs a prompt of at least 3 tokens (first and last are kept)")
    ranking = torch.argsort(scores[1:-1].float(), descending=True, stable=True) + 1  # candidate positions
    n = ranking.numel()
    masks = [ranking[:k] for k in range(1, min(max_k, n) + 1)]
    masks += [ranking.flip(0)[: int(r * n)] for r in ratios]
    batch = ids.repeat(len(masks), 1)  # [n_perturbed, seq]
    for row, positions in enumerate(masks):
        batch[row, positions] = baseline_token
    full = _metric(model, ids[None], target)[0]
    if full == 0:
        raise AtlasError("the target metric is exactly 0 on this prompt; relative drops are undefined")
    drops = ((full - _metric(model, batch, target)) / full.abs()).tolist()
    n_comp = len(masks) - len(ratios)
    comp, suff = tuple(drops[:n_comp]), tuple(drops[n_comp:])
    return TokenFaithfulness(sum(comp) / len(comp), sum(suff) / len(suff), comp, suff)


def random_scores(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A seeded random ranking: the floor every method must beat."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def activation_scores(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Σ over positions of |activation| per (layer, neuron), `[n_layers, d_ff]`: the magnitude baseline."""
    with torch.no_grad(), capture_neurons(model) as acts:
        model(input_ids=input_ids.reshape(1, -1), use_cache=False)
    return torch.stack([a[0].abs().sum(0).double() for a in acts])


def neuron_ablation_curve(model: nn.Module, input_ids: torch.Tensor, target: Target, scores: torch.Tensor, *,
                          ks: tuple[int, ...] = ABLATION_STEPS, mode: str = "zero",
                          means: torch.Tensor | None = None) -> AblationCurve:
    """Drop of the target as the top-k neurons by `scores` `[n_layers, d_ff]` are set to zero or their mean."""
    if mode not in ABLATION_MODES:
        raise AtlasError(f"ablation mode {mode!r} not in {', '.join(ABLATION_MODES)}")
    if mode == "mean" and means is None:
        raise AtlasError("mean ablation needs the mean activations (estimators.neuron_means)")
    layers = mlps(model)
    n_layers, d_ff = scores.shape
    if n_layers != len(layers):
        raise AtlasError(f"scores cover {n_layers} layers, the model has {len(layers)}")
    ks = tuple(k for k in ks if k <= scores.numel())
    if not ks:
        raise AtlasError("no ablation step fits the number of neurons")
    order = torch.argsort(scores.reshape(-1).double(), descending=True, stable=True)
    ablate = torch.zeros(len(ks), n_layers * d_ff, dtype=torch.bool)  # [steps, n_layers * d_ff]
    for row, k in enumerate(ks):
        ablate[row, order[:k]] = True
    ablate = ablate.reshape(len(ks), n_layers, d_ff)
    handles = []
    for index, mlp in enumerate(layers):
        down = mlp.down

        def hook(module: nn.Module, args: tuple, index: int = index) -> tuple:
            h = args[0]  # [steps, seq, d_ff]
            fill = means[index].to(h) if mode == "mean" else h.new_zeros(())
            return (torch.where(ablate[:, None, index].to(h.device), fill, h),)

        handles.append(down.register_forward_pre_hook(hook))
    try:
        ablated = _metric(model, input_ids.reshape(1, -1).repeat(len(ks), 1), target)
    finally:
        for handle in handles:
            handle.remove()
    full = float(_metric(model, input_ids.reshape(1, -1), target)[0])
    drops = tuple(full - float(v) for v in ablated)
    area = drops[0] if len(drops) == 1 else sum((a + b) / 2 for a, b in pairwise(drops)) / (len(drops) - 1)
    return AblationCurve(ks, drops, area, full)
