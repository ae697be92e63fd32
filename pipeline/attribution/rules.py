"""Backward rule sets, installed on one live Hugging Face model inside a `with`, always restored.

A `RuleSet` is five independent switches; each defines a backward, the forward stays bit-identical to
HF's eager attention (shared/methods/attnlrp.md, "one rule set, three presets"):
- frozen_norm: every RMSNorm's per-token σ is a constant in backward, ∂̃L/∂x = γ ⊙ ∂L/∂y / σ, γ = weight
  (`1 + weight` for Gemma) — GIM rule 2 (Edin et al. 2025); AttnLRP's identity rule on normalisation.
- qkv_split: q and k receive 1/4, v 1/2 of their gradient — GIM rule 3; AttnLRP's uniform rule on
  Q·Kᵀ and A·V (Achtibat et al. 2024, Eq. 7).
- gate_up_split: the gate and up branches of the gated MLP each receive 1/2 — GIM rule 4; uniform rule.
- softmax: exact | temperature (GIM rule 1, T = 2) | constant (CP-LRP); see functions.py.
- identity_activation: the MLP activation passes gradient × act(x)/x — AttnLRP's identity rule (Eq. 9).

How it is installed (no global monkey-patching): a custom attention function is registered in
transformers' `AttentionInterface` (with the eager mask builder under the same name, else it gets no
causal mask), the model is switched to it with `set_attn_implementation` and switched back on exit;
forward hooks on norms, gate/up projections and activations apply the other rules. No silent
fallback: every forward of the model checks that each hooked module and each attention module was
reached, and each frozen norm checks that it reproduces its module's output (else the gain rule is wrong).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from pipeline.attribution import layers as L
from pipeline.attribution.functions import SOFTMAX_MODES, frozen, scale_grad, softmax
from pipeline.errors import AtlasError
from pipeline.live.hooks import mlps

ATTENTION_NAME = "neuron_atlas_rules"


@dataclass(frozen=True)
class RuleSet:
    """Which backward modifications are on; all off is the ordinary gradient."""

    name: str
    frozen_norm: bool = False
    qkv_split: bool = False
    gate_up_split: bool = False
    softmax: str = "exact"
    temperature: float = 2.0
    identity_activation: bool = False

    def __post_init__(self) -> None:
        if self.softmax not in SOFTMAX_MODES:
            raise AtlasError(f"rule set {self.name}: softmax rule {self.softmax!r} not in {', '.join(SOFTMAX_MODES)}")
        if self.temperature <= 0:
            raise AtlasError(f"rule set {self.name}: softmax temperature must be positive, got {self.temperature}")


PLAIN = RuleSet("plain")
GIM = RuleSet("gim", frozen_norm=True, qkv_split=True, gate_up_split=True, softmax="temperature")
ATTNLRP = RuleSet("attnlrp", frozen_norm=True, qkv_split=True, gate_up_split=True, identity_activation=True)
# CP-LRP (Ali et al. 2022): A is a constant, so A·V is linear in V and V keeps its whole gradient.
CP_LRP = RuleSet("cp-lrp", frozen_norm=True, gate_up_split=True, softmax="constant", identity_activation=True)
PRESETS: dict[str, RuleSet] = {r.name: r for r in (PLAIN, GIM, ATTNLRP, CP_LRP)}


def preset(name: str) -> RuleSet:
    """The named rule set, or a one-line error listing the known names."""
    if name not in PRESETS:
        raise AtlasError(f"unknown rule set {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


class _Installation:
    """One model's installed rules: which modules must be reached by every forward, and which were."""

    def __init__(self, model: nn.Module, rules: RuleSet) -> None:
        self.rules = rules
        self.names = {id(m): name for name, m in model.named_modules()}
        self.expected: set[int] = set()
        self.reached: set[int] = set()

    def expect(self, module: nn.Module) -> None:
        self.expected.add(id(module))

    def reach(self, module: nn.Module) -> None:
        self.reached.add(id(module))

    def verify(self) -> None:
        """Raise if this forward bypassed a module the rules act on (the rule would silently not apply)."""
        missed = self.expected - self.reached
        self.reached = set()
        if missed:
            example = min(self.names.get(i, "?") for i in missed)
            raise AtlasError(f"rule set {self.rules.name} did not take effect on {len(missed)} module(s), e.g. "
                             f"{example}: the forward pass bypassed them")


_ACTIVE: dict[int, _Installation] = {}  # id(attention module) -> its model's installation


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Key/value heads repeated for grouped-query attention, `[b, kv_heads * groups, seq, d_head]`."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               softcap: float | None = None, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """HF eager attention, value for value, with the installed softmax and q/k/v gradient rules."""
    inst = _ACTIVE.get(id(module))
    if inst is None:
        raise AtlasError(f"{ATTENTION_NAME} attention called on a module without installed rules")
    if kwargs.get("s_aux") is not None:
        raise AtlasError("attention sinks (s_aux) are not supported by the attribution rules")
    if attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True):
        raise AtlasError("no causal mask reached the rules' attention function")
    if dropout and module.training:
        raise AtlasError("attribution rules need the model in eval mode (dropout is on)")
    rules = inst.rules
    inst.reach(module)
    if rules.qkv_split:  # before repeating k/v, so each kv head's gradient is split once
        query, key, value = scale_grad(query, 0.25), scale_grad(key, 0.25), scale_grad(value, 0.5)
    key = _repeat_kv(key, module.num_key_value_groups)  # [b, heads, seq_k, d_head]
    value = _repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * (module.head_dim**-0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    pattern = softmax(scores, rules.softmax, rules.temperature).to(query.dtype)  # [b, heads, seq_q, seq_k]
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()  # [b, seq_q, heads, d_head]
    return out, pattern


AttentionInterface.register(ATTENTION_NAME, _attention)
AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def _norm_hook(inst: _Installation, offset: float):
    """Forward hook: the norm's output, with σ frozen in backward (gradient γ/σ)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        work = torch.promote_types(x.dtype, torch.float32)
        xd = x.detach().to(work)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        inv_sigma = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        slope = (module.weight.detach().to(work) + offset) * inv_sigma  # [..., d]
        tol = 8 * max(torch.finfo(output.dtype).eps, torch.finfo(torch.float32).eps)
        scale = output.detach().abs().max().to(work)
        if ((xd * slope) - output.detach().to(work)).abs().max() > tol * scale:
            raise AtlasError(f"frozen-norm rule does not reproduce {inst.names.get(id(module))} "
                             f"(gain offset {offset:g}); the rule would be wrong for this model")
        inst.reach(module)
        return frozen(output, x, slope)

    return hook


def _activation_hook(inst: _Installation):
    """Forward hook: act(x), passing gradient × act(x)/x (zero where x = 0)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].detach()
        slope = torch.where(x != 0, output.detach() / x, torch.zeros_like(x))
        inst.reach(module)
        return frozen(output, args[0], slope)

    return hook


def _split_hook(inst: _Installation, factor: float):
    """Forward hook: the module's output, with its gradient scaled by `factor`."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        inst.reach(module)
        return scale_grad(output, factor)

    return hook


def _norms_to_freeze(model: nn.Module) -> list[nn.Module]:
    """All norm modules, each an RMSNorm with a weight and an epsilon, or a clear error."""
    norms = L.norm_modules(model)
    for norm in norms:
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if "RMSNorm" not in type(norm).__name__ or eps is None or getattr(norm, "weight", None) is None:
            raise AtlasError(f"frozen-norm rule supports RMSNorm modules with weight and eps; "
                             f"found {type(norm).__name__}")
    return norms


def _install_hooks(model: nn.Module, rules: RuleSet, inst: _Installation, handles: list) -> None:
    """Register the forward hooks the rule set needs, appending their handles to `handles`."""
    plan: list[tuple[nn.Module, object]] = []
    if rules.frozen_norm:
        offset = L.norm_gain_offset(model)
        plan += [(norm, _norm_hook(inst, offset)) for norm in _norms_to_freeze(model)]
    if rules.gate_up_split or rules.identity_activation:
        for mlp in mlps(model):
            act_fn = getattr(mlp.module, "act_fn", None)
            if mlp.gate is None or mlp.fused_gate_up or not isinstance(act_fn, nn.Module):
                raise AtlasError(f"{type(mlp.module).__name__}: the rules need a gated MLP with separate gate and "
                                 "up projections and an act_fn module")
            if rules.gate_up_split:
                plan += [(mlp.gate, _split_hook(inst, 0.5)), (mlp.up, _split_hook(inst, 0.5))]
            if rules.identity_activation:
                plan.append((act_fn, _activation_hook(inst)))
    for module, hook in plan:
        inst.expect(module)
        handles.append(module.register_forward_hook(hook))
    handles.append(model.register_forward_pre_hook(lambda *_: inst.reached.clear()))
    handles.append(model.register_forward_hook(lambda *_: inst.verify()))


@contextmanager
def installed(model: nn.Module, rules: RuleSet) -> Iterator[None]:
    """Run the model under `rules` inside the block; attention, hooks and state are restored on exit."""
    if not isinstance(model, PreTrainedModel):
        raise AtlasError(f"attribution rules need a Hugging Face PreTrainedModel, got {type(model).__name__}")
    if model.training:
        raise AtlasError("attribution rules need the model in eval mode (call model.eval())")
    attentions = [L.attention(layer) for layer in L.decoder_layers(model)]
    if any(id(a) in _ACTIVE for a in attentions):
        raise AtlasError("attribution rules are already installed on this model")
    inst = _Installation(model, rules)
    previous = model.config._attn_implementation
    handles: list = []
    try:
        for attn in attentions:
            _ACTIVE[id(attn)] = inst
            inst.expect(attn)
        model.set_attn_implementation(ATTENTION_NAME)
        stale = [a for a in attentions if a.config._attn_implementation != ATTENTION_NAME]
        if stale:
            raise AtlasError(f"{type(model).__name__} did not switch to the rules' attention function")
        _install_hooks(model, rules, inst, handles)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for attn in attentions:
            _ACTIVE.pop(id(attn), None)
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
