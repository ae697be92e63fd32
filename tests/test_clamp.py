"""Clamping experiments end to end on tiny real models: the CLI, its rows against direct computations,
candidates from SQL, bad input; and one slow run on the real SmolLM2 (hook correctness: test_live_hooks.py)."""
from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import transformers

from pipeline.clamp.config import NeuronSpec, parse_neuron
from pipeline.clamp.experiment import prompt_ids
from pipeline.clamp.inputs import read_prompts
from pipeline.clamp.measure import mentions, next_token
from pipeline.clamp.results import CLAMP
from pipeline.errors import AtlasError
from pipeline.live.hooks import Clamp, captured, clamped
from pipeline.live.load import load_live
from pipeline.query import run_sql
from pipeline.sources import resolve
from tests.conftest import run_cli
from tests.test_bad_input import assert_one_line_error

PROMPTS = ("The dog drinks", "Water is the most important thing for a")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def results(out: Path) -> tuple[list[dict], dict[str, str], Path]:
    """The rows and `atlas.*` metadata of the one results file under `out/clamp/`."""
    (path,) = sorted((out / "clamp").rglob("*.parquet"))
    meta = pq.read_schema(path).metadata
    return pq.read_table(path).to_pylist(), {k.decode(): v.decode() for k, v in meta.items()}, path


def test_probability_mode_rows_match_direct_computation(model_dir, prompt_file, tmp_path):
    folder, out = model_dir("llama"), tmp_path / "out"
    args = ("clamp", folder, "--neuron", "1:3", "--neuron", "2:5:-4", "--values", "0,10", "--prompts", prompt_file,
            "--target", " water", "--out", out, "--quiet")
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    rows, meta, path = results(out)
    assert pq.read_schema(path).remove_metadata() == CLAMP and path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert [(r["layer"], r["neuron"], r["value"]) for r in rows[:3]] == [(1, 3, 0.0), (1, 3, 10.0), (2, 5, -4.0)]
    assert len(rows) == 6 and {r["prompt"] for r in rows} == set(PROMPTS) and "1:3" in result.stdout
    assert meta["atlas.table"] == "clamp" and meta["atlas.source_format"] == "safetensors"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    water = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip().lower() in ("water", "waters")]
    assert json.loads(meta["atlas.target_ids"]) == {" water": water}
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
            p0 = model(ids).logits[0, -1].double().softmax(-1)
            with clamped(model, [Clamp(row["layer"], row["neuron"], row["value"])]):
                p = model(ids).logits[0, -1].double().softmax(-1)
            q, q0 = p[water].sum().item(), p0[water].sum().item()
            assert row["p_target_unclamped"] == pytest.approx(q0, rel=1e-9)
            assert row["p_target"] == pytest.approx(q, rel=1e-9)
            assert row["log_odds_change"] == pytest.approx(math.log(q / (1 - q)) - math.log(q0 / (1 - q0)), rel=1e-6)
            assert row["kl"] == pytest.approx((p * (p / p0).log()).sum().item(), rel=1e-6, abs=1e-12)
            assert row["top1"] == tokenizer.decode([int(p.argmax())])
    assert run_cli(*args).exit_code == 0 and results(out)[2] == path  # a rerun replaces its own file
    assert not list(out.rglob("*.tmp"))


def with_chat_template(folder: Path, dest: Path) -> Path:
    """A copy of a tiny model whose tokenizer has a chat template."""
    shutil.copytree(folder, dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>{% endif %}")
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def test_generation_mode_same_seed_and_chat_template(model_dir, tmp_path):
    folder = with_chat_template(model_dir("llama"), tmp_path / "chat")
    live = load_live(str(folder), progress=False)
    ask = "Is the dog in the river"
    prompt = prompt_ids(live, ask)
    assert live.tokenizer.decode(prompt[0]) == f"<|im_start|>{ask}<|im_end|><|im_start|>"
    with torch.no_grad(), captured(live.model, "act", layers=[1]) as caps:
        live.model(prompt)
    own = caps[0].values[0, -1, 3].item()  # the neuron's activation where `last` clamps it
    out = tmp_path / "out"
    result = run_cli("clamp", folder, "--neuron", f"1:3:{own!r}", "--neuron", "2:5:50", "--positions", "last",
                     "--ask", ask, "--samples", "4", "--max-new-tokens", "8", "--target", "dog", "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    rows, meta, _ = results(out)
    own_rows, strong_rows = rows[:4], rows[4:]
    assert [r["sample"] for r in rows] == [0, 1, 2, 3] * 2 and meta["atlas.mode"] == "generation"
    assert all(r["text"] == r["text_unclamped"] for r in own_rows)  # same seed, same activation: same answers
    assert any(r["text"] != r["text_unclamped"] for r in strong_rows)
    for r in rows:
        assert r["mentions"] == bool(re.search(r"\bdogs?\b", r["text"], re.IGNORECASE))
        assert r["p_target"] is None and r["prompt"] == ask and r["seed"] == 0


def test_candidates_from_sql_join_to_neurons(model_dir, prompt_file, tmp_path):
    folder, out = model_dir("llama"), tmp_path / "out"
    assert run_cli("build", folder, "--out", out, "-k", "50", "--quiet").exit_code == 0
    model = resolve(str(folder)).slug
    best = run_sql(out, "clamp_candidates", {"concept": "water", "model": model}).to_pylist()[:2]
    result = run_cli("clamp", folder, "--candidates", "clamp_candidates", "--var", "concept=water", "--top", "2",
                     "--values", "3", "--prompts", prompt_file, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    rows, meta, path = results(out)
    assert [f"{r['layer']}:{r['neuron']}" for r in rows[:2]] == [b["spec"] for b in best]
    assert all(r["value"] == 3.0 * b["sign"] for r, b in zip(rows, best)) and meta["atlas.targets"] == '["water"]'
    join = tmp_path / "join.sql"
    join.write_text("SELECT count(*) AS n FROM read_parquet(getvariable('clamp')) AS c "
                    "JOIN neurons USING (model, layer, neuron) WHERE matrix = 'down'")
    assert run_sql(out, join, {"clamp": str(path)}).to_pylist() == [{"n": len(rows)}]
    effects = run_sql(out, Path(__file__).parent.parent / "examples" / "clamp_effects.sql", {}).to_pylist()
    per_neuron = Counter((r["layer"], r["neuron"]) for r in rows)
    assert [(e["layer"], e["neuron"], e["n"]) for e in effects] == [(*key, n) for key, n in sorted(per_neuron.items())]
    custom = tmp_path / "mine.sql"
    custom.write_text(f"SELECT * FROM (VALUES ('other', '0:1', 1), ('{model}', '1:2', -1), ('{model}', '2:3:7', 1))"
                      " AS t(model, spec, sign)")
    shutil.rmtree(out / "clamp")
    result = run_cli("clamp", folder, "--candidates", custom, "--values", "0,5", "--prompts", prompt_file,
                     "--target", "dog", "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    rows = results(out)[0]
    assert sorted({(r["layer"], r["neuron"], r["value"]) for r in rows}) == [(1, 2, -5.0), (1, 2, 0.0), (2, 3, 7.0)]


@pytest.mark.parametrize("extra, fragment", [
    (["--neuron", "3:0"], "layer 3 is out of range: the model has layers 0-2"),
    (["--neuron", "0:48"], "neuron 48 is out of range: layer 0 has neurons 0-47"),
    (["--neuron", "0:1", "--target", "zzqx"], "the target 'zzqx' maps to no token"),
    (["--neuron", "0:1", "--candidates", "x.sql"], ""),  # usage: one way to pick neurons
])
def test_bad_input_one_line(model_dir, prompt_file, tmp_path, extra, fragment):
    args = ["clamp", model_dir("llama"), "--prompts", prompt_file, "--out", tmp_path, *extra]
    if "--target" not in extra:
        args += ["--target", "water"]
    if fragment:
        assert_one_line_error(run_cli(*args), 1, fragment)
    else:
        assert_one_line_error(run_cli(*args), 2, "--neuron L:N[:VALUE] (repeatable) or --candidates")
    assert not list(tmp_path.rglob("*.parquet"))


def test_bad_files_and_options(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    base = ["clamp", model_dir("llama"), "--out", tmp_path / "out", "--target", "water"]
    assert_one_line_error(run_cli(*base, "--neuron", "0:1", "--prompts", empty), 1, "holds no prompt")
    assert_one_line_error(run_cli(*base, "--candidates", "clamp_candidates", "--prompts", empty), 1, "holds no prompt")
    (tmp_path / "p.txt").write_text("The dog\n")
    prompts = ["--prompts", tmp_path / "p.txt"]
    assert_one_line_error(run_cli(*base, "--candidates", "clamp_candidates", "--var", "concept=water", *prompts), 1,
                          "no atlas under")
    assert_one_line_error(run_cli(*base, "--neuron", "x:1", *prompts), 2, "invalid neuron 'x:1'")
    assert_one_line_error(run_cli(*base, "--neuron", "0:1", "--values", "1,nan", *prompts), 2, "not a finite number")
    assert_one_line_error(run_cli(*base, "--neuron", "0:1", "--positions", "generated", *prompts), 2,
                          "needs generation")
    assert_one_line_error(run_cli(*base, "--neuron", "0:1", *prompts, "--ask", "Hi"), 2, "choose one mode")
    assert_one_line_error(run_cli(*base, "--neuron", "0:1", "--var", "a=b", *prompts), 2, "--var sets variables")
    assert_one_line_error(run_cli(*base[:-2], "--neuron", "0:1", *prompts), 2, "--target WORD is needed")
    assert_one_line_error(run_cli("clamp", model_dir("gpt2"), "--out", tmp_path / "out", "--target", "water",
                                  "--neuron", "0:1", "--site", "gate", *prompts), 1, "no gate branch")
    assert not list(tmp_path.rglob("*.parquet"))


def test_read_prompts(tmp_path):
    plain, jsonl, bad = tmp_path / "p.txt", tmp_path / "p.jsonl", tmp_path / "bad.jsonl"
    plain.write_text("a glass of \r\n\n{not json}\n")
    jsonl.write_text('"first"\n{"prompt": "second", "id": 2}\n')
    bad.write_text('"ok"\n{"text": "no prompt"}\n')
    assert read_prompts(plain) == ["a glass of ", "{not json}"]
    assert read_prompts(jsonl) == ["first", "second"]
    with pytest.raises(AtlasError, match=r"bad.jsonl:2: expected a JSON string or an object with a \"prompt\""):
        read_prompts(bad)
    with pytest.raises(AtlasError, match="cannot read the prompt file"):
        read_prompts(tmp_path / "missing.txt")


def test_parse_neuron_and_doses():
    assert parse_neuron("23:1413").doses((0.0, 5.0)) == (0.0, 5.0)
    assert parse_neuron(" 23 : 1413 : -2.5 ").doses((0.0, 5.0)) == (-2.5,)
    assert NeuronSpec(2, 3, sign=-1).doses((0.0, 5.0)) == (0.0, -5.0)
    for bad in ("23", "23:x", "-1:2", "1:2:3:4", "1:2:inf"):
        with pytest.raises(AtlasError):
            parse_neuron(bad)


def test_next_token_statistics_keep_tiny_probabilities():
    unclamped = torch.tensor([0.0, 0.0, -80.0, 5.0])
    clamped_logits = torch.tensor([0.0, 0.0, -60.0, 5.0])
    s = next_token(clamped_logits, unclamped, torch.tensor([2]))
    p0 = math.exp(-80) / (2 + math.exp(5) + math.exp(-80))
    assert s.p_target_unclamped == pytest.approx(p0, rel=1e-9)
    assert s.log_odds_change == pytest.approx(20.0, rel=1e-6) and s.top1 == s.top1_unclamped == 3
    same = next_token(unclamped, unclamped, torch.tensor([0, 1]))
    assert same.kl == 0.0 and same.log_odds_change == 0.0


def test_mentions_use_the_word_rule():
    texts = ["Water, please.", "I love WATERS", "waterfall", "no", "hot-water bottle"]
    assert mentions(texts, (" water",)) == [True, True, False, False, True]
    assert mentions(["cats and dogs"], ("dog", "cat")) == [True]


@pytest.mark.slow
def test_real_smollm2_water_neuron_raises_p_water(tmp_path):
    """The down column of layer 23 neuron 1413 decodes to ' water' (README); clamped high, it writes water."""
    prompts = tmp_path / "water.txt"
    prompts.write_text("Fill the bucket with\nThe recipe calls for two cups of\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run_cli("clamp", "--neuron", "23:1413", "--values", "0,50", "--prompts", prompts,
                         "--target", " water", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.stderr
    rows = results(tmp_path / "out")[0]
    p = {v: sum(r["p_target"] for r in rows if r["value"] == v) / 2 for v in (0.0, 50.0)}
    p0 = sum(r["p_target_unclamped"] for r in rows) / len(rows)
    assert p0 < 0.05 and p[50.0] > 0.2 and p[50.0] > 5 * p0 and p[0.0] < 2 * p0  # measured: 2.0% -> 53%
