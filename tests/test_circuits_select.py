"""Circuit selection, pruning, CPR/CMD, budgets and edge rows on hand-made graphs whose answers are written by hand."""
from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.circuits import select
from pipeline.circuits.config import CircuitConfig, parse_edges, parse_methods, resolve_budgets
from pipeline.circuits.graph import Graph
from pipeline.circuits.schema import edge_rows
from pipeline.errors import AtlasError

ONE = Graph.build(1, 1)  # sources: input, a0.h0, m0; destinations: a0.h0<q>, <k>, <v>, m0, logits


def _scores(graph: Graph, values: dict[str, float]) -> torch.Tensor:
    """A score matrix from {"src->dst": score}; every other valid edge scores 0."""
    scores = torch.zeros(graph.valid.shape)
    for name, value in values.items():
        src, dst = name.split("->")
        scores[graph.sources.index(src), graph.destinations.index(dst)] = value
    return scores


def _edges(graph: Graph, keep: torch.Tensor) -> set[str]:
    return {graph.edge_name(s, d) for s, d in torch.nonzero(keep).tolist()}


HAND = {"input->a0.h0<q>": 10, "a0.h0->m0": -5, "input->a0.h0<k>": 3, "a0.h0->logits": 2, "input->logits": -1,
        "m0->logits": 0.5, "input->a0.h0<v>": 0.2, "input->m0": 0.1}


def test_nodes_join_a_heads_q_k_v_inputs_to_its_output():
    nodes = select.Nodes.of(ONE.sources, ONE.destinations)
    assert nodes.names == ("input", "a0.h0", "m0", "logits")
    assert nodes.of_source.tolist() == [0, 1, 2] and nodes.of_destination.tolist() == [1, 1, 1, 2, 3]
    assert nodes.reads.tolist() == [False, True, True, True] and nodes.writes.tolist() == [True, True, True, False]


def test_top_n_and_rank_order_valid_edges_by_absolute_score():
    scores = _scores(ONE, HAND)
    scores[2, 0] = 99.0  # m0 -> a0.h0<q> is not an edge (later layer): never chosen, never ranked
    assert _edges(ONE, select.top_n(scores, ONE.valid, 2)) == {"input->a0.h0<q>", "a0.h0->m0"}
    assert select.top_n(scores, ONE.valid, 100).equal(ONE.valid) and not select.top_n(scores, ONE.valid, 0).any()
    ranks = select.rank(scores, ONE.valid)
    assert ranks[2, 0] == 0 and sorted(ranks[ONE.valid].tolist()) == list(range(1, 9))
    by_rank = sorted((int(ranks[s, d]), ONE.edge_name(s, d)) for s, d in torch.nonzero(ONE.valid).tolist())
    assert [name for _, name in by_rank][:3] == ["input->a0.h0<q>", "a0.h0->m0", "input->a0.h0<k>"]


def test_greedy_adds_only_edges_whose_child_is_already_in_the_circuit():
    scores = _scores(ONE, HAND)
    order = [ONE.edge_name(i // 5, i % 5) for i in select.greedy_order(scores, ONE.valid, ONE.sources,
                                                                         ONE.destinations).tolist()]
    # From the logits: a0.h0->logits (2) beats input->logits (1); a0.h0 then opens its q, k, v inputs;
    # a0.h0->m0 (|-5|) waits until m0 enters through m0->logits (0.5).
    assert order == ["a0.h0->logits", "input->a0.h0<q>", "input->a0.h0<k>", "input->logits", "m0->logits",
                     "a0.h0->m0", "input->a0.h0<v>", "input->m0"]
    assert _edges(ONE, select.greedy(scores, ONE.valid, ONE.sources, ONE.destinations, 2)) == \
        {"a0.h0->logits", "input->a0.h0<q>"}


def test_every_greedy_prefix_is_connected_to_the_logits():
    graph = Graph.build(3, 2)
    scores = torch.randn(graph.valid.shape, generator=torch.Generator().manual_seed(0)) * graph.valid
    order = select.greedy_order(scores, graph.valid, graph.sources, graph.destinations)
    assert sorted(order.tolist()) == torch.nonzero(graph.valid.ravel()).ravel().tolist()  # each edge once
    entered = {"logits"}
    n_dst = len(graph.destinations)
    for flat in order.tolist():
        src, dst = divmod(flat, n_dst)
        assert select.node_name(graph.destinations[dst]) in entered
        entered.add(graph.sources[src])
    assert select.first(order, 7, graph.valid.shape).equal(
        select.greedy(scores, graph.valid, graph.sources, graph.destinations, 7))


def test_prune_removes_dangling_nodes_until_nothing_changes():
    # top-2 by |score|: input->a0.h0<q> and a0.h0->m0; m0 has no outgoing edge, so a0.h0->m0 goes, then
    # a0.h0 has no outgoing edge, so input->a0.h0<q> goes too: two rounds, nothing left.
    keep = select.top_n(_scores(ONE, HAND), ONE.valid, 2)
    assert not select.prune(keep, ONE.sources, ONE.destinations).any()
    graph = Graph.build(3, 1)
    chain = ["input->a0.h0<q>", "a0.h0->a1.h0<v>", "a1.h0->m2"]  # m2 writes nowhere: all three go, one a round
    alive = ["input->m0", "m0->a2.h0<v>", "a2.h0->logits", "input->logits"]  # input needs no incoming edge
    orphan = ["m1->logits"]  # m1 reads nothing: goes
    keep = _scores(graph, dict.fromkeys(chain + alive + orphan, 1.0)) != 0
    assert _edges(graph, select.prune(keep, graph.sources, graph.destinations)) == set(alive)
    assert select.prune(graph.valid, graph.sources, graph.destinations).equal(graph.valid)


@pytest.mark.parametrize("values, cpr, cmd", [
    ([1.0] * 10, 1.0, 0.0),
    ([0.0] * 10, 0.0, 1.0),
    ([1.5] * 10, 1.5, 0.5),
])
def test_cpr_and_cmd_of_constant_curves(values, cpr, cmd):
    assert select.cpr(select.MIB_FRACTIONS, values) == pytest.approx(cpr)
    assert select.cmd(select.MIB_FRACTIONS, values) == pytest.approx(cmd)


def test_area_is_the_normalised_trapezoid_over_sorted_fractions():
    assert select.area([1.0, 0.0, 0.5], [1.0, 0.0, 0.5]) == pytest.approx(0.5)  # F = x: half
    assert select.area([0.0, 0.5, 1.0], [0.0, 1.0, 1.0]) == pytest.approx((0.25 + 0.5) / 1.0)
    assert select.cmd([0.5, 1.0], [0.0, 1.0]) == pytest.approx(0.5)
    assert select.cpr([0.3], [0.7]) == pytest.approx(0.7)  # a single budget: its F


def test_budgets_parse_and_resolve():
    assert parse_edges("10, 1%,0.1%,all,100%") == (10, "1%", "0.1%", "all", "100%")
    assert resolve_budgets(parse_edges("10,1%,0.1%,all,100%,5000"), 1000) == [
        ("0.1%", 1), ("10", 10), ("all", 1000)]  # 10 and 1% are one budget (the first label); 100%, 5000: all
    assert resolve_budgets(parse_edges("0"), 50) == [("0", 0)]
    for bad in ("10,x", "0%", "101%", "-3", ""):
        with pytest.raises(AtlasError, match="invalid edge budget"):
            parse_edges(bad)
    assert parse_methods("eap-ig, random") == ("eap-ig", "random")
    for bad, message in (("eap,shap", "unknown circuit method 'shap'"), ("eap,eap", "distinct"), ("", "distinct")):
        with pytest.raises(AtlasError, match=message):
            parse_methods(bad)


def test_config_is_validated_once():
    cfg = CircuitConfig(model="m", pairs="ioi")
    assert cfg.methods == ("eap", "eap-ig", "random") and cfg.as_dict()["edges"][-1] == "all"
    for kwargs, message in (({"metric": "mse"}, "unknown metric"), ({"selection": "best"}, "unknown selection"),
                            ({"steps": 0}, "at least 1"), ({"edges": ()}, "no edge budgets"),
                            ({"methods": ("eap", "ig")}, "unknown circuit method"), ({"name": "a/b"}, "invalid model")):
        with pytest.raises(AtlasError, match=message):
            CircuitConfig(model="m", pairs="ioi", **kwargs)


def test_edge_rows_name_kind_layer_and_rank_every_valid_edge():
    graph = Graph.build(2, 2)
    scores = torch.randn(graph.valid.shape, generator=torch.Generator().manual_seed(1)) * graph.valid
    table = edge_rows("tiny", "toy", "eap", graph, scores, select.rank(scores, graph.valid)).to_pylist()
    assert len(table) == graph.n_edges and [r["rank"] for r in table] == list(range(1, graph.n_edges + 1))
    assert all(abs(a["score"]) >= abs(b["score"]) for a, b in itertools.pairwise(table))
    row = next(r for r in table if r["src"] == "a0.h1" and r["dst"] == "a1.h0<k>")
    assert (row["kind"], row["src_layer"], row["dst_layer"]) == ("k", 0, 1)
    row = next(r for r in table if r["src"] == "input" and r["dst"] == "logits")
    assert (row["kind"], row["src_layer"], row["dst_layer"]) == ("logits", None, None)
    assert {r["kind"] for r in table if r["dst"] == "m1"} == {"mlp"}
