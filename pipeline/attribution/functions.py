"""Autograd functions with an exact forward and a modified backward: the atoms of every rule set.

- `scale_grad(x, c)`: identity forward, gradient × c. With c = 1/2 at both factors of a product it is
  the uniform rule (AttnLRP, Achtibat et al. 2024, Eq. 7; GIM rules 3 and 4, Edin et al. 2025).
- `softmax(s, mode, T)`: fp32 softmax over the last axis, exactly as HF's eager attention computes it.
  Backward, with g = ∂L/∂A:
    exact        ∂L/∂s = A ⊙ (g − Σ A g)                       (AttnLRP keeps it: its softmax rule,
                                                                 in gradient × input form, is this)
    temperature  ∂̃L/∂s = Aᵀ ⊙ (g − Σ Aᵀ g), Aᵀ = softmax(s / T)  (GIM rule 1, no 1/T factor)
    constant     ∂̃L/∂s = 0                                      (CP-LRP: A is a constant)
  Masked keys carry −inf or the dtype's minimum, so both A and Aᵀ are exactly 0 there: no NaN.
- `frozen(y, x, slope)`: value y, gradient ∂̃y/∂x = slope with slope a constant. Used for the
  frozen-σ norm rule (slope = γ/σ) and the identity rule on activations (slope = act(x)/x, AttnLRP Eq. 9).
"""
from __future__ import annotations

import torch

SOFTMAX_MODES = ("exact", "temperature", "constant")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """`x` unchanged, with its gradient multiplied by `factor` on the way back."""
    return x if factor == 1.0 else _ScaleGrad.apply(x, factor)


class _Softmax(torch.autograd.Function):
    """fp32 softmax with the exact, temperature-T or zero backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, mode: str, temperature: float) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        ctx.mode, ctx.temperature, ctx.in_dtype = mode, temperature, scores.dtype
        ctx.save_for_backward(scores if mode == "temperature" else probs)
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if ctx.mode == "constant":
            return None, None, None
        (saved,) = ctx.saved_tensors
        probs = torch.softmax(saved.float() / ctx.temperature, dim=-1) if ctx.mode == "temperature" else saved
        grad = grad.float()
        out = probs * (grad - (probs * grad).sum(-1, keepdim=True))
        return out.to(ctx.in_dtype), None, None


def softmax(scores: torch.Tensor, mode: str = "exact", temperature: float = 2.0) -> torch.Tensor:
    """Attention pattern `softmax(scores)` in fp32, with the backward `mode` asks for."""
    if mode not in SOFTMAX_MODES:
        raise ValueError(f"softmax mode {mode!r} not in {SOFTMAX_MODES}")
    return _Softmax.apply(scores, mode, temperature)


def frozen(y: torch.Tensor, x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """Bit-identical `y`, whose gradient reaches `x` multiplied element-wise by the constant `slope`."""
    return y.detach() + (x - x.detach()) * slope.detach().to(x.dtype)
