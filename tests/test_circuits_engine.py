"""The EAP / EAP-IG engine (pipeline/circuits) on tiny real float64 models (3 layers, 4 heads, 262 edges).

HF computes RMSNorm in fp32 even for a float64 model (and eager attention's softmax), which caps
float64 finite differences through it at ~1e-3 absolute on these models; the finite-difference test therefore swaps
each RMSNorm instance for the same formula in float64 (`float64_norms`), while the norm-gradient and
clean/corrupted tests run HF's own norms. Measured here: all kept / none kept give the clean / corrupted
logits to 0.0 (RMSNorm families: the fp32 norms round the reconstruction's error away; ≤ 3e-15 with
float64 norms) and ≤ 5e-16 relative (GPT-2); finite differences agree with EAP to ≤ 5e-6 relative; the analytic per-head norm
gradients sum to autograd's to 1.4e-7 (fp32 RMSNorm) and 6e-16 (GPT-2's float64 LayerNorm).
"""
from __future__ import annotations

import contextlib
import itertools
import types
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import transformers

from pipeline.circuits.graph import KINDS, Graph, expected_edges
from pipeline.circuits.model_parts import last_logits, parts_of, ungrouped
from pipeline.circuits.patching import faithfulness, patched_logits
from pipeline.circuits.scores import (
    PairBatch,
    edge_scores,
    metric_value,
    qkv_input_grad,
)
from pipeline.errors import AtlasError
from tests import tiny_models

FAMILIES = ("llama", "qwen2", "gemma3_text", "gpt2")
PAIRS = (("The dog drinks water from the", "The cat drinks water from the"),
         ("The cat sleeps in the", "The dog sleeps in the"))
# Longer than Gemma 3's 16-token sliding window, so its sliding layers mask differently from global ones.
LONG = ("The dog drinks water from the river in California every day, and the cat sleeps in the sun.",
        "The cat drinks water from the river in California every day, and the dog sleeps in the sun.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`tiny(family, long=False)`: a float64 tiny model (sdpa) and a PairBatch of equal-length prompts."""
    tokenizers: dict[str, transformers.PreTrainedTokenizerFast] = {}
    models: dict[str, torch.nn.Module] = {}

    def build(family: str, long: bool = False) -> tuple[torch.nn.Module, PairBatch]:
        kind = "sentencepiece" if family.startswith("gemma") else "bytelevel"
        if kind not in tokenizers:
            tokenizers[kind] = tiny_models.build_tokenizer(tmp_path_factory.mktemp(kind), kind)
        tok = tokenizers[kind]
        if family not in models:
            models[family] = tiny_models.make_hf_model(family, tok, dtype=torch.float64)
        pairs = (LONG,) if long else PAIRS
        clean, corrupted = (torch.tensor(tok([p[i] for p in pairs])["input_ids"]) for i in (0, 1))
        target, foil = (tok.encode(w, add_special_tokens=False)[0] for w in (" river", " city"))
        n = len(pairs)
        return models[family], PairBatch(clean, corrupted, torch.full((n,), target), torch.full((n,), foil))

    return build


@contextmanager
def float64_norms(model: torch.nn.Module) -> Iterator[None]:
    """Every RMSNorm computes in the model's dtype (HF's casts to fp32), so float64 checks are tight."""
    offset = parts_of(model).layout.gain_offset
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (self.weight + offset)

    try:
        for norm in norms:
            norm.forward = types.MethodType(forward, norm)
        yield
    finally:
        for norm in norms:
            del norm.forward


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())  # relative to the largest entry


def _shape_model(family: str, n_layers: int, n_heads: int, n_kv: int | None = None) -> torch.nn.Module:
    """A model of the given layer × head shape with tiny widths (edge counts depend only on L and H)."""
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=n_layers, n_head=n_heads, n_embd=2 * n_heads, n_inner=8, vocab_size=8)
    else:
        config = transformers.LlamaConfig(num_hidden_layers=n_layers, num_attention_heads=n_heads, vocab_size=8,
                                          num_key_value_heads=n_kv, hidden_size=2 * n_heads, intermediate_size=8)
    with torch.device("meta"):  # no weights needed
        return transformers.AutoModelForCausalLM.from_config(config)


def test_edge_counts_match_the_formula(tiny):
    assert expected_edges(12, 12) == 32_491
    assert Graph.for_model(_shape_model("gpt2", 12, 12)).n_edges == 32_491  # GPT-2 small
    assert Graph.for_model(_shape_model("llama", 30, 9, 3)).n_edges == 123_211  # SmolLM2-135M
    for family in FAMILIES:
        graph = Graph.for_model(tiny(family)[0])
        assert graph.n_edges == expected_edges(graph.n_layers, graph.n_heads) == 262


def test_graph_names_and_validity():
    graph = Graph.build(3, 2)
    for u in range(len(graph.sources)):
        for v in range(len(graph.destinations)):
            src, dst = graph.layer_of_source(u), graph.layer_of_destination(v)
            earlier = src is None or dst is None or src < dst or (src == dst and graph.kind(v) == "mlp"
                                                                  and graph.sources[u].startswith("a"))
            assert bool(graph.valid[u, v]) == earlier, graph.edge_name(u, v)
    assert graph.edge_name(graph.head_sources(1).start + 1, graph.qkv_destinations(2, "k").start) == "a1.h1->a2.h0<k>"
    assert graph.edge_name(graph.mlp_source(1), graph.logits_destination) == "m1->logits"
    assert [graph.kind(v) for v in range(7)] == ["q", "k", "v", "q", "k", "v", "mlp"]
    assert graph.destinations[graph.mlp_destination(2)] == "m2"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_all_kept_is_clean_and_none_kept_is_corrupted(tiny, family, attention):
    """Also with float64 norms (sdpa only: eager's fp32 softmax rounds as HF's fp32 norms do), where
    the reconstruction's own error shows: measured ≤ 3e-15 relative (un-grouped k/v reorder sums)."""
    model, _ = tiny(family)
    previous = model.config._attn_implementation
    model.set_attn_implementation(attention)
    try:
        for long, exact in itertools.product((False, True), (False, True) if attention == "sdpa" else (False,)):
            _, batch = tiny(family, long)
            graph = Graph.for_model(model)
            with float64_norms(model) if exact else contextlib.nullcontext(), torch.no_grad():
                clean, corrupted = last_logits(model, batch.clean), last_logits(model, batch.corrupted)
                assert _rel(clean, corrupted) > 0.05
                assert _rel(patched_logits(model, graph, batch, torch.ones_like(graph.valid)), clean) <= 1e-13
                assert _rel(patched_logits(model, graph, batch, torch.zeros_like(graph.valid)), corrupted) <= 1e-13
                keep = torch.ones_like(graph.valid)
                keep[0] = False  # the input's edges cut: the whole run sees the corrupted embedding
                assert _rel(patched_logits(model, graph, batch, keep), corrupted) <= 1e-13
    finally:
        model.set_attn_implementation(previous)


def test_ungrouping_keeps_logits_and_restores_the_model(tiny):
    model, batch = tiny("llama")  # 4 query heads, 2 key/value heads
    attn = model.model.layers[0].self_attn
    before = {name: p for name, p in model.named_parameters()}
    reference = last_logits(model, batch.clean)
    with ungrouped(model):
        assert attn.num_key_value_groups == 1 and attn.k_proj.weight.shape[0] == attn.q_proj.weight.shape[0]
        assert _rel(last_logits(model, batch.clean), reference) <= 1e-12
    with pytest.raises(RuntimeError), ungrouped(model):
        raise RuntimeError("restored anyway")
    assert attn.num_key_value_groups == 2 and attn.k_proj.out_features == attn.k_proj.weight.shape[0]
    assert all(p is before[name] for name, p in model.named_parameters())
    assert torch.equal(last_logits(model, batch.clean), reference)


@contextmanager
def _replaced(module: torch.nn.Module, columns: slice, values: torch.Tensor, *, before: bool) -> Iterator[None]:
    """Replace `columns` of the module's input (before) or output with `values`."""
    def swap(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., columns] = values
        return x

    handle = (module.register_forward_pre_hook(lambda m, args: (swap(args[0]),)) if before
              else module.register_forward_hook(lambda m, args, out: swap(out)))
    try:
        yield
    finally:
        handle.remove()


def _captured(model, ids, module, columns, before) -> torch.Tensor:
    seen = []
    hook = (module.register_forward_pre_hook(lambda m, args: seen.append(args[0][..., columns].clone())) if before
            else module.register_forward_hook(lambda m, args, out: seen.append(out[..., columns].clone())))
    with torch.no_grad():
        last_logits(model, ids)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cutting_a_node_is_ordinary_activation_patching(tiny, family):
    """Cut all edges out of a head or an MLP, or into one head's keys: the same as patching that
    activation to its corrupted value with a plain hook (an independent reference for partial keeps)."""
    model, batch = tiny(family)
    graph, parts = Graph.for_model(model), parts_of(model)
    dh = parts.head_dim
    start_k = parts.blocks[2].qkv_offsets[1]
    cases = [(graph.sources.index("a1.h2"), None, parts.blocks[1].out, slice(2 * dh, 3 * dh), True),
             (graph.sources.index("m0"), None, parts.blocks[0].mlp, slice(None), False),
             (None, graph.destinations.index("a2.h3<k>"), parts.blocks[2].qkv[1],
              slice(start_k + 3 * dh, start_k + 4 * dh), False)]
    with ungrouped(model):  # one key head per query head, for the reference hook on k_proj
        for src, dst, module, columns, before in cases:
            keep = torch.ones_like(graph.valid)
            keep[src if src is not None else slice(None), dst if dst is not None else slice(None)] = False
            corrupted = _captured(model, batch.corrupted, module, columns, before)
            with _replaced(module, columns, corrupted, before=before), torch.no_grad():
                reference = last_logits(model, batch.clean)
            assert _rel(patched_logits(model, graph, batch, keep), reference) <= 1e-10


def _edges_of_every_kind(graph: Graph) -> list[tuple[int, int]]:
    """Into q, k, v of head 1 and the MLP of layer 1 and of the last layer, and into the logits: from the
    input, from head a0.h2 and from the latest source that feeds the destination."""
    destinations = [graph.logits_destination]
    for layer in (1, graph.n_layers - 1):
        destinations += [graph.qkv_destinations(layer, k).start + 3 for k in KINDS] + [graph.mlp_destination(layer)]
    head = graph.sources.index("a0.h2")
    return [(u, v) for v in destinations for u in (0, head, int(graph.valid[:, v].nonzero().max()))]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("metric", ["logit_diff", "prob_diff"])
def test_eap_is_the_first_order_change_when_an_edge_is_patched(tiny, family, metric):
    """score(u→v) = −dm/dε where v sees z_u + εΔ_u (keep = 1 − ε); central differences, ε = 1e-5.
    Measured: ≤ 5e-6 relative (24 of the 27 edges are nonzero; ε = 1e-3 truncates at ~1e-5)."""
    model, batch = tiny(family)
    graph = Graph.for_model(model)
    eps = 1e-5
    with float64_norms(model):
        scores = edge_scores(model, graph, batch, "eap", metric)
        clean = last_logits(model, batch.clean)
        for u, v in _edges_of_every_kind(graph):
            keep = torch.ones(graph.valid.shape, dtype=torch.float64)
            values = []
            for fraction in (1 - eps, 1 + eps):
                keep[u, v] = fraction
                values.append(metric_value(patched_logits(model, graph, batch, keep), batch, metric, clean).sum())
            difference = -(values[0] - values[1]) / (2 * eps)
            name = graph.edge_name(u, v)
            torch.testing.assert_close(scores[u, v].double(), difference, rtol=1e-5, atol=1e-8,
                                       msg=lambda m, name=name: f"{name}: {m}")
    assert scores[~graph.valid].abs().max() == 0


def test_eap_ig_converges_with_more_steps(tiny):
    model, batch = tiny("gemma3_text")
    graph = Graph.for_model(model)
    scores = {m: edge_scores(model, graph, batch, "eap-ig", "logit_diff", steps=m) for m in (2, 4, 8, 16, 32)}
    changes = [float((scores[2 * m] - scores[m]).norm()) for m in (2, 4, 8, 16)]
    # measured: 0.325, 0.166, 0.081, 0.040 (the right Riemann sum's error halves with m)
    assert all(later < earlier for earlier, later in itertools.pairwise(changes))
    assert changes[-1] < changes[0] / 4


def test_kl_gives_eap_no_gradient_but_eap_ig_a_signal(tiny):
    model, batch = tiny("llama")
    graph = Graph.for_model(model)
    eap = edge_scores(model, graph, batch, "eap", "kl")
    eap_ig = edge_scores(model, graph, batch, "eap-ig", "kl")
    assert eap_ig.abs().max() > 1e-3
    assert eap.abs().max() <= 1e-9 * eap_ig.abs().max()


@pytest.mark.parametrize("family", ["gemma3_text", "gpt2"])
def test_eap_ig_correlates_with_exact_patching_at_least_as_well_as_eap(tiny, family):
    """Every edge of the tiny model patched alone; Pearson r of the scores with the metric drops.
    Measured (logit_diff, 262 edges): gemma3_text EAP 0.672, EAP-IG 0.930; gpt2 EAP 0.433, EAP-IG 0.578."""
    model, batch = tiny(family)
    graph = Graph.for_model(model)
    with torch.no_grad():
        clean = metric_value(last_logits(model, batch.clean), batch, "logit_diff").sum()
    edges = graph.valid.nonzero()
    drops = []
    for u, v in edges.tolist():
        keep = torch.ones_like(graph.valid)
        keep[u, v] = False
        drops.append(clean - metric_value(patched_logits(model, graph, batch, keep), batch, "logit_diff").sum())
    drops = torch.stack(drops).float()
    r = {}
    for method in ("eap", "eap-ig"):
        scores = edge_scores(model, graph, batch, method, "logit_diff")[edges[:, 0], edges[:, 1]]
        r[method] = float(torch.corrcoef(torch.stack([scores, drops]))[0, 1])
    print(f"{family}: Pearson r with exact patching, EAP {r['eap']:.3f}, EAP-IG {r['eap-ig']:.3f}")
    assert r["eap-ig"] >= r["eap"] - 0.02
    assert r["eap-ig"] > 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_head_gradients_sum_to_the_autograd_gradient_at_the_attention_norm(tiny, family):
    model, batch = tiny(family)
    parts = parts_of(model)
    width = parts.n_heads * parts.head_dim
    inputs, norm_grads, out_grads = {}, {}, {}

    def alias(l):
        def hook(m, args):
            x = args[0].view_as(args[0])
            inputs[l] = args[0].detach()
            x.register_hook(lambda g: norm_grads.__setitem__(l, g))
            return (x,)
        return hook

    def keep_grad(l, module):
        def hook(m, args, out):
            out.register_hook(lambda g: out_grads.__setitem__((l, id(module)), g))
        return hook

    with ungrouped(model):
        handles = []
        for l, block in enumerate(parts.blocks):
            handles.append(block.attn_norm.register_forward_pre_hook(alias(l)))
            handles += [m.register_forward_hook(keep_grad(l, m)) for m in dict.fromkeys(block.qkv)]
        embeds = model.get_input_embeddings()(batch.clean).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits[:, -1]
        (-metric_value(logits, batch, "logit_diff").sum()).backward()
        for handle in handles:
            handle.remove()
        for l, block in enumerate(parts.blocks):
            total = sum(qkv_input_grad(parts, block, kind, inputs[l],
                                       out_grads[l, id(block.qkv[t])][..., block.qkv_offsets[t]:][..., :width]).sum(0)
                        for t, kind in enumerate(KINDS))
            # HF's fp32 RMSNorm bounds the agreement; GPT-2's LayerNorm is float64 throughout
            assert _rel(total, norm_grads[l]) <= (1e-13 if family == "gpt2" else 1e-6)  # measured 6e-16, 1.4e-7


def test_faithfulness_of_the_full_and_empty_circuits(tiny):
    model, batch = tiny("qwen2")
    graph = Graph.for_model(model)
    full = faithfulness(model, graph, [batch, batch], torch.ones_like(graph.valid), "prob_diff")
    empty = faithfulness(model, graph, [batch], torch.zeros_like(graph.valid), "prob_diff")
    assert full["F"] == pytest.approx(1.0) and empty["F"] == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        expected = metric_value(last_logits(model, batch.clean), batch, "prob_diff").mean()
    assert full["m_full"] == pytest.approx(float(expected)) == empty["m_full"]


def test_bad_input_is_one_clear_line(tiny, tmp_path):
    model, batch = tiny("llama")
    graph = Graph.for_model(model)
    with pytest.raises(AtlasError, match="equal token length"):
        PairBatch(batch.clean, batch.corrupted[:, 1:], batch.target, batch.foil)
    with pytest.raises(AtlasError, match="graph is for 2 layers"):
        patched_logits(model, Graph.build(2, 4), batch, torch.ones(Graph.build(2, 4).valid.shape))
    with pytest.raises(AtlasError, match="unknown method"):
        edge_scores(model, graph, batch, "acdc", "kl")
    model.train()
    try:
        with pytest.raises(AtlasError, match="eval mode"):
            edge_scores(model, graph, batch, "eap", "logit_diff")
    finally:
        model.eval()
    neox = tiny_models.make_hf_model("gpt_neox", tiny_models.build_tokenizer(tmp_path, "bytelevel"))
    with pytest.raises(AtlasError, match="do not support 'gpt_neox'"):
        Graph.for_model(neox)

