"""Estimators on tiny real models (float64): references written out with plain autograd and hooks."""
from __future__ import annotations

import pytest
import torch

from pipeline.attribution import estimators as E
from pipeline.attribution import layers as L
from pipeline.attribution import rules as R
from pipeline.attribution.targets import Target, space_baseline, token_id
from pipeline.errors import AtlasError
from tests import tiny_models

CLEAN, CORRUPTED = "The dog drinks water from the river", "The cat drinks water from the river"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`tiny(family, n_layers)`: a float64 tiny model and its tokenizer."""
    cache: dict[tuple, tuple] = {}

    def build(family: str, n_layers: int = 3) -> tuple:
        if (family, n_layers) not in cache:
            kind = "sentencepiece" if family.startswith("gemma") else "bytelevel"
            tokenizer = tiny_models.build_tokenizer(tmp_path_factory.mktemp(family), kind)
            model = tiny_models.make_hf_model(family, tokenizer, n_layers=n_layers, dtype=torch.float64)
            cache[family, n_layers] = (model, tokenizer)
        return cache[family, n_layers]

    return build


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


def _top_token(model, ids: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(ids).logits[0, -1].argmax())


def _reference(model, ids: torch.Tensor, target: Target) -> tuple:
    """Embeddings, neuron activations and their plain gradients, by autograd on eager attention."""
    model.set_attn_implementation("eager")
    try:
        embeds = L.input_embeddings(model, ids).detach().requires_grad_(True)
        with E.capture_neurons(model) as acts:
            value = target(model(inputs_embeds=embeds).logits)[0]
        grads = torch.autograd.grad(value, [embeds, *acts])
    finally:
        model.set_attn_implementation("sdpa")
    return embeds.detach()[0], [a.detach()[0] for a in acts], grads[0][0], [g[0] for g in grads[1:]]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal up to HF's fp32 RMSNorm and softmax inside a float64 model (measured ≤ 3.1e-6 relative)."""
    return bool((a - b).abs().max() <= tol * b.abs().max())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("corrupted", [False, True], ids=["grad_x_act", "eap"])
def test_one_step_scores_are_plain_gradient_times_difference(tiny, family, corrupted):
    model, tokenizer = tiny(family)
    ids, bad = _ids(tokenizer, CLEAN), _ids(tokenizer, CORRUPTED)
    assert ids.shape == bad.shape
    target = Target(_top_token(model, ids))
    got = E.attribute(model, ids, target, E.method("grad_x_act"), baseline_ids=bad if corrupted else None)
    embeds, acts, grad_e, grad_h = _reference(model, ids, target)
    base_embeds = L.input_embeddings(model, bad)[0] if corrupted else torch.zeros_like(embeds)
    with torch.no_grad(), E.capture_neurons(model) as base_acts:
        model(bad)
    base_acts = [a[0] for a in base_acts] if corrupted else [torch.zeros_like(a) for a in acts]
    assert _close(got.tokens, ((embeds - base_embeds) * grad_e).sum(-1))
    expected = torch.stack([((a - b) * g).sum(0) for a, b, g in zip(acts, base_acts, grad_h)])
    assert got.neurons.shape == (3, 48)
    assert _close(got.neurons, expected)
    assert (got.baseline_metric is not None) == corrupted


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_integrated_gradients_completeness_error_is_the_step_error(tiny, family):
    """Σ scores − (f(x) − f(x')) is the right Riemann sum's error, O(1/m): ×4 steps, at least ÷3 error."""
    model, tokenizer = tiny(family, n_layers=2)
    ids = _ids(tokenizer, "The dog drinks water")
    baseline, target = space_baseline(tokenizer, ids), Target(_top_token(model, ids))
    errors = {}
    for steps in (64, 256):
        got = E.attribute(model, ids, target, E.method("ig", steps), baseline_ids=baseline, batch_size=64)
        gap = got.metric - got.baseline_metric
        errors[steps] = (float(got.tokens.sum()) - gap) / abs(gap)
    assert abs(errors[256]) < 1e-2  # measured: llama 1.37 % → 0.24 %, gemma3 0.89 % → 0.22 %
    assert abs(errors[256]) < abs(errors[64]) / 3


def test_difference_targets(tiny):
    model, tokenizer = tiny("llama")
    ids = _ids(tokenizer, CLEAN)
    top = _top_token(model, ids)
    one = {t: E.attribute(model, ids, Target(t), E.method("grad_x_act")) for t in (top, 5)}
    diff = E.attribute(model, ids, Target(top, foil=5, kind="logit_diff"), E.method("grad_x_act"))
    assert _close(diff.tokens, one[top].tokens - one[5].tokens)
    assert diff.metric == pytest.approx(one[top].metric - one[5].metric)
    prob = E.attribute(model, ids, Target(top, foil=5, kind="prob_diff"), E.method("gim"))
    with torch.no_grad():
        p = torch.softmax(model(ids).logits[0, -1].float(), -1)
    assert prob.metric == pytest.approx(float(p[top] - p[5]), rel=1e-5)


def test_methods_and_mean_reference(tiny):
    model, tokenizer = tiny("qwen2")
    ids = _ids(tokenizer, CLEAN)
    prompts = [ids, _ids(tokenizer, CORRUPTED), _ids(tokenizer, "Paris is the capital of France.")]
    means = E.neuron_means(model, prompts)
    with torch.no_grad(), E.capture_neurons(model) as acts:
        for p in prompts:
            model(p)
    assert torch.allclose(means, torch.stack([torch.cat([a[0] for a in acts[i::3]]).mean(0) for i in range(3)]).float())
    target = Target(_top_token(model, ids))
    plain = E.attribute(model, ids, target, E.method("grad_x_act"))
    centred = E.attribute(model, ids, target, E.method("grad_x_act"), neuron_reference=means)
    assert _close(plain.tokens, centred.tokens) and not _close(plain.neurons, centred.neurons)
    for name in E.METHOD_NAMES:
        got = E.attribute(model, ids, target, E.method(name, steps=3), baseline_ids=space_baseline(tokenizer, ids))
        assert torch.isfinite(got.tokens).all() and torch.isfinite(got.neurons).all()
    assert E.method("ig", 7).steps == 7 and E.method("gim", 7).steps == 1
    assert E.method("attnlrp").rules is R.ATTNLRP


def test_bad_input_is_one_clear_line(tiny):
    model, tokenizer = tiny("llama")
    ids = _ids(tokenizer, CLEAN)
    with pytest.raises(AtlasError, match="longer than the model's context"):
        E.attribute(model, ids.repeat(1, 30), Target(1), E.method("gim"))
    with pytest.raises(AtlasError, match="must match"):
        E.attribute(model, ids, Target(1), E.method("gim"), baseline_ids=ids[:, :-1])
    with pytest.raises(AtlasError, match="no token"):
        token_id(tokenizer, "")
    with pytest.raises(AtlasError, match="unknown attribution method"):
        E.method("shap")
    with pytest.raises(AtlasError, match="needs a foil"):
        Target(3, kind="prob_diff")
    assert token_id(tokenizer, " Paris") == tokenizer.encode(" Paris")[0]
