"""The atlas on a checkpoint with Llama 3.1 8B's exact tensor names and shapes, timed and projected.

Writes a synthetic checkpoint (random bf16 weights, sharded safetensors with an index, a word-level
tokenizer of 128,256 tokens) with Llama 3.1 8B's names and shapes: d_model 4,096, vocabulary 128,256,
attention 32 × 128 with 8 key/value heads, untied head, for `--layers` layers of `--neurons` neurons
(14,336 in the real model; fewer keep a CPU run short). Then times `atlas build` on it in a fresh
process and prints the time of a first read of the checkpoint, the build's fixed cost and its lanes'
time (which the build measures for itself, so the time per layer is no difference of two noisy builds),
the full 32-layer × 14,336-neuron time projected from them, and peak memory against the budget "LM head
+ about two layers". On a GPU, `--layers 32 --neurons 14336 --device cuda` measures the full model.

    .venv/bin/python bench/llama8b_shape.py --layers 4 --neurons 1024 [--dir /tmp/llama8b-shape]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from fresh_build import fresh_build
from safetensors.torch import save_file

from pipeline.atlas.lanes import lane_shape
from pipeline.sources import open_source
from pipeline.sources.base import source_sha256

D_MODEL, VOCAB, N_HEADS, N_KV_HEADS, HEAD_DIM = 4096, 128256, 32, 8, 128
FULL_LAYERS, FULL_NEURONS = 32, 14336


def tensors_of_layer(i: int, neurons: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one decoder layer, as in Llama 3.1 8B's checkpoint."""
    p = f"model.layers.{i}"
    return {
        f"{p}.input_layernorm.weight": (D_MODEL,), f"{p}.post_attention_layernorm.weight": (D_MODEL,),
        f"{p}.self_attn.q_proj.weight": (N_HEADS * HEAD_DIM, D_MODEL),
        f"{p}.self_attn.k_proj.weight": (N_KV_HEADS * HEAD_DIM, D_MODEL),
        f"{p}.self_attn.v_proj.weight": (N_KV_HEADS * HEAD_DIM, D_MODEL),
        f"{p}.self_attn.o_proj.weight": (D_MODEL, N_HEADS * HEAD_DIM),
        f"{p}.mlp.gate_proj.weight": (neurons, D_MODEL), f"{p}.mlp.up_proj.weight": (neurons, D_MODEL),
        f"{p}.mlp.down_proj.weight": (D_MODEL, neurons),
    }


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer with exactly the model's vocabulary size (the atlas checks they match)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")), unk_token="w0")
    tok.save_pretrained(folder)


def write_checkpoint(folder: Path, layers: int, neurons: int) -> None:
    """One shard per layer plus one for the embedding, final norm and head, with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def rand(shape):
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    shapes = [tensors_of_layer(i, neurons) for i in range(layers)]
    shapes.append({"model.embed_tokens.weight": (VOCAB, D_MODEL), "model.norm.weight": (D_MODEL,),
                   "lm_head.weight": (VOCAB, D_MODEL)})
    weight_map = {}
    for j, shard in enumerate(shapes):  # one shard in memory at a time (the full model is 16 GB)
        name = f"model-{j + 1:05d}-of-{len(shapes):05d}.safetensors"
        save_file({t: rand(shape) for t, shape in shard.items()}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D_MODEL,
              "intermediate_size": neurons, "num_hidden_layers": layers, "num_attention_heads": N_HEADS,
              "num_key_value_heads": N_KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
              "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(folder)


def read_once(folder: Path, block: int = 64 * 2**20) -> tuple[int, float]:
    """Bytes in the checkpoint's shards and the seconds to read them all once."""
    t0 = time.perf_counter()
    size = 0
    buffer = bytearray(block)
    for shard in sorted(folder.glob("*.safetensors")):
        with open(shard, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                size += n
    return size, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (32 in Llama 3.1 8B)")
    parser.add_argument("--neurons", type=int, default=1024, help="neurons per layer (14336 in Llama 3.1 8B)")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lanes", type=int, help="partitions at once (atlas build --lanes; default: the build's)")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error("--layers must be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp) / "llama-3.1-8b-shape"
        t0 = time.perf_counter()
        if not (folder / "config.json").exists():
            write_checkpoint(folder, args.layers, args.neurons)
        print(f"checkpoint: {folder} ({args.layers} layers × {args.neurons} neurons, d_model {D_MODEL}, "
              f"vocabulary {VOCAB}, bf16), written in {time.perf_counter() - t0:.1f} s")
        size, seconds = read_once(folder)
        print(f"first read of its {size / 2**30:.2f} GiB: {seconds:.1f} s ({size / 2**30 / seconds:.2f} GiB/s; from "
              f"the page cache if it was just written); the build below reads it again")
        out = Path(tmp) / "atlas"
        t0 = time.perf_counter()
        source_sha256(open_source(folder), out / ".state" / "sha256.json")
        print(f"its SHA-256 (provenance; computed once per output folder, then cached): {time.perf_counter() - t0:.1f} s")
        lanes_option = ["--lanes", str(args.lanes)] if args.lanes else []
        build = [str(folder), "--out", str(out), "--device", args.device, *lanes_option]
        wall, rss, in_lanes = fresh_build(build)
    # the lanes take the partitions (3 per layer) in rounds of one each: a lane idles through a last round
    # the partitions do not fill
    lanes = lane_shape(torch.device(args.device), args.lanes)[0]
    per_layer = in_lanes / -(-3 * args.layers // lanes) * 3 / lanes
    fixed = wall - in_lanes  # process start, tokenizer, reading the head, its statistics, exit
    full = fixed + per_layer * FULL_LAYERS * FULL_NEURONS / args.neurons
    flop = 2 * args.neurons * D_MODEL * VOCAB * 3
    head = VOCAB * D_MODEL * 4
    layer = 3 * args.neurons * D_MODEL * 4
    print("atlas build (up, gate, down; top/bottom 20; statistics; Parquet), in a fresh process:")
    print(f"   {args.layers} layers: {wall:.1f} s, of which the lanes {in_lanes:.1f} s → {per_layer:.2f} s per layer "
          f"of {args.neurons} neurons ({flop / per_layer / 1e9:.1f} GFLOP/s), fixed cost {fixed:.1f} s "
          f"(start, tokenizer, head read and statistics, exit)")
    print(f"   projected full Llama 3.1 8B ({FULL_LAYERS} × {FULL_NEURONS} neurons × 3 matrices): "
          f"{full / 60:.1f} min on this machine")
    print(f"   peak RSS {rss / 2**30:.2f} GiB; fp32 LM head {head / 2**30:.2f} GiB + two layers "
          f"{2 * layer / 2**30:.2f} GiB = {(head + 2 * layer) / 2**30:.2f} GiB, plus the Python/torch runtime "
          f"and the checkpoint's pages mapped while read")


if __name__ == "__main__":
    main()
