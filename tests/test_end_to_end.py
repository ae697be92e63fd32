"""The embedded default model, end to end: `atlas build` with no MODEL, then DuckDB over sql/views.sql.

The reference is transformers' own GGUF loader (`from_pretrained(folder, gguf_file=...)`), which
dequantises the same file by its own tensor mapping; its `lm_head` and MLP modules give the logits.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import duckdb
import pytest
import torch

from pipeline.sources.embedded import ALIASES
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
K = 20


@pytest.fixture(scope="module")
def default_atlas(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run_cli("build", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "90 partitions written" in result.stdout
    return out


@pytest.fixture(scope="module")
def reference_model():
    from transformers import AutoModelForCausalLM

    path, _ = ALIASES["smollm2-135m-instruct"][1]()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def connect(out: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET VARIABLE atlas_root = ?", [str(out)])
    con.execute((ROOT / "sql" / "words.sql").read_text())
    con.execute((ROOT / "sql" / "views.sql").read_text())
    return con


def test_default_model_is_mapped_completely(default_atlas):
    con = connect(default_atlas)
    counts = con.execute("SELECT matrix, count(DISTINCT layer), count(*) FROM neurons GROUP BY 1 ORDER BY 1").fetchall()
    assert counts == [("down", 30, 30 * 1536), ("gate", 30, 30 * 1536), ("up", 30, 30 * 1536)]
    assert con.execute("SELECT count(*) FROM atlas").fetchone()[0] == 3 * 30 * 1536 * 2 * K
    assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == 49152


@pytest.mark.parametrize("matrix,layer,neuron", [("up", 5, 17), ("gate", 0, 1535), ("down", 29, 400)])
def test_views_answer_top_tokens_as_transformers_computes_them(default_atlas, reference_model, matrix, layer, neuron):
    mlp = reference_model.model.layers[layer].mlp
    w = {"up": mlp.up_proj.weight[neuron], "gate": mlp.gate_proj.weight[neuron],
         "down": mlp.down_proj.weight[:, neuron]}[matrix].double()
    logits = reference_model.lm_head.weight.double() @ w
    rows = connect(default_atlas).execute(
        "SELECT token_id, token, logit FROM atlas WHERE model = 'smollm2-135m-instruct' AND matrix = ? "
        "AND layer = ? AND neuron = ? AND side = 'top' ORDER BY rank", [matrix, layer, neuron]).fetchall()
    ids = torch.tensor([r[0] for r in rows])
    torch.testing.assert_close(logits[ids], logits.sort(descending=True).values[:K], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r[2] for r in rows], dtype=torch.float64), logits[ids],
                               rtol=1e-4, atol=1e-4)
