"""`atlas attribute` and `atlas evaluate` on tiny real models, in-process: Parquet, the SQL join, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.atlas.schema import read_kv_metadata
from pipeline.attribution.inputs import TASKS, encode, load_prompts
from pipeline.attribution.job import run_method
from pipeline.attribution.schema import scores_path
from pipeline.live.load import load_live
from pipeline.query import run_sql
from tests.conftest import assert_one_line_error, run_cli

PROMPTS = [
    {"prompt": "The dog drinks water from the", "target": " river"},
    {"prompt": "Paris is the capital of", "target": " France", "foil": " California"},
    {"prompt": "The dog drinks water", "target": " in", "foil": " from", "corrupted": "The cat drinks water"},
]


def _jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def attributed(model_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny tied llama with its atlas and gim attributions of PROMPTS in one outputs folder."""
    folder = model_dir("llama", tie=True)
    root = tmp_path_factory.mktemp("attributed")
    prompts, out = _jsonl(root / "toy.jsonl", PROMPTS), root / "out"
    assert run_cli("build", folder, "--out", out, "--name", "tiny", "-k", "5", "-q").exit_code == 0
    result = run_cli("attribute", folder, "--prompts", prompts, "--method", "gim", "--out", out, "--name", "tiny", "-q")
    assert result.exit_code == 0, result.output
    return folder, prompts, out


def test_attribute_writes_the_estimators_scores_with_provenance(attributed):
    folder, prompts, out = attributed
    tokens = pq.read_table(scores_path(out, "tokens", "tiny", "toy", "gim")).to_pandas()
    neurons = pq.read_table(scores_path(out, "neurons", "tiny", "toy", "gim")).to_pandas()
    live = load_live(str(folder), name="tiny", progress=False)
    items = encode(load_prompts(prompts), live.tokenizer, 128)
    assert sorted(tokens.prompt_id.unique()) == [1, 2, 3] and len(tokens) == sum(i.ids.numel() for i in items)
    assert len(neurons) == 3 * 3 * 48 and set(tokens.method) == {"gim"} and set(neurons.task) == {"toy"}
    for item in items:
        got = run_method(live, item, "gim", 5)
        mine = tokens[tokens.prompt_id == item.prompt.id].sort_values("position")
        assert mine.token_id.tolist() == item.ids.tolist()
        assert torch.allclose(torch.tensor(mine.score.to_numpy()), got.tokens.float(), rtol=1e-5, atol=1e-6)
        cells = neurons[neurons.prompt_id == item.prompt.id].sort_values(["layer", "neuron"])
        assert torch.allclose(torch.tensor(cells.score.to_numpy()).reshape(3, 48), got.neurons.float(),
                              rtol=1e-5, atol=1e-6)
        assert torch.allclose(torch.tensor(cells.activation.to_numpy()).reshape(3, 48), got.activations.float())
    meta = read_kv_metadata(scores_path(out, "neurons", "tiny", "toy", "gim"))
    assert meta["model"] == "tiny" and meta["method"] == "gim" and meta["task"] == "toy"
    assert len(meta["source_sha256"]) == 64 and json.loads(meta["config"])["methods"] == ["gim"]


def test_attributions_join_the_atlas_in_sql(attributed):
    _, _, out = attributed
    rows = run_sql(out, "attributed_neurons", {"concept": "water", "method": "gim"}).to_pylist()
    assert rows and all(r["model"] == "tiny" and r["task"] == "toy" and r["prompts"] == 3 for r in rows)
    assert [r["mean_score"] for r in rows] == sorted((r["mean_score"] for r in rows), reverse=True)
    neurons = pq.read_table(scores_path(out, "neurons", "tiny", "toy", "gim")).to_pandas()
    means = neurons.astype({"score": "float64"}).groupby(["layer", "neuron"]).score.mean()
    for r in rows:
        assert r["mean_score"] == pytest.approx(means[r["layer"], r["neuron"]], rel=1e-6)
        assert r["attribution_rank"] == int((means > r["mean_score"]).sum()) + 1 and r["of_neurons"] == 144
    result = run_cli("query", "attributed_neurons", "--out", out, "--var", "concept=water", "--format", "json")
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == len(rows)


def test_tokens_level_and_a_shipped_task_parse(attributed, tmp_path):
    folder, prompts, _ = attributed
    out = tmp_path / "out"
    result = run_cli("attribute", folder, "--prompts", prompts, "--method", "ig", "--steps", "2", "--level", "tokens",
                     "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(scores_path(out, "tokens", folder.name, "toy", "ig"))]
    assert not (out / "attributions" / "neurons").exists()
    for task in TASKS:
        prompt_set = load_prompts(task)
        assert 50 <= len(prompt_set.prompts) <= 200 and prompt_set.task == task
    assert all(p.corrupted and p.foil for p in load_prompts("ioi").prompts)


@pytest.mark.parametrize("lines, message", [
    ([PROMPTS[0], '{"prompt": "The dog", "target": " river"'], "toy.jsonl:2: not valid JSON"),
    ([PROMPTS[0], PROMPTS[1], '["The dog", " river"]'], "toy.jsonl:3: expected a JSON object"),
    ([{"prompt": "The dog"}], "toy.jsonl:1: field target must be a string"),
    ([{"prompt": "The dog", "target": " river", "answer": "x"}], "toy.jsonl:1: unknown field answer"),
    (["", {"prompt": "The dog", "target": ""}], "toy.jsonl:2: target '' has no token"),
    ([{"prompt": "The dog " * 100, "target": " river"}], "toy.jsonl:1: prompt of 300 tokens is longer than the model's context"),
    ([{"prompt": "The dog", "target": " river", "corrupted": "A cat and a dog"}], "toy.jsonl:1: the corrupted prompt"),
    ([], "no prompts in the file"),
])
def test_bad_prompt_files_fail_in_one_line(model_dir, tmp_path, lines, message):
    prompts = _jsonl(tmp_path / "toy.jsonl", lines)
    result = run_cli("attribute", model_dir("llama", tie=True), "--prompts", prompts, "--out", tmp_path / "out")
    assert_one_line_error(result, message)
    assert not (tmp_path / "out" / "attributions").exists()


def test_bad_options_are_usage_errors(model_dir, tmp_path):
    folder = model_dir("llama", tie=True)
    missing = run_cli("attribute", folder, "--prompts", tmp_path / "none.jsonl", "--out", tmp_path)
    assert missing.exit_code == 1 and "no prompt file" in missing.stderr
    unknown = run_cli("evaluate", folder, "--prompts", "capital", "--methods", "gim,shap", "--out", tmp_path)
    assert unknown.exit_code == 2 and "unknown attribution method 'shap'" in unknown.stderr


def _right_prompts(folder: Path, path: Path) -> Path:
    """PROMPTS with target and foil ordered so that the tiny model gets each one right."""
    live = load_live(str(folder), progress=False)
    rows = []
    for row in PROMPTS:
        ids = live.tokenizer(row["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            last = live.model(ids).logits[0, -1]
        a, b = " dog", " cat"
        ta, tb = (live.tokenizer.encode(w)[0] for w in (a, b))
        rows.append({**row, "target": a if last[ta] > last[tb] else b, "foil": b if last[ta] > last[tb] else a})
    return _jsonl(path, rows)


def test_evaluate_prints_the_table_and_writes_parquet_and_curves(model_dir, tmp_path):
    folder = model_dir("llama", tie=True)
    prompts = _right_prompts(folder, tmp_path / "toy.jsonl")
    out = tmp_path / "out"
    result = run_cli("evaluate", folder, "--prompts", prompts, "--methods", "gim,attnlrp,ig,grad_x_act",
                     "--steps", "2", "--out", out, "--name", "tiny", "--max-k", "3", "-q")
    assert result.exit_code == 0, result.output
    header, _, *lines = result.stdout.splitlines()
    assert header.split() == ["model", "task", "accuracy", "prompts", "method", "comprehensiveness", "sufficiency",
                              "area_zero", "area_mean", "cost"]
    methods = [line.split()[4] for line in lines[:-1]]
    assert methods == ["gim", "attnlrp", "ig", "grad_x_act", "random", "activation"] and "3/3" in lines[0]
    table = pq.read_table(out / "attributions" / "faithfulness" / "model=tiny" / "task=toy.parquet").to_pandas()
    assert len(table) == 3 * 6 and set(table.prompt_id) == {1, 2, 3}
    methods_only = table[~table.method.isin(["random", "activation"])]
    assert (methods_only.cost > 0).all() and table[table.method == "activation"].comprehensiveness.isna().all()
    assert all(len(c) == 8 for c in table.zero_curve)  # 144 neurons: steps 1..128
    assert (out / "attributions" / "faithfulness" / "model=tiny" / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_smollm2_attribute_and_evaluate_two_capital_prompts(tmp_path):
    out = tmp_path / "out"
    prompts = _jsonl(tmp_path / "two.jsonl", [{"prompt": "The capital of France is", "target": " Paris"},
                                               {"prompt": "The capital of Japan is", "target": " Tokyo"}])
    result = run_cli("evaluate", "--prompts", prompts, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert "2/2" in result.stdout and len(result.stdout.splitlines()) == 2 + 6 + 1
    result = run_cli("attribute", "--prompts", prompts, "--method", "attnlrp", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    neurons = pq.read_table(scores_path(out, "neurons", "smollm2-135m-instruct", "two", "attnlrp"))
    assert neurons.num_rows == 2 * 30 * 1536
