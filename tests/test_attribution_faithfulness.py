"""Faithfulness metrics on a tiny real Llama, against loops that perturb one input at a time."""
from __future__ import annotations

import pytest
import torch

from pipeline.attribution import estimators as E
from pipeline.attribution import faithfulness as F
from pipeline.attribution.targets import Target, space_baseline
from pipeline.errors import AtlasError
from pipeline.live.hooks import mlps
from tests import tiny_models

PROMPT = "The dog drinks water from the river in California"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float64 tiny Llama, its tokenizer, the prompt's ids and a target (its top next token)."""
    tokenizer = tiny_models.build_tokenizer(tmp_path_factory.mktemp("llama"))
    model = tiny_models.make_hf_model("llama", tokenizer, dtype=torch.float64)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        target = Target(int(model(ids).logits[0, -1].argmax()))
    return model, tokenizer, ids, target


def _f(model, ids: torch.Tensor, target: Target) -> float:
    with torch.no_grad():
        return float(target(model(ids).logits)[0])


def test_token_metrics_match_one_at_a_time_reference(tiny):
    model, tokenizer, ids, target = tiny
    space = int(space_baseline(tokenizer, ids)[0, 1])
    scores = E.attribute(model, ids, target, E.method("gim")).tokens
    got = F.token_faithfulness(model, ids, target, scores, space, max_k=4)
    full = _f(model, ids, target)
    inner = torch.argsort(scores[1:-1], descending=True) + 1
    expected_comp = []
    for k in range(1, 5):
        x = ids.clone()
        x[0, inner[:k]] = space
        expected_comp.append((full - _f(model, x, target)) / abs(full))
    assert got.comprehensiveness_curve == pytest.approx(expected_comp, abs=1e-9)
    assert got.comprehensiveness == pytest.approx(sum(expected_comp) / 4)
    expected_suff = []
    for ratio in F.SUFFICIENCY_RATIOS:
        x = ids.clone()
        x[0, inner.flip(0)[: int(ratio * inner.numel())]] = space
        expected_suff.append((full - _f(model, x, target)) / abs(full))
    assert got.sufficiency_curve == pytest.approx(expected_suff, abs=1e-9)


def test_first_and_last_tokens_are_never_replaced(tiny):
    model, _, ids, target = tiny
    scores = torch.zeros(ids.shape[1], dtype=torch.float64)
    scores[0] = scores[-1] = 100.0  # ranked first, yet excluded
    got = F.token_faithfulness(model, ids, target, scores, baseline_token=int(ids[0, 0]), max_k=ids.shape[1])
    assert len(got.comprehensiveness_curve) == ids.shape[1] - 2
    x = ids.clone()
    x[0, 1:-1] = int(ids[0, 0])
    full = _f(model, ids, target)
    assert got.comprehensiveness_curve[-1] == pytest.approx((full - _f(model, x, target)) / abs(full))


@pytest.mark.parametrize("mode", F.ABLATION_MODES)
def test_ablation_curve_matches_one_at_a_time_reference(tiny, mode):
    model, tokenizer, ids, target = tiny
    means = E.neuron_means(model, [ids, tokenizer("Paris is the capital of France.", return_tensors="pt").input_ids])
    scores = E.attribute(model, ids, target, E.method("attnlrp")).neurons
    ks = (1, 3, 10, 144)  # 144 = every neuron of the 3 × 48 model
    got = F.neuron_ablation_curve(model, ids, target, scores, ks=ks, mode=mode, means=means)
    order = torch.argsort(scores.reshape(-1), descending=True)
    full = _f(model, ids, target)
    for k, drop in zip(ks, got.drops):
        chosen = torch.zeros(scores.numel(), dtype=torch.bool)
        chosen[order[:k]] = True
        chosen = chosen.reshape(scores.shape)
        handles = []
        for index, mlp in enumerate(mlps(model)):
            fill = means[index].double() if mode == "mean" else torch.zeros((), dtype=torch.float64)

            def hook(_m, args, index=index, fill=fill, chosen=chosen):
                return (torch.where(chosen[index], fill, args[0]),)

            handles.append(mlp.down.register_forward_pre_hook(hook))
        try:
            assert drop == pytest.approx(full - _f(model, ids, target), abs=1e-9)
        finally:
            for handle in handles:
                handle.remove()
    trapezoid = sum((a + b) / 2 for a, b in zip(got.drops, got.drops[1:])) / 3
    assert got.area == pytest.approx(trapezoid) and got.metric == pytest.approx(full)


def test_baseline_rankings(tiny):
    model, _, ids, _ = tiny
    magnitude = F.activation_scores(model, ids)
    with torch.no_grad(), E.capture_neurons(model) as acts:
        model(ids)
    assert torch.allclose(magnitude, torch.stack([a[0].abs().sum(0) for a in acts]))
    assert torch.equal(F.random_scores((3, 48), seed=1), F.random_scores((3, 48), seed=1))
    assert not torch.equal(F.random_scores((3, 48), seed=1), F.random_scores((3, 48), seed=2))


def test_bad_faithfulness_input(tiny):
    model, _, ids, target = tiny
    with pytest.raises(AtlasError, match="token scores"):
        F.token_faithfulness(model, ids, target, torch.zeros(2), baseline_token=0)
    with pytest.raises(AtlasError, match="needs the mean"):
        F.neuron_ablation_curve(model, ids, target, torch.zeros(3, 48), mode="mean")
    with pytest.raises(AtlasError, match="layers"):
        F.neuron_ablation_curve(model, ids, target, torch.zeros(2, 48))
