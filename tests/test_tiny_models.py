"""Self-test of the tiny model factories, so other tests can trust their fixtures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, load_gguf_checkpoint

from tests import tiny_models as tm

SENTENCE = "The dog drinks water in California, café!"
Q8_BLOCK = 32


def _ids(vocab: int, length: int = 24) -> torch.Tensor:
    """A fixed batch of token ids, longer than Gemma's tiny sliding window."""
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))


def _logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits without autograd."""
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece"])
def test_tokenizer_words_and_pieces(tmp_path: Path, kind: str) -> None:
    """Key words are single pieces in the expected style, so tests can rely on them."""
    tokenizer = tm.build_tokenizer(tmp_path, kind)
    space = "Ġ" if kind == "bytelevel" else "▁"
    for word in ("dog", "water", "California"):
        assert tokenizer.tokenize(f" {word}") == [f"{space}{word}"]
    vocab = tokenizer.get_vocab()
    if kind == "bytelevel":
        assert vocab["<|endoftext|>"] == 0 and 380 <= len(tokenizer) <= 420
        assert tokenizer(SENTENCE).input_ids[0] != tokenizer.bos_token_id
    else:
        assert [vocab[t] for t in tm.SENTENCEPIECE_SPECIALS] == [0, 1, 2, 3]
        assert all(f"<0x{b:02X}>" in vocab for b in range(256))
        assert "<0xC3>" in tokenizer.tokenize("é")  # byte fallback
        assert tokenizer(SENTENCE).input_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(tokenizer(SENTENCE).input_ids, skip_special_tokens=True) == SENTENCE


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece"])
def test_tokenizer_is_deterministic_and_reloads(tmp_path: Path, kind: str) -> None:
    """Same vocabulary on every build, and the saved files load offline."""
    first = tm.build_tokenizer(tmp_path / "a", kind)
    tm.build_tokenizer(tmp_path / "b", kind)
    assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "a")
    assert reloaded(SENTENCE).input_ids == first(SENTENCE).input_ids


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_family_saves_and_reloads(tmp_path: Path, family: str) -> None:
    """Every family runs, reloads bit-exactly, and has gains far from their neutral value."""
    folder = tm.build_hf_model(tmp_path, family)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    in_memory = tm.make_hf_model(family, tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.config.model_type == family
    assert reloaded.config.vocab_size == len(tokenizer)
    assert reloaded.config.eos_token_id == tokenizer.eos_token_id
    ids = _ids(len(tokenizer))
    logits = _logits(reloaded, ids)
    assert torch.isfinite(logits).all() and logits.std() > 0.5
    assert torch.equal(logits, _logits(in_memory, ids))
    gains = [p for n, p in in_memory.named_parameters() if p.ndim == 1 and ("norm" in n or ".ln_" in n)]
    centre = 0.0 if family.startswith("gemma") else 1.0
    assert gains and all((g - centre).abs().max() > 0.3 for g in gains)


def test_sharded_save(tmp_path: Path) -> None:
    """Sharded saves really are sharded and hold the same model."""
    folder = tm.build_hf_model(tmp_path / "sharded", "llama", sharded=True)
    single = tm.build_hf_model(tmp_path / "single", "llama")
    shards = sorted(folder.glob("*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert not list(single.glob("*.index.json"))
    ids = _ids(len(transformers.AutoTokenizer.from_pretrained(single)))
    sharded_logits = _logits(transformers.AutoModelForCausalLM.from_pretrained(folder), ids)
    assert torch.equal(sharded_logits, _logits(transformers.AutoModelForCausalLM.from_pretrained(single), ids))


@pytest.mark.parametrize(("family", "tie"), [("llama", True), ("gemma3_text", False), ("gpt2", None)])
def test_tie_override_and_padded_vocab(tmp_path: Path, family: str, tie: bool | None) -> None:
    """The caller controls tying, and padding shows in vocab_size only."""
    folder = tm.build_hf_model(tmp_path, family, tie=tie, pad_vocab=7)
    config = transformers.AutoConfig.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert config.vocab_size == len(tokenizer) + 7
    assert config.tie_word_embeddings == (True if tie is None else tie)
    assert ("lm_head.weight" in tm.load_saved_tensors(folder)) == (not config.tie_word_embeddings)


def test_dtype_and_other_tokenizer_kind(tmp_path: Path) -> None:
    """bf16 saves stay bf16, and any family can take the other tokenizer kind."""
    folder = tm.build_hf_model(tmp_path, "qwen3", dtype=torch.bfloat16, tokenizer_kind="sentencepiece")
    assert {t.dtype for t in tm.load_saved_tensors(folder).values()} == {torch.bfloat16}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.config.bos_token_id == 2 and torch.isfinite(_logits(model, _ids(460)).float()).all()


GGUF_CASES = [
    ("llama", "F32", {}),
    ("qwen2", "F32", {"tie": True}),
    ("gemma3_text", "F32", {"n_layers": 7, "pad_vocab": 3}),
    ("llama", "Q8_0", {"d_model": 64, "d_ff": 96}),
    ("gemma3_text", "Q8_0", {"d_model": 64, "d_ff": 96, "tie": False}),
]


@pytest.fixture(scope="module", params=GGUF_CASES, ids=[f"{f}-{q}" for f, q, _ in GGUF_CASES])
def gguf_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """An HF folder with its GGUF written inside it: (folder, gguf file name, quant)."""
    family, quant, kwargs = request.param
    folder = tm.build_hf_model(tmp_path_factory.mktemp(family), family, **kwargs)
    name = f"tiny-{family}-{quant}.gguf"
    tm.build_gguf(folder, folder / name, quant=quant)
    return folder, name, quant


def test_gguf_metadata(gguf_case: tuple[Path, str, str]) -> None:
    """The keys llama.cpp reads are present and agree with the HF config."""
    folder, name, _ = gguf_case
    config = transformers.AutoConfig.from_pretrained(folder)
    fields = gguf.GGUFReader(folder / name).fields
    arch = tm.GGUF_ARCH[config.model_type]

    def value(key: str) -> object:
        return fields[key].contents()

    assert value("general.architecture") == arch
    assert value(f"{arch}.block_count") == config.num_hidden_layers
    assert value(f"{arch}.embedding_length") == config.hidden_size
    assert value(f"{arch}.feed_forward_length") == config.intermediate_size
    assert value(f"{arch}.attention.head_count_kv") == config.num_key_value_heads
    assert len(value("tokenizer.ggml.tokens")) == config.vocab_size
    assert value("tokenizer.ggml.bos_token_id") == config.bos_token_id
    if arch == "gemma3":
        assert value("gemma3.attention.sliding_window") == config.sliding_window
        assert value("tokenizer.ggml.model") == "llama"
        assert value("tokenizer.ggml.token_type")[4] == gguf.TokenType.BYTE
    else:
        assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.merges")


def test_gguf_tensors_match_hf(gguf_case: tuple[Path, str, str]) -> None:
    """Every tensor is the HF one, up to the documented permutation, Gemma +1 and Q8_0 rounding."""
    folder, name, quant = gguf_case
    config = transformers.AutoConfig.from_pretrained(folder)
    hf = {k: v.float().numpy() for k, v in tm.load_saved_tensors(folder).items()}
    arch = tm.GGUF_ARCH[config.model_type]
    tensors = {t.name: t for t in gguf.GGUFReader(folder / name).tensors}
    assert len(tensors) == len(hf) and ("output.weight" in tensors) == ("lm_head.weight" in hf)
    unpermute = LlamaTensorProcessor(
        {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    )
    for hf_name, expected in hf.items():
        tensor = tensors[tm.gguf_tensor_name(hf_name, arch, config.num_hidden_layers)]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert got.shape == expected.shape, hf_name
        if arch == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            got = unpermute.process(got, tensor.name).weights  # transformers' own inverse
            assert not np.array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type), expected)
        if arch == "gemma3" and tensor.name.endswith("norm.weight"):
            expected = expected + np.float32(1.0)
        if quant == "Q8_0" and expected.ndim == 2:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
            # half a step of amax/127, plus 127 steps of the float16 rounding of that step
            steps = np.abs(expected).reshape(expected.shape[0], -1, Q8_BLOCK).max(axis=-1, keepdims=True) / 127
            bound = np.repeat(steps * (0.5 + 127 * 2.0**-11), Q8_BLOCK, axis=-1).reshape(expected.shape)
            assert (np.abs(got - expected) <= bound).all(), hf_name
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(got, expected, err_msg=hf_name)


def _expected_model(folder: Path, quant: str) -> transformers.PreTrainedModel:
    """The HF model with its matrices rounded through `quant`, as a GGUF reader should see it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    if quant == "F32":
        return model
    qtype = gguf.GGMLQuantizationType[quant]
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                rounded = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
                param.copy_(torch.from_numpy(rounded))
    return model


def test_gguf_through_transformers_reader(gguf_case: tuple[Path, str, str]) -> None:
    """What from_pretrained(gguf_file=...) does, minus its accelerate requirement."""
    folder, name, quant = gguf_case
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    parsed = load_gguf_checkpoint(str(folder / name), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert config.tie_word_embeddings == ("lm_head.weight" in missing)
    expected = _expected_model(folder, quant)
    ids = _ids(expected.config.vocab_size)
    torch.testing.assert_close(_logits(model, ids), _logits(expected, ids), atol=1e-4, rtol=0)


NO_ACCELERATE = importlib.util.find_spec("accelerate") is None


@pytest.mark.skipif(NO_ACCELERATE, reason="transformers refuses gguf_file= without accelerate installed")
def test_gguf_from_pretrained(gguf_case: tuple[Path, str, str]) -> None:
    """The user-facing load path: F32 reproduces the logits, Q8_0 those of the rounded weights."""
    folder, name, quant = gguf_case
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    expected = _expected_model(folder, quant)
    ids = _ids(expected.config.vocab_size)
    torch.testing.assert_close(_logits(loaded, ids), _logits(expected, ids), atol=1e-4, rtol=0)


def test_gguf_tokenizer(gguf_case: tuple[Path, str, str]) -> None:
    """The tokenizer transformers rebuilds from the GGUF metadata gives the original ids."""
    folder, name, _ = gguf_case
    original = transformers.AutoTokenizer.from_pretrained(folder)
    from_gguf = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in (SENTENCE, "Paris is the capital of France. <|endoftext|>"):
        assert from_gguf(text).input_ids == original(text).input_ids


def test_truncate(gguf_case: tuple[Path, str, str]) -> None:
    """A truncated copy lands next to the file and fails to parse."""
    folder, name, _ = gguf_case
    cut = tm.truncate(folder / name, 0.5)
    assert cut.parent == folder and cut != folder / name
    assert cut.stat().st_size == (folder / name).stat().st_size // 2
    with pytest.raises(ValueError):
        gguf.GGUFReader(cut)
