"""Tiny, seeded, real Hugging Face models and GGUF files, built offline for tests."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = (
    "The dog drinks water from the river.",
    "A dog is a good friend of the family.",
    "The dogs run along the river in California.",
    "Dog owners in California walk their dogs every day.",
    "Water is the most important thing for a dog.",
    "The cat sleeps while the dog drinks water.",
    "Paris is the capital of France.",
    "The capital of France is a city on a river.",
    "California is a state with a lot of sun and little water.",
    "Water flows from the mountains of California to the sea.",
    "The city of Paris is a city of art and water.",
    "A cat and a dog play in the city.",
    "The river in the city is full of water.",
    "Water in California is a topic of the day.",
    "My dog swims in the water of the river.",
    "The cat is not a friend of the water.",
    "France is a country with a capital called Paris.",
    "The dog and the cat sleep in the sun in California.",
    "In California the dog drinks cold water.",
    "Water, water, everywhere, and not a drop to drink.",
    "The capital city of California is Sacramento.",
    "Is the dog in the river or in the city?",
    "A river of water runs through the capital.",
    "The dogs of Paris drink water from the river.",
    "Every dog needs water, and every cat needs a nap.",
    "California has a long coast and a big river.",
    "The city is the capital of the state of California.",
    "A dog, a cat and a bird live in Paris, France.",
    "Water is clear, the river is long, the dog is happy.",
    "She gave the dog some water in California.",
    "He took his dog to the river near the city.",
    "The people of France love the city of Paris.",
    "The dog barks at the cat by the river.",
    "California dogs love the water of the sea.",
    "The capital of Italy is Rome, and the capital of Spain is Madrid.",
    "A cup of water is a cup of life.",
    "Dog and cat and river and city and water.",
    "We drove from Paris to the coast of France.",
    "Water water water, dog dog dog, California California.",
    "The sun is hot in California, so the dog drinks water.",
)

BYTELEVEL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SENTENCEPIECE_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gpt2",
    "gpt_neox",
    "gemma",
    "gemma2",
    "gemma3_text",
)
# Which GGUF architecture each convertible family is written as (llama.cpp writes Mistral as llama).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
N_HEADS, N_KV_HEADS, MAX_POSITIONS, SLIDING_WINDOW = 4, 2, 128, 16
# Families whose config takes an explicit head_dim (the others derive it from hidden_size).
HEAD_DIM_FAMILIES = ("llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text")


def build_tokenizer(folder: Path, kind: str = "bytelevel") -> transformers.PreTrainedTokenizerFast:
    """Train a tiny deterministic tokenizer on CORPUS and save it, so tests need no hub download."""
    if kind not in _TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    train, specials = _TOKENIZER_KINDS[kind]
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=train(), **specials)
    wrapped.save_pretrained(folder)
    return wrapped


def _train_bytelevel() -> Tokenizer:
    """GPT-2 style byte-level BPE: pieces spelled in the byte alphabet, spaces as `Ġ`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(BYTELEVEL_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _train_sentencepiece() -> Tokenizer:
    """Gemma style BPE: `▁` for spaces, no prefix space, `<0xNN>` byte fallback after the specials."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = metaspace
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    pieces = [*SENTENCEPIECE_SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    pieces += sorted(learned["vocab"], key=learned["vocab"].get)
    vocab = {piece: index for index, piece in enumerate(pieces)}
    merges = [tuple(merge) for merge in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = metaspace
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(list(SENTENCEPIECE_SPECIALS))
    return tokenizer


_TOKENIZER_KINDS = {
    "bytelevel": (_train_bytelevel, dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                         pad_token="<|endoftext|>", add_bos_token=False)),
    "sentencepiece": (_train_sentencepiece, dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                                 unk_token="<unk>", add_bos_token=True)),
}


def _config(
    family: str, vocab_size: int, n_layers: int, d_model: int, d_ff: int, tie: bool | None, ids: dict[str, int]
) -> transformers.PreTrainedConfig:
    """A tiny config of the family, keeping its class defaults except for sizes and the knobs below."""
    if family == "gpt2":
        kwargs = {
            "n_embd": d_model,
            "n_layer": n_layers,
            "n_head": N_HEADS,
            "n_inner": d_ff,
            "n_positions": MAX_POSITIONS,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    else:
        kwargs = {
            "hidden_size": d_model,
            "intermediate_size": d_ff,
            "num_hidden_layers": n_layers,
            "num_attention_heads": N_HEADS,
            "max_position_embeddings": MAX_POSITIONS,
        }
    if family not in ("gpt2", "gpt_neox"):
        kwargs["num_key_value_heads"] = N_KV_HEADS
    if family in HEAD_DIM_FAMILIES:
        kwargs["head_dim"] = d_model // N_HEADS
    if family == "mistral":
        kwargs["sliding_window"] = None
    if family in ("gemma2", "gemma3_text"):
        kwargs["sliding_window"] = SLIDING_WINDOW
    if tie is not None:
        kwargs["tie_word_embeddings"] = tie
    return transformers.AutoConfig.for_model(family, vocab_size=vocab_size, **ids, **kwargs)


def _special_ids(tokenizer: transformers.PreTrainedTokenizerFast) -> dict[str, int]:
    """The bos/eos/pad ids the config must share with the tokenizer."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


@torch.no_grad()
def _randomize(model: torch.nn.Module, gemma_norms: bool) -> None:
    """Re-init with large random weights and gains far from 1, so that norm-folding bugs show."""
    for name, param in model.named_parameters():
        is_gain = param.ndim == 1 and name.endswith(".weight") and ("norm" in name or ".ln_" in name)
        if is_gain and gemma_norms:
            param.uniform_(-0.5, 0.5)  # Gemma's RMSNorm multiplies by (1 + weight)
        elif is_gain:
            param.uniform_(0.5, 1.5)
        elif param.ndim == 1:
            param.normal_(0.0, 0.2)
        else:
            param.normal_(0.0, 0.5)


def make_hf_model(
    family: str,
    tokenizer: transformers.PreTrainedTokenizerFast,
    *,
    n_layers: int = 3,
    d_model: int = 32,
    d_ff: int = 48,
    seed: int = 0,
    tie: bool | None = None,
    pad_vocab: int = 0,
    dtype: torch.dtype = torch.float32,
) -> transformers.PreTrainedModel:
    """The in-memory model `build_hf_model` saves, so tests can compare against what they reload."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    config = _config(family, len(tokenizer) + pad_vocab, n_layers, d_model, d_ff, tie, _special_ids(tokenizer))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomize(model, gemma_norms=family.startswith("gemma"))
    return model.to(dtype).eval()


def build_hf_model(
    folder: Path,
    family: str,
    *,
    n_layers: int = 3,
    d_model: int = 32,
    d_ff: int = 48,
    seed: int = 0,
    sharded: bool = False,
    tie: bool | None = None,
    tokenizer_kind: str | None = None,
    pad_vocab: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build, randomize and save a tiny model of `family` with its tokenizer; return `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    kind = tokenizer_kind or ("sentencepiece" if family.startswith("gemma") else "bytelevel")
    tokenizer = build_tokenizer(folder, kind)
    sizes = {"n_layers": n_layers, "d_model": d_model, "d_ff": d_ff}
    model = make_hf_model(family, tokenizer, **sizes, seed=seed, tie=tie, pad_vocab=pad_vocab, dtype=dtype)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(folder, max_shard_size=size // 4 if sharded else "10GB")
    return folder


def build_gguf(hf_folder: Path, out_path: Path, *, quant: str = "F32") -> Path:
    """Convert a tiny model from `build_hf_model` to GGUF as llama.cpp's converter would."""
    config = transformers.AutoConfig.from_pretrained(hf_folder)
    arch = GGUF_ARCH.get(config.model_type)
    if arch is None:
        raise ValueError(f"no GGUF conversion for {config.model_type!r}")
    qtype = gguf.GGMLQuantizationType[quant]
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer = gguf.GGUFWriter(out_path, arch)
    writer.add_name(f"tiny-{config.model_type}")
    writer.add_file_type(file_type)
    _add_hparams(writer, config, arch)
    _add_vocab(writer, hf_folder, config)
    for hf_name, tensor in load_saved_tensors(hf_folder).items():
        name = gguf_tensor_name(hf_name, arch, config.num_hidden_layers)
        data = _to_gguf_layout(name, tensor.float().numpy(), config, arch)
        if qtype != gguf.GGMLQuantizationType.F32 and data.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def gguf_tensor_name(hf_name: str, arch: str, n_blocks: int) -> str:
    """The GGUF name of an HF tensor, through gguf's own map, e.g. `blk.0.attn_q.weight`."""
    arch_enum = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    stem, suffix = hf_name.rsplit(".", 1)
    return f"{gguf.get_tensor_name_map(arch_enum, n_blocks).get_name(stem)}.{suffix}"


def _rope_theta(config: transformers.PreTrainedConfig) -> float:
    """The global rope base; Gemma 3 keeps one per attention type."""
    rope = config.rope_parameters
    return float(rope["full_attention"]["rope_theta"] if "full_attention" in rope else rope["rope_theta"])


def _add_hparams(writer: gguf.GGUFWriter, config: transformers.PreTrainedConfig, arch: str) -> None:
    """The hyperparameter keys llama.cpp reads for these architectures."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)


def _add_vocab(writer: gguf.GGUFWriter, hf_folder: Path, config: transformers.PreTrainedConfig) -> None:
    """The tokenizer as GGUF metadata, padded with `[PADn]` up to the embedding rows like llama.cpp."""
    spec = json.loads((hf_folder / "tokenizer.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    specials = {added["content"] for added in spec["added_tokens"] if added["special"]}
    vocab.update({added["content"]: added["id"] for added in spec["added_tokens"]})
    tokens = sorted(vocab, key=vocab.get)
    sentencepiece = bool(spec["model"].get("byte_fallback"))
    unk = spec["model"].get("unk_token")
    types = [
        gguf.TokenType.UNKNOWN if token == unk
        else gguf.TokenType.CONTROL if token in specials
        else gguf.TokenType.BYTE if sentencepiece and token.startswith("<0x") and len(token) == 6
        else gguf.TokenType.NORMAL
        for token in tokens
    ]
    scores = [0.0 if kind != gguf.TokenType.NORMAL else -float(index) for index, kind in enumerate(types)]
    padding = config.vocab_size - len(tokens)
    tokens += [f"[PAD{index}]" for index in range(len(tokens), config.vocab_size)]
    types += [gguf.TokenType.UNUSED] * padding
    scores += [-1000.0] * padding
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(scores)
        writer.add_unk_token_id(vocab[unk])
        writer.add_add_space_prefix(False)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_merges([" ".join(merge) for merge in spec["model"]["merges"]])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(sentencepiece)
    writer.add_add_eos_token(False)


def load_saved_tensors(hf_folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model, whether sharded or not; a tied head is absent, as on disk."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(hf_folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rope permutation: HF's rotate-half row order to interleaved pairs, per head."""
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _to_gguf_layout(name: str, data: np.ndarray, config: transformers.PreTrainedConfig, arch: str) -> np.ndarray:
    """HF tensor to GGUF values: rope permutation for llama q/k, +1 on Gemma norms, else unchanged."""
    if arch == "llama" and ".attn_q." in name:
        return permute_qk(data, config.num_attention_heads)
    if arch == "llama" and ".attn_k." in name:
        return permute_qk(data, config.num_key_value_heads)
    if arch == "gemma3" and name.endswith("norm.weight"):
        return data + np.float32(1.0)
    return data


def truncate(path: Path, keep_fraction: float) -> Path:
    """Write a copy of `path` cut to `keep_fraction` of its bytes next to it, for bad-input tests."""
    data = path.read_bytes()
    out = path.with_name(f"{path.stem}.truncated{path.suffix}")
    out.write_bytes(data[: int(len(data) * keep_fraction)])
    return out
