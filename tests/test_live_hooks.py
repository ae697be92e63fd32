"""Hook points on tiny real models, checked against references that do not use pipeline.live.hooks:
the unhooked model, the MLP recomputed by hand, a weight copy with the neuron's down column zeroed,
and a forward pass without KV cache."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.clamp.experiment import position_rule
from pipeline.errors import AtlasError
from pipeline.live.hooks import Clamp, captured, clamped, hooked, mlps
from pipeline.live.load import load_live
from pipeline.sources.base import file_sha256
from tests import tiny_models

FAMILIES = ("llama", "qwen2", "gemma3_text", "phi3", "gpt2")
PROMPT = "The dog drinks water from the river"


@pytest.fixture(scope="module")
def live(model_dir):
    """`live(family)`: the tiny model of `family`, loaded once per module."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_live(str(model_dir(family)), progress=False)
        return cache[family]

    return get


def tokens(lm) -> torch.Tensor:
    return lm.tokenizer(PROMPT, return_tensors="pt").input_ids  # [1, P]


def mlp_module(model, family: str, layer: int) -> torch.nn.Module:
    """The layer's MLP, found by hand (not through pipeline.arch)."""
    return (model.transformer.h if family == "gpt2" else model.model.layers)[layer].mlp


def by_hand(mlp: torch.nn.Module, family: str, site: str, neuron: int, value: float, rows: torch.Tensor):
    """The MLP's forward written out, with `site[..., rows, neuron] = value`."""

    def put(t: torch.Tensor, here: str) -> torch.Tensor:
        if here == site:
            t = t.clone()
            t[:, rows, neuron] = value
        return t

    def forward(x: torch.Tensor) -> torch.Tensor:
        if family == "gpt2":
            return mlp.dropout(mlp.c_proj(put(mlp.act(put(mlp.c_fc(x), "up")), "act")))
        if family == "phi3":
            gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
            return mlp.down_proj(put(put(up, "up") * mlp.activation_fn(put(gate, "gate")), "act"))
        return mlp.down_proj(put(mlp.act_fn(put(mlp.gate_proj(x), "gate")) * put(mlp.up_proj(x), "up"), "act"))

    return forward


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_clamped_gives_the_unmodified_logits(live, family):
    lm = live(family)
    ids = tokens(lm)
    with torch.no_grad():
        plain = lm.model(ids).logits
        with clamped(lm.model, []):
            none_clamped = lm.model(ids).logits
        keep_all = {(layer, site): (lambda v, p: None) for layer in range(3) for site in ("act", "up")}
        with hooked(lm.model, keep_all):
            all_hooked = lm.model(ids).logits
    assert torch.equal(plain, none_clamped) and torch.equal(plain, all_hooked)
    assert no_hooks_left(lm.model)


@pytest.mark.parametrize(("family", "site"), [(f, s) for f in FAMILIES for s in ("act", "up", "gate")
                                              if not (f == "gpt2" and s == "gate")])  # GPT-2 has no gate
def test_clamp_equals_the_mlp_recomputed_by_hand(live, family, site):
    lm = live(family)
    ids = tokens(lm)
    rows = torch.ones(ids.shape[1], dtype=torch.bool)
    rows[0] = False  # positions 1.. only, so that the rule is exercised too
    reference = by_hand(mlp_module(lm.model, family, 1), family, site, 7, 3.5, rows)
    handle = mlp_module(lm.model, family, 1).register_forward_hook(lambda m, args, out: reference(args[0]))
    with torch.no_grad():
        try:
            expected = lm.model(ids).logits
        finally:
            handle.remove()
        with clamped(lm.model, [Clamp(1, 7, 3.5)], site, where=lambda pos: pos >= 1):
            got = lm.model(ids).logits
    # 1e-5: the hook and the hand-written MLP reach the activation through different (vectorised) kernels,
    # which on an AVX-512 CPU differ by a few fp32 ulps; the clamp itself moves logits by far more
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - lm.model(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("site", ["act", "up"])
def test_clamp_changes_exactly_the_chosen_value_and_nothing_upstream(live, family, site):
    lm = live(family)
    ids = tokens(lm)

    def capture_all() -> dict[tuple[int, str], torch.Tensor]:
        with captured(lm.model, "act") as act, captured(lm.model, "up") as up, captured(lm.model, "gate") as gate:
            lm.model(ids)
        return {(c.layer, name): c.values for name, caps in (("act", act), ("up", up), ("gate", gate)) for c in caps}

    with torch.no_grad():
        before = capture_all()
        with clamped(lm.model, [Clamp(1, 5, -2.0)], site):
            after = capture_all()
    changed = after[(1, site)]
    assert torch.all(changed[..., 5] == -2.0)
    assert torch.equal(torch.cat([changed[..., :5], changed[..., 6:]], -1),
                       torch.cat([before[(1, site)][..., :5], before[(1, site)][..., 6:]], -1))
    upstream = [(0, "act"), (0, "up"), (0, "gate"), (1, "gate")] + ([(1, "up")] if site == "act" else [])
    assert all(torch.equal(before[key], after[key]) for key in upstream)
    assert not torch.equal(before[(2, "act")], after[(2, "act")])  # downstream does change


@pytest.mark.parametrize("family", FAMILIES)
def test_the_neurons_own_value_reproduces_the_baseline(live, family):
    lm = live(family)
    ids = tokens(lm)
    last = ids.shape[1] - 1
    with torch.no_grad():
        with captured(lm.model, "act", layers=[2]) as caps:
            baseline = lm.model(ids).logits
        own = caps[0].values[0, last, 11].item()
        with clamped(lm.model, [Clamp(2, 11, own)], "act", where=position_rule("last", ids.shape[1])):
            same = lm.model(ids).logits
        with clamped(lm.model, [Clamp(2, 11, own + 1.0)], "act", where=position_rule("last", ids.shape[1])):
            other = lm.model(ids).logits
    assert torch.equal(same, baseline)
    assert not torch.equal(other[0, last], baseline[0, last]) and torch.equal(other[0, :last], baseline[0, :last])


@pytest.mark.parametrize("family", FAMILIES)
def test_clamp_to_zero_equals_ablation_by_zeroed_down_column(live, family):
    lm = live(family)
    ids = tokens(lm)
    ablated = copy.deepcopy(lm.model)
    down = mlp_module(ablated, family, 1).c_proj if family == "gpt2" else mlp_module(ablated, family, 1).down_proj
    with torch.no_grad():
        if family == "gpt2":
            down.weight[9, :] = 0  # Conv1D keeps [in, out]
        else:
            down.weight[:, 9] = 0
        with clamped(lm.model, [Clamp(1, 9, 0.0)]):
            got = lm.model(ids).logits
        torch.testing.assert_close(got, ablated(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["all", "prompt", "last"])
def test_positions_touch_only_their_positions(live, rule):
    lm = live("llama")
    ids = tokens(lm)
    n = ids.shape[1]
    with (torch.no_grad(), clamped(lm.model, [Clamp(0, 2, 4.0)], "act", position_rule(rule, n)),
          captured(lm.model, "act", layers=[0]) as caps):
        lm.model(ids)
    expected = {"all": range(n), "prompt": range(n), "last": [n - 1]}[rule]
    hit = (caps[0].values[0, :, 2] == 4.0).nonzero().flatten().tolist()
    assert hit == list(expected)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("rule", ["generated", "last", "prompt"])
def test_positions_during_generation_with_kv_cache(live, family, rule):
    """Cached generation sees each position once, in its own chunk; the clamp lands where the rule says,
    and the logits match one uncached forward pass over the whole sequence with the same rule."""
    lm = live(family)
    ids = tokens(lm)
    n, new = ids.shape[1], 20  # 20 > Gemma 3's sliding window of 16, so the cache wraps
    where = position_rule(rule, n)
    with torch.no_grad(), clamped(lm.model, [Clamp(1, 4, 6.0)], "act", where):
        with captured(lm.model, "act", layers=[1]) as caps:
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                    min_new_tokens=new, output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        full = lm.model(out.sequences).logits[0, n - 1:-1]  # [new, vocab]
    assert [c.positions.tolist() for c in caps] == [list(range(n))] + [[p] for p in range(n, n + new - 1)]
    hit = sorted(int(p) for c in caps for p, v in zip(c.positions, c.values[0, :, 4]) if v == 6.0)
    expected = {"generated": range(n, n + new - 1), "last": [n - 1], "prompt": range(n)}[rule]
    assert hit == list(expected)
    torch.testing.assert_close(torch.stack(out.logits)[:, 0], full, rtol=1e-4, atol=1e-4)


def test_hooks_are_removed_when_the_body_raises(live):
    lm = live("llama")
    with pytest.raises(ZeroDivisionError), clamped(lm.model, [Clamp(0, 0, 1.0)]):
        raise ZeroDivisionError
    assert no_hooks_left(lm.model)


def test_bad_layer_neuron_and_site(live):
    lm = live("gpt2")
    bad = [([Clamp(3, 0, 1.0)], "act", "layer 3 is out of range: the model has layers 0-2"),
           ([Clamp(0, 48, 1.0)], "act", "neuron 48 is out of range: layer 0 has neurons 0-47"),
           ([Clamp(0, 0, 1.0)], "gate", "no gate branch")]
    for clamps, site, message in bad:
        with pytest.raises(AtlasError, match=message), clamped(lm.model, clamps, site):
            pass
    assert no_hooks_left(lm.model) and [m.n_neurons for m in mlps(lm.model)] == [48, 48, 48]


def test_load_live_from_a_gguf_file(model_dir, tmp_path):
    path = tiny_models.build_gguf(model_dir("llama"), tmp_path / "tiny.gguf")
    lm = load_live(str(path), progress=False)
    assert lm.name == "tiny" and lm.provenance["source_sha256"] == file_sha256(path)
    assert lm.provenance["source_format"] == "gguf" and lm.model.dtype == torch.float32
    reference = load_live(str(model_dir("llama")), progress=False)
    ids = tokens(reference)
    torch.testing.assert_close(lm.model(ids).logits, reference.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_load_live_bad_input(tmp_path):
    with pytest.raises(AtlasError, match="no such model"):
        load_live(str(tmp_path / "nope"))
    with pytest.raises(AtlasError, match="unknown dtype"):
        load_live("x", dtype="int8")
