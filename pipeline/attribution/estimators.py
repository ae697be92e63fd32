"""Estimators: a rule set's (modified) gradient times an activation difference, for tokens and neurons.

One routine serves every method. With input embeddings e, baseline embeddings e' (a baseline or
corrupted prompt of the same length; zero if none) and m steps, the gradient is averaged along the
straight path of the *inputs* (right Riemann sum, EAP-IG's "inputs" form, Hanna et al. 2024):
    ḡ(z) = (1/m) Σ_{k=1..m} ∂̃f/∂z at e' + (k/m)(e − e'),
- token score of position t: Σ_d (e_td − e'_td) ḡ(e)_td. With m > 1 this is integrated gradients
  (completeness: Σ_t scores ≈ f(e) − f(e'), error O(1/m)); with m = 1 it is gradient × (input − baseline),
  GIM's token score under the GIM rules and AttnLRP's input relevance e·g̃ under its rules with no baseline.
- neuron score of (layer, neuron): Σ_t (h_t − h'_t) ḡ(h)_t on the MLP activation h (the input of
  down_proj), h' = its value on the baseline run (EAP with m = 1 on a corrupted prompt, EAP-IG with
  m > 1), a given mean activation, or 0 with no baseline and m = 1 (gradient × activation; AttnLRP's
  latent relevance h·g̃).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.attribution import layers as L
from pipeline.attribution.config import METHOD_NAMES
from pipeline.attribution.rules import ATTNLRP, GIM, PLAIN, RuleSet, installed
from pipeline.attribution.targets import Target
from pipeline.errors import AtlasError
from pipeline.live.hooks import mlps


@dataclass(frozen=True)
class Method:
    """An attribution method: a backward rule set and a number of integration steps."""

    name: str
    rules: RuleSet
    steps: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise AtlasError(f"method {self.name}: steps must be at least 1, got {self.steps}")


def method(name: str, steps: int = 5) -> Method:
    """A named method; `steps` matters only for integrated gradients."""
    rules = {"grad_x_act": PLAIN, "ig": PLAIN, "gim": GIM, "attnlrp": ATTNLRP}.get(name)
    if rules is None:
        raise AtlasError(f"unknown attribution method {name!r}; known: {', '.join(METHOD_NAMES)}")
    return Method(name, rules, steps if name == "ig" else 1)


@dataclass(frozen=True)
class Attribution:
    """Scores for one prompt: per position, and per (layer, neuron) summed over positions."""

    tokens: torch.Tensor  # [seq]
    neurons: torch.Tensor  # [n_layers, d_ff]
    metric: float  # f(x), the target on the prompt
    baseline_metric: float | None  # f(x'), where a baseline run was made
    activations: torch.Tensor  # [n_layers, d_ff], each neuron's mean activation over the prompt's positions


@contextmanager
def capture_neurons(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect each layer's MLP activation (input of down_proj, `[batch, seq, d_ff]`) in layer order."""
    seen: list[torch.Tensor] = []
    handles = [mlp.down.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for mlp in mlps(model)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _check_length(model: nn.Module, input_ids: torch.Tensor) -> None:
    """One clear line for a prompt longer than the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and input_ids.shape[-1] > limit:
        raise AtlasError(f"prompt of {input_ids.shape[-1]} tokens is longer than the model's context ({limit})")


def _run(model: nn.Module, embeds: torch.Tensor, target: Target) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The metric `[batch]` and each layer's neuron activations `[batch, seq, d_ff]` for some embeddings."""
    with capture_neurons(model) as acts:
        metric = target(model(inputs_embeds=embeds, use_cache=False).logits)
    return metric, list(acts)


def attribute(model: nn.Module, input_ids: torch.Tensor, target: Target, how: Method, *,
              baseline_ids: torch.Tensor | None = None, neuron_reference: torch.Tensor | None = None,
              batch_size: int = 8) -> Attribution:
    """Token and neuron scores of one prompt `[seq]` or `[1, seq]` for `target` under method `how`."""
    ids = input_ids.reshape(1, -1)
    _check_length(model, ids)
    if baseline_ids is not None and baseline_ids.numel() != ids.numel():
        raise AtlasError(f"baseline has {baseline_ids.numel()} tokens, the prompt {ids.numel()}; they must match")
    with torch.no_grad():
        clean = L.input_embeddings(model, ids)  # [1, seq, d_model]
        base = (torch.zeros_like(clean) if baseline_ids is None
                else L.input_embeddings(model, baseline_ids.reshape(1, -1)))
    work = torch.promote_types(clean.dtype, torch.float32)
    with installed(model, how.rules):
        with torch.no_grad():
            metric, acts = _run(model, clean, target)
            base_metric, base_acts = None, None
            if baseline_ids is not None or how.steps > 1:
                base_metric, base_acts = _run(model, base, target)
        grad_e = torch.zeros(clean.shape[1:], dtype=work, device=clean.device)  # [seq, d_model]
        grad_h = [torch.zeros(a.shape[1:], dtype=work, device=clean.device) for a in acts]  # L × [seq, d_ff]
        alphas = torch.arange(1, how.steps + 1, dtype=work, device=clean.device) / how.steps
        for chunk in alphas.split(batch_size):
            point = (base + chunk.to(clean.dtype)[:, None, None] * (clean - base)).requires_grad_(True)
            value, hs = _run(model, point, target)
            grads = torch.autograd.grad(value.sum(), [point, *hs])
            grad_e += grads[0].to(work).sum(0)
            for acc, g in zip(grad_h, grads[1:]):
                acc += g.to(work).sum(0)
    if neuron_reference is not None:
        deltas = [a[0].to(work) - ref.to(work) for a, ref in zip(acts, neuron_reference)]
    elif base_acts is not None:
        deltas = [a[0].to(work) - b[0].to(work) for a, b in zip(acts, base_acts)]
    else:
        deltas = [a[0].to(work) for a in acts]
    tokens = ((clean[0] - base[0]).to(work) * grad_e).sum(-1) / how.steps
    neurons = torch.stack([(d * g).sum(0) for d, g in zip(deltas, grad_h)]) / how.steps
    mean_acts = torch.stack([a[0].to(work).mean(0) for a in acts])
    return Attribution(tokens, neurons, float(metric[0]), None if base_metric is None else float(base_metric[0]),
                       mean_acts)


def neuron_means(model: nn.Module, prompts: list[torch.Tensor]) -> torch.Tensor:
    """Mean MLP activation per (layer, neuron) over every position of `prompts`, `[n_layers, d_ff]`."""
    total, count = None, 0
    with torch.no_grad(), capture_neurons(model) as acts:
        for ids in prompts:
            ids = ids.reshape(1, -1)
            _check_length(model, ids)
            acts.clear()
            model(input_ids=ids, use_cache=False)
            sums = torch.stack([a[0].double().sum(0) for a in acts])
            total = sums if total is None else total + sums
            count += ids.shape[1]
    if total is None:
        raise AtlasError("no prompts to average neuron activations over")
    return (total / count).float()
