"""`atlas build` on tiny real models, checked against a brute force through the model's own modules.

The reference never touches pipeline code: it loads the saved folder with transformers, takes the
MLP weights from the modules, the LM head from `get_output_embeddings()`, and a norm's gain from the
norm module's own forward pass (so Gemma's `1 + weight` is checked, not assumed).
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.atlas import certified, job
from tests import tiny_models
from tests.conftest import run_cli

K = 5


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def blocks(model, family: str):
    """Per layer (mlp, pre-MLP norm), and the final norm, by the family's module names."""
    if family == "gpt2":
        body = model.transformer
        return [(b.mlp, b.ln_2) for b in body.h], body.ln_f
    if family == "gpt_neox":
        body = model.gpt_neox
        return [(b.mlp, b.post_attention_layernorm) for b in body.layers], body.final_layer_norm
    pre = "pre_feedforward_layernorm" if family in ("gemma2", "gemma3_text") else "post_attention_layernorm"
    return [(b.mlp, getattr(b, pre)) for b in model.model.layers], model.model.norm


def neuron_vectors(mlp, family: str, matrix: str) -> torch.Tensor:
    """[n_neurons, d_model]: what each neuron reads (up/gate rows) or writes (down columns)."""
    if family == "gpt2":  # Conv1D weights are [in, out]
        return {"up": mlp.c_fc.weight.T, "down": mlp.c_proj.weight}[matrix]
    if family == "gpt_neox":
        return {"up": mlp.dense_h_to_4h.weight, "down": mlp.dense_4h_to_h.weight.T}[matrix]
    if family == "phi3":  # the forward pass splits gate_up_proj's output as (gate, up)
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        return {"up": up, "gate": gate, "down": mlp.down_proj.weight.T}[matrix]
    return {"up": mlp.up_proj.weight, "gate": mlp.gate_proj.weight, "down": mlp.down_proj.weight.T}[matrix]


def gain(norm) -> torch.Tensor:
    """A norm's multiplicative gain, read off its forward pass on a vector of ones."""
    if isinstance(norm, torch.nn.LayerNorm):
        return norm.weight
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")
    d = norm.weight.shape[0]
    return norm(torch.ones(1, d))[0] * math.sqrt(1 + eps)


def read_partition(out, table, model, matrix, layer):
    return pq.read_table(out / table / f"model={model}" / f"matrix={matrix}" / f"layer={layer}.parquet").to_pandas()


def check_against_reference(out, slug, folder, family, norm="raw", k=K):
    model = load(folder)
    head = model.get_output_embeddings().weight.double()
    layers, final = blocks(model, family)
    matrices = ("up", "down") if family in ("gpt2", "gpt_neox") else ("up", "gate", "down")
    with torch.no_grad():
        for layer, (mlp, pre) in enumerate(layers):
            for matrix in matrices:
                w = neuron_vectors(mlp, family, matrix).double()
                raw_norm = w.norm(dim=1)
                if norm in ("final", "both"):
                    w = w * gain(final).double()
                if norm == "both" and matrix != "down":
                    w = w * gain(pre).double()
                logits = w @ head.T  # [n, V]
                atlas = read_partition(out, "atlas", slug, matrix, layer)
                neurons = read_partition(out, "neurons", slug, matrix, layer)
                assert len(neurons) == w.shape[0] and len(atlas) == 2 * k * w.shape[0]
                for side, descending in (("top", True), ("bottom", False)):
                    rows = atlas[atlas.side == side].sort_values(["neuron", "rank"])
                    ids = torch.tensor(rows.token_id.to_numpy().reshape(-1, k), dtype=torch.long)
                    expected = logits.sort(dim=1, descending=descending).values[:, :k]
                    # the reference logits of our ids are the k most extreme (equal up to exact ties)
                    torch.testing.assert_close(logits.gather(1, ids), expected, rtol=1e-5, atol=1e-5)
                    assert all(len(set(r)) == k for r in ids.tolist())
                    np.testing.assert_allclose(rows.logit.to_numpy(), logits.gather(1, ids).flatten().numpy(),
                                               rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(neurons.logit_mean, logits.mean(1).numpy(), rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(neurons.logit_std, logits.std(1, unbiased=False).numpy(), rtol=1e-4)
                np.testing.assert_allclose(neurons.norm, raw_norm.numpy(), rtol=1e-5)
                max_z = (logits.max(1).values - logits.mean(1)) / logits.std(1, unbiased=False)
                np.testing.assert_allclose(neurons.max_z, max_z.numpy(), rtol=1e-4)


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_every_family_matches_the_brute_force_reference(family, model_dir, tmp_path):
    folder = model_dir(family)
    result = run_cli("build", folder, "--out", tmp_path, "-k", K, "--quiet")
    assert result.exit_code == 0, result.output
    check_against_reference(tmp_path, folder.name, folder, family)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma", "gpt2", "phi3"])
@pytest.mark.parametrize("norm", ["final", "both"])
def test_norm_folding_matches_the_norm_modules(family, norm, model_dir, tmp_path):
    folder = model_dir(family)
    assert run_cli("build", folder, "--out", tmp_path, "-k", K, "--norm", norm, "-q").exit_code == 0
    check_against_reference(tmp_path, folder.name, folder, family, norm=norm)


@pytest.mark.parametrize("options", [dict(tie=False), dict(tie=True), dict(sharded=True),
                                     dict(pad_vocab=8), dict(dtype=torch.bfloat16)])
def test_head_tying_sharding_padding_and_bf16_checkpoints(options, model_dir, tmp_path):
    folder = model_dir("llama", **options)
    if options.get("sharded"):
        assert len(list(folder.glob("*.safetensors"))) > 1
    assert run_cli("build", folder, "--out", tmp_path, "-k", K, "-q").exit_code == 0
    check_against_reference(tmp_path, folder.name, folder, "llama")
    if options.get("pad_vocab"):
        tokens = pq.read_table(tmp_path / "tokens" / f"model={folder.name}" / "tokens.parquet").to_pandas()
        assert tokens.token.iloc[-1].startswith("<unused:") and tokens.is_special.iloc[-1]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_gguf_gives_the_same_atlas_as_the_safetensors_folder(family, model_dir, tmp_path):
    """F32 GGUF: same tokens, same order; the Gemma `+1` stored in GGUF norms is not added twice."""
    folder = model_dir(family)
    gguf_file = tiny_models.build_gguf(folder, tmp_path / "tiny.gguf")
    for source, name in ((folder, "st"), (gguf_file, "gg")):
        assert run_cli("build", source, "--out", tmp_path / "out", "--name", name, "-k", K,
                       "--norm", "both", "-q").exit_code == 0
    check_against_reference(tmp_path / "out", "gg", folder, family, norm="both")
    for table in ("atlas", "neurons"):
        st = read_partition(tmp_path / "out", table, "st", "up", 1).drop(columns="model")
        gg = read_partition(tmp_path / "out", table, "gg", "up", 1).drop(columns="model")
        assert st.select_dtypes(exclude="float").equals(gg.select_dtypes(exclude="float"))


def test_quantised_gguf_matches_its_own_dequantised_weights(model_dir, tmp_path):
    import gguf

    folder = model_dir("llama", d_model=64, d_ff=96)
    path = tiny_models.build_gguf(folder, tmp_path / "q8.gguf", quant="Q8_0")
    assert run_cli("build", path, "--out", tmp_path, "-k", K, "--matrices", "down", "-q").exit_code == 0
    reader = gguf.GGUFReader(path)
    t = {t.name: t for t in reader.tensors}
    deq = lambda name: torch.from_numpy(gguf.quants.dequantize(t[name].data, t[name].tensor_type)).double()
    head = deq("output.weight" if "output.weight" in t else "token_embd.weight")
    for layer in range(3):
        logits = deq(f"blk.{layer}.ffn_down.weight").T @ head.T
        atlas = read_partition(tmp_path, "atlas", "q8", "down", layer)
        top = atlas[atlas.side == "top"].sort_values(["neuron", "rank"])
        ids = torch.tensor(top.token_id.to_numpy().reshape(-1, K))
        torch.testing.assert_close(logits.gather(1, ids), logits.sort(1, descending=True).values[:, :K])


def test_tokens_table_reads_like_the_tokenizer(model_dir, tmp_path):
    from transformers import AutoTokenizer

    for family in ("llama", "gemma3_text"):  # byte-level BPE and SentencePiece
        folder = model_dir(family)
        assert run_cli("build", folder, "--out", tmp_path, "--layers", "0", "-q").exit_code == 0
        tokens = pq.read_table(tmp_path / "tokens" / f"model={folder.name}" / "tokens.parquet").to_pandas()
        tok = AutoTokenizer.from_pretrained(folder)
        anchor = tok.convert_tokens_to_ids(tok.tokenize("a")[-1])
        prefix = tok.decode([anchor])
        checked = 0
        for row in tokens.itertuples():
            if row.is_special or "\\x" in row.token:
                continue
            assert tok.decode([anchor, row.token_id]).removeprefix(prefix) == row.token, row
            checked += 1
        assert checked > 0.6 * len(tokens)
        dog = tokens[tokens.token == " dog"]
        assert len(dog) == 1 and dog.is_word.item() and not dog.piece.item().startswith(" ")


def test_metadata_carries_provenance(model_dir, tmp_path):
    import hashlib

    folder = model_dir("qwen2")
    assert run_cli("build", folder, "--out", tmp_path, "-k", 7, "--norm", "final", "-q").exit_code == 0
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1
    sha = hashlib.sha256(files[0].read_bytes()).hexdigest()
    for path in tmp_path.rglob("*.parquet"):
        meta = {k.decode(): v.decode() for k, v in pq.read_schema(path).metadata.items() if k.startswith(b"atlas.")}
        assert meta["atlas.source_sha256"] == sha
        assert meta["atlas.model"] == folder.name and meta["atlas.architecture"] == "qwen2"
        assert meta["atlas.k"] == "7" and meta["atlas.norm"] == "final"
        assert meta["atlas.dtype"] in ("float32", "bfloat16")  # auto: whichever multiplies faster here
        assert {"atlas.source_path", "atlas.package_version", "atlas.created_at", "atlas.table"} <= set(meta)
        if meta["atlas.table"] != "tokens":
            assert meta["atlas.matrix"] in path.parent.name and meta["atlas.layer"] in path.name


def test_a_sharded_checkpoint_is_hashed_once_per_shard_and_cached(model_dir, tmp_path):
    import hashlib
    import json
    import os
    import shutil

    from pipeline.sources import open_source
    from pipeline.sources.base import source_sha256

    folder = shutil.copytree(model_dir("llama", sharded=True), tmp_path / "model")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 2
    lines = "".join(f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in shards)
    cache = tmp_path / "sha256.json"
    source = open_source(folder)
    assert source_sha256(source, cache) == hashlib.sha256(lines.encode()).hexdigest()
    entries = json.loads(cache.read_text())
    assert len(entries) == len(shards)
    key = next(k for k in entries if k.startswith(f"{shards[0]}:"))
    cache.write_text(json.dumps({**entries, key: "0" * 64}))  # a cached digest is believed while size and mtime hold
    assert source_sha256(source, cache) != hashlib.sha256(lines.encode()).hexdigest()
    os.utime(shards[0], ns=(0, 0))
    assert source_sha256(source, cache) == hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])  # bf16: the head is kept once, in bf16
def test_bf16_and_fp32_compute_give_the_identical_atlas(model_dir, tmp_path, stored):
    """The compute dtype is a speed choice only: certified candidates make both builds byte-for-byte equal."""
    folder = model_dir("llama", tie=True, dtype=stored)
    for dtype in ("float32", "bfloat16"):
        assert run_cli("build", folder, "--out", tmp_path / dtype, "--dtype", dtype, "-q").exit_code == 0
    files = sorted((tmp_path / "float32").rglob("*.parquet"))
    assert len(files) == 2 * 9 + 1  # atlas and neurons for 3 layers × 3 matrices, and tokens
    for path in files:
        twin = tmp_path / "bfloat16" / path.relative_to(tmp_path / "float32")
        assert pq.read_table(path).equals(pq.read_table(twin)), path
        assert pq.read_schema(twin).metadata[b"atlas.dtype"] == b"bfloat16"


def test_lanes_give_the_atlas_of_one_lane_and_leave_torch_threads_as_they_were(model_dir, tmp_path):
    """A build runs a partition per core; which lane finishes first changes nothing written."""
    folder = model_dir("llama", tie=True)
    threads = torch.get_num_threads()
    runs = {"1": (1, []), "3": (3, []), "2 of 1 core": (1, ["--lanes", "2"]), "1 of 2 cores": (2, ["--lanes", "1"])}
    try:
        for name, (cores, option) in runs.items():
            torch.set_num_threads(cores)
            assert run_cli("build", folder, "--out", tmp_path / name, *option, "-q").exit_code == 0
            assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(threads)
    for path in sorted((tmp_path / "1").rglob("*.parquet")):
        for name in runs:
            assert pq.read_table(path).equals(pq.read_table(tmp_path / name / path.relative_to(tmp_path / "1"))), path


def test_several_blocks_and_row_groups_a_partition_write_the_atlas_of_one(model_dir, tmp_path, monkeypatch):
    """A partition projected in several blocks (the short rows of one riding along the next one's scan)
    and written in several row groups holds the rows of a one-block build, and matches the reference."""
    folder = model_dir("llama", d_ff=96)
    assert run_cli("build", folder, "--out", tmp_path / "one", "-k", K, "-q").exit_code == 0
    monkeypatch.setattr(job, "PRODUCT_BLOCK", 32)  # blocks of 32 neurons, row groups of 16
    monkeypatch.setattr(certified, "FLOOR_TAIL", 0.0)  # floors too high: rows fall short, and ride along
    monkeypatch.setattr(certified, "FLOOR_ABOVE", 0.25)
    short, short_rows = [], certified.short_rows
    monkeypatch.setattr(certified, "short_rows", lambda found: short.append(len(rows := short_rows(found))) or rows)
    assert run_cli("build", folder, "--out", tmp_path / "many", "-k", K, "--block-size", "16", "-q").exit_code == 0
    assert sum(short) > 96  # blocks whose every row fell short among them: nothing left to settle at once
    check_against_reference(tmp_path / "many", folder.name, folder, "llama")
    for path in sorted((tmp_path / "one").rglob("layer=*.parquet")):
        twin = tmp_path / "many" / path.relative_to(tmp_path / "one")
        assert pq.read_table(path).equals(pq.read_table(twin)), path
        assert (pq.ParquetFile(path).num_row_groups, pq.ParquetFile(twin).num_row_groups) == (1, 96 // 16)


def test_reading_keeps_no_mapping_of_the_checkpoint(model_dir):
    """Memory stays bounded: a mapped shard's touched pages count in the process until it is unmapped,
    so after reading every tensor no shard may still be mapped."""
    from pathlib import Path

    from pipeline.sources import open_source

    source = open_source(model_dir("llama", sharded=True))
    for name in source.names():
        assert source.read(name).dtype == torch.float32
    maps = Path("/proc/self/maps").read_text()
    assert len(source.files()) > 1
    assert not [shard for shard in source.files() if str(shard) in maps]


@pytest.mark.parametrize("form", ["sharded safetensors", "F32 GGUF", "Q8_0 GGUF"])
def test_every_read_returns_a_tensor_the_caller_owns(model_dir, tmp_path, form):
    """The build folds the final norm's gain into the head in place, so the head is in memory once:
    a read may alias neither the checkpoint's mapping nor another read."""
    from pathlib import Path

    from pipeline.sources import open_source

    folder = model_dir("llama", sharded=True, d_model=64, d_ff=96)
    path = folder if form.endswith("safetensors") else tiny_models.build_gguf(folder, tmp_path / "m.gguf",
                                                                              quant=form.split()[0])
    source = open_source(path)
    for name in source.names():
        first = source.read(name)
        mapped = [line.split()[0].split("-") for line in Path("/proc/self/maps").read_text().splitlines()
                  if line.endswith(tuple(str(f) for f in source.files()))]
        assert not [r for r in mapped if int(r[0], 16) <= first.data_ptr() < int(r[1], 16)], name
        first.add_(1)  # would crash on a read-only mapping; the check above fails first
        assert torch.equal(first, source.read(name) + 1), name


@pytest.mark.parametrize("family, stored, form", [
    ("llama", torch.bfloat16, "safetensors"), ("llama", torch.float16, "safetensors"),
    ("llama", torch.float32, "safetensors"), ("llama", torch.float32, "Q8_0 GGUF"),
    ("phi3", torch.bfloat16, "safetensors"), ("gpt2", torch.bfloat16, "safetensors")])  # fused gate_up; Conv1D
def test_compact_reads_keep_a_16_bit_checkpoint_as_stored_and_equal_the_float32_reads(model_dir, tmp_path,
                                                                                      family, stored, form):
    """What an accelerator is sent: bf16 and fp16 tensors as stored (half the bytes), anything else as
    float32, each exactly the float32 read once converted; neuron vectors too, split or transposed."""
    from pipeline.arch import ArchAdapter
    from pipeline.sources import open_source

    folder = model_dir(family, sharded=True, tie=False, dtype=stored, d_model=64, d_ff=96)  # Q8_0 blocks of 32
    path = folder if form == "safetensors" else tiny_models.build_gguf(folder, tmp_path / "m.gguf", quant="Q8_0")
    source = open_source(path)
    sent = stored if form == "safetensors" else torch.float32
    for name in source.names():
        compact = source.read(name, compact=True)
        assert compact.dtype == sent, name
        assert torch.equal(compact.float(), source.read(name)), name
    adapter = ArchAdapter(source)
    rows = slice(3, 17)
    assert torch.equal(adapter.head(rows, compact=True).float(), adapter.head(rows))
    for matrix in adapter.matrices:
        compact = adapter.neuron_vectors(matrix, 1, compact=True)
        assert compact.dtype == sent and torch.equal(compact.float(), adapter.neuron_vectors(matrix, 1)), matrix


def test_compact_reads_change_no_bit_of_the_atlas(model_dir, tmp_path, monkeypatch):
    """An accelerator's build converts a bf16 checkpoint after the copy and folds the gains there; run on
    the CPU, that order writes the files of the float32 reads."""
    from pipeline.atlas.job import AtlasJob

    folder = model_dir("llama", tie=False, dtype=torch.bfloat16)
    options = ["--norm", "both", "-q"]
    assert run_cli("build", folder, "--out", tmp_path / "float32", *options).exit_code == 0
    monkeypatch.setattr(AtlasJob, "_compact", property(lambda self: True))
    assert run_cli("build", folder, "--out", tmp_path / "compact", *options).exit_code == 0
    files = sorted((tmp_path / "float32").rglob("*.parquet"))
    assert len(files) == 2 * 9 + 1
    for path in files:
        assert pq.read_table(path).equals(pq.read_table(tmp_path / "compact" / path.relative_to(tmp_path / "float32")))
