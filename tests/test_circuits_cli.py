"""`atlas circuit` on a tiny real llama, in-process: Parquet with provenance, the join to `neurons`, bad input."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.atlas.schema import read_kv_metadata
from pipeline.attribution.inputs import encode
from pipeline.circuits import config, scores
from pipeline.circuits.graph import Graph
from pipeline.circuits.job import TASKS, load_pairs, make_batches
from pipeline.circuits.schema import EDGES, FAITHFULNESS, edges_path, faithfulness_path, plot_paths
from pipeline.live.load import load_live
from pipeline.query import connect
from tests.conftest import assert_one_line_error, run_cli

PAIRS = [  # token lengths under the tiny tokenizer: 6, 8, 11, 4, 6 (four batches of at most 2)
    {"prompt": "The dog drinks water from the", "corrupted": "The cat drinks water from the", "target": " river",
     "foil": " city"},
    {"prompt": "The dog and the cat sleep in the", "corrupted": "The cat and the dog sleep in the", "target": " sun",
     "foil": " river"},
    {"prompt": "A dog is a good friend of the", "corrupted": "A cat is a good friend of the", "target": " city",
     "foil": " sea"},
    {"prompt": "The dog drinks water", "corrupted": "The cat drinks water", "target": " river", "foil": " sea"},
    {"prompt": "The cat drinks water from the", "corrupted": "The dog drinks water from the", "target": " sea",
     "foil": " city"},
]
METHODS = ("eap", "eap-ig", "random")


def _jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory) -> tuple[Path, Path, Path, object]:
    """A tiny llama's atlas and a circuit run of all three methods on PAIRS in one outputs folder."""
    folder = model_dir("llama", tie=True)
    root = tmp_path_factory.mktemp("circuits")
    pairs, out = _jsonl(root / "toy.jsonl", PAIRS), root / "out"
    assert run_cli("build", folder, "--out", out, "--name", "tiny", "-k", "3", "-q").exit_code == 0
    result = run_cli("circuit", folder, "--pairs", pairs, "--steps", "2", "--edges", "0,1%,10,40,all",
                     "--batch-size", "2", "--out", out, "--name", "tiny", "-q")
    assert result.exit_code == 0, result.output
    return folder, pairs, out, result


def test_prints_faithfulness_per_budget_then_cpr_and_cmd(run):
    *_, result = run
    curves, summary = result.stdout.split("rows)\n")[:2]
    header = curves.splitlines()[0]
    assert all(f"{m} edges" in header and f"{m} F" in header for m in METHODS)
    assert [line.split()[0] for line in curves.splitlines()[2:-1]] == ["0", "1%", "10", "40", "all"]  # 1% of 262: 2
    assert summary.splitlines()[0].split() == ["method", "cpr", "cmd", "seconds", "cost"]
    assert [line.split()[0] for line in summary.splitlines()[2:-1]] == list(METHODS)


def test_edges_cover_the_graph_with_ranks_and_provenance(run):
    _, pairs, out, _ = run
    n_edges = Graph.build(3, 4).n_edges
    for method in METHODS:
        path = edges_path(out, "tiny", "toy", method)
        table = pq.read_table(path)
        assert table.schema.names == EDGES.names and table.num_rows == n_edges
        rows = table.to_pandas()
        assert rows["rank"].tolist() == list(range(1, n_edges + 1))
        assert set(rows.kind) == {"q", "k", "v", "mlp", "logits"}
        assert rows.src_layer.isna().sum() == (rows.src == "input").sum()
        meta = read_kv_metadata(path)
        assert meta["model"] == "tiny" and meta["task"] == "toy" and meta["method"] == method
        assert meta["metric"] == "logit_diff" and meta["steps"] == ("2" if method == "eap-ig" else "1")
        assert len(meta["source_sha256"]) == 64 and meta["package_version"] and meta["created"]
        assert meta["pairs"] == str(pairs) and meta["pairs_sha256"] == hashlib.sha256(pairs.read_bytes()).hexdigest()
    for png in plot_paths(out, "tiny", "toy"):
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_eap_scores_are_the_engines_mean_over_pairs(run):
    folder, pairs, out, _ = run
    live = load_live(str(folder), name="tiny", progress=False)
    graph = Graph.for_model(live.model)
    batches = make_batches(encode(load_pairs(str(pairs)), live.tokenizer, None), 2, live.model.device)
    assert [b.clean.shape for b in batches] == [(1, 4), (2, 6), (1, 8), (1, 11)]
    want = sum(scores.edge_scores(live.model, graph, b, "eap", "logit_diff") for b in batches) / len(PAIRS)
    rows = pq.read_table(edges_path(out, "tiny", "toy", "eap")).to_pandas()
    got = torch.zeros(graph.valid.shape)
    for r in rows.itertuples():
        got[graph.sources.index(r.src), graph.destinations.index(r.dst)] = r.score
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_faithfulness_is_one_for_the_full_graph_and_zero_for_none(run):
    _, _, out, _ = run
    for method in METHODS:
        table = pq.read_table(faithfulness_path(out, "tiny", "toy", method))
        assert table.schema.names == FAITHFULNESS.names
        rows = {r["budget"]: r for r in table.to_pylist()}
        assert list(rows) == ["0", "1%", "10", "40", "all"]
        assert rows["all"]["n_edges"] == rows["all"]["n_requested"] == Graph.build(3, 4).n_edges
        assert rows["all"]["F"] == pytest.approx(1.0, abs=1e-4) and rows["0"]["F"] == pytest.approx(0.0, abs=1e-4)
        assert rows["0"]["n_edges"] == 0 and all(r["n_edges"] <= r["n_requested"] for r in rows.values())
        assert len({(r["cpr"], r["cmd"], r["m_full"], r["m_empty"]) for r in rows.values()}) == 1
        assert (rows["all"]["cost"] is None) == (method == "random")


def test_mlp_nodes_join_the_atlas_neurons_on_model_and_layer(run):
    _, _, out, _ = run
    con = connect(out)
    edges = str(out / "circuits" / "edges" / "*" / "*" / "*.parquet")
    joined = con.execute(
        "SELECT e.src, count(DISTINCT n.neuron) FROM read_parquet(?, hive_partitioning = false) e "
        "JOIN neurons n ON n.model = e.model AND n.layer = e.src_layer "
        "WHERE e.method = 'eap' AND e.src LIKE 'm%' GROUP BY e.src ORDER BY e.src", [edges]).fetchall()
    assert joined == [("m0", 48), ("m1", 48), ("m2", 48)]


def test_a_rerun_replaces_the_files_with_the_same_result(run):
    folder, pairs, out, _ = run
    before = pq.read_table(edges_path(out, "tiny", "toy", "random")).drop(["model"])
    result = run_cli("circuit", folder, "--pairs", pairs, "--method", "random", "--edges", "0,10,40,all",
                     "--batch-size", "2", "--out", out, "--name", "tiny", "-q")
    assert result.exit_code == 0, result.output
    assert pq.read_table(edges_path(out, "tiny", "toy", "random")).drop(["model"]).equals(before)
    assert not list(out.rglob("*.tmp"))


def test_shipped_tasks_have_corrupted_and_foil_on_every_pair():
    assert config.METRICS == scores.METRICS
    for task in TASKS:
        pairs = load_pairs(task)
        assert 50 <= len(pairs.prompts) <= 200 and pairs.task == task
        assert all(p.corrupted and p.foil and p.foil != p.target for p in pairs.prompts)
    assert len(load_pairs("ioi", limit=7).prompts) == 7


@pytest.mark.parametrize("lines, message", [
    ([PAIRS[0], {**PAIRS[1], "corrupted": "A cat"}], "toy.jsonl:2: the corrupted prompt has"),
    ([{**PAIRS[0], "target": ""}], "toy.jsonl:1: target '' has no token"),
    ([], "no prompts in the file"),
    ([PAIRS[0], {k: v for k, v in PAIRS[1].items() if k != "corrupted"}],
     "toy.jsonl:2: a circuit pair needs corrupted"),
    ([{k: v for k, v in PAIRS[0].items() if k != "foil"}], "toy.jsonl:1: a circuit pair needs foil"),
    ([PAIRS[0], "{not json"], "toy.jsonl:2: not valid JSON"),
])
def test_bad_pairs_fail_in_one_line(model_dir, tmp_path, lines, message):
    pairs = _jsonl(tmp_path / "toy.jsonl", lines)
    result = run_cli("circuit", model_dir("llama", tie=True), "--pairs", pairs, "--out", tmp_path / "out")
    assert_one_line_error(result, message)
    assert not (tmp_path / "out" / "circuits").exists()


@pytest.mark.parametrize("option, message", [
    (("--pairs", "nowhere.jsonl"), "no pairs file nowhere.jsonl"),
    (("--pairs", "ioi", "--method", "eap,shap"), "unknown circuit method 'shap'"),
    (("--pairs", "ioi", "--metric", "mse"), "Invalid value for '--metric'"),
    (("--pairs", "ioi", "--edges", "10,ten"), "invalid edge budget 'ten'"),
])
def test_bad_options_fail_with_one_error_line(model_dir, tmp_path, option, message):
    result = run_cli("circuit", model_dir("llama", tie=True), *option, "--out", tmp_path / "out")
    assert result.exit_code in (1, 2) and message in result.stderr, result.stderr
    assert sum(line.startswith("Error") for line in result.stderr.splitlines()) == 1


@pytest.mark.slow
def test_shipped_pairs_have_equal_lengths_and_one_token_answers_under_smollm2():
    import transformers

    from pipeline.sources import resolve

    gguf = resolve("smollm2-135m-instruct").path
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    for task in TASKS:
        items = encode(load_pairs(task), tokenizer, None)  # raises on a length mismatch, naming the line
        for p in load_pairs(task).prompts:
            assert len(tokenizer.encode(p.target, add_special_tokens=False)) == 1
            assert len(tokenizer.encode(p.foil, add_special_tokens=False)) == 1
        assert len(items) == len(load_pairs(task).prompts)


@pytest.mark.slow
def test_smollm2_circuit_on_two_ioi_pairs(tmp_path):
    out = tmp_path / "out"
    result = run_cli("circuit", "--pairs", "ioi", "--limit", "2", "--method", "eap,random", "--edges", "0,100,all",
                     "--out", out, "-q")
    assert result.exit_code == 0, result.output
    table = pq.read_table(faithfulness_path(out, "smollm2-135m-instruct", "ioi", "eap"))
    rows = {r["budget"]: r for r in table.to_pylist()}
    assert rows["all"]["n_edges"] == 123211 and rows["all"]["F"] == pytest.approx(1.0, abs=1e-3)
    assert rows["0"]["F"] == pytest.approx(0.0, abs=1e-3) and 0 < rows["100"]["n_edges"] <= 100
    assert pq.read_metadata(edges_path(out, "smollm2-135m-instruct", "ioi", "eap")).num_rows == 123211
