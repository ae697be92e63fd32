"""How close the atlas runs to this machine's matrix-multiply limit, measured in one run.

Prints, for one model (default: the embedded SmolLM2-135M-Instruct):
  1. the roofline: sustained GEMM rate at the atlas's shapes (a block of neurons × the LM head), fp32
     and bf16, the faster of the two being the roofline;
  2. one layer's projection three ways: the naive baseline (fp32 `W @ W_U.T`, then `topk` and the
     mean/std over the whole logit matrix), our `project_block`, and the product alone;
  3. the full `atlas build` of the model in a subprocess: wall time, achieved FLOP/s
     (2 · neurons · d_model · vocabulary per matrix and layer), ratio to the roofline, peak RSS.
Every figure is a ratio against a baseline taken in the same run: the machines here differ (AVX2-only
CPUs run bf16 several times slower than fp32, AMX CPUs several times faster) and are shared.

    .venv/bin/python bench/atlas_speed.py [MODEL] [--skip-build] [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from fresh_build import fresh_build

from pipeline.arch import ArchAdapter
from pipeline.atlas.project import Head, project_block
from pipeline.sources import open_source, resolve
from pipeline.sources.embedded import DEFAULT_MODEL

BLOCK = 256  # the build's default --block-size


def best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` runs after one warm-up: the least disturbed by other work on the machine."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_rate(head: torch.Tensor, block: torch.Tensor, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of `block @ head.T` in `dtype`, in vocabulary chunks as the atlas does."""
    h, b = head.to(dtype), block.to(dtype)
    chunk = 8192

    def run():
        for s in range(0, h.shape[0], chunk):
            b @ h[s:s + chunk].T

    return 2 * b.shape[0] * b.shape[1] * h.shape[0] / best_time(run, repeats)


def naive_layer(vectors: torch.Tensor, head: torch.Tensor, k: int) -> None:
    """What one would write first: the whole logit matrix, top-k both ways, statistics over it."""
    logits = vectors @ head.T  # [n, V]
    logits.topk(k, dim=1)
    (-logits).topk(k, dim=1)
    logits.mean(1)
    logits.std(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    parser.add_argument("--skip-build", action="store_true", help="only the kernels, not the full build")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-k", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    adapter = ArchAdapter(open_source(resolve(args.model).path))
    head = adapter.head().float()
    vocab, d = head.shape
    layer = adapter.neuron_vectors("up", adapter.n_layers // 2).float()
    n = layer.shape[0]
    print(f"model {args.model}: {adapter.n_layers} layers × {n} neurons × {len(adapter.matrices)} matrices, "
          f"d_model {d}, vocabulary {vocab}; torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")

    rates = {dt: gemm_rate(head, layer[:BLOCK], getattr(torch, dt), args.repeats) for dt in ("float32", "bfloat16")}
    roof_dtype = max(rates, key=rates.get)
    roof = rates[roof_dtype]
    print(f"\n1. roofline at the atlas shape [{BLOCK}, {d}] × [{d}, {vocab}]:")
    for dt, r in rates.items():
        print(f"   {dt:9s} {r / 1e9:8.1f} GFLOP/s{'   <- roofline' if dt == roof_dtype else ''}")

    flop_layer = 2 * n * d * vocab
    h = Head.from_weight(head)
    naive = best_time(lambda: naive_layer(layer, head, args.k), args.repeats)
    ours = best_time(lambda: [project_block(layer[s:s + BLOCK], h, args.k) for s in range(0, n, BLOCK)], args.repeats)
    product = flop_layer / gemm_rate(head, layer, torch.float32, args.repeats)
    print(f"\n2. one layer ({n} neurons), projection with top-{args.k}, bottom-{args.k}, mean and std:")
    for name, t in (("naive fp32 baseline", naive), ("project_block (ours)", ours), ("fp32 product alone", product)):
        print(f"   {name:22s} {t:7.3f} s  {flop_layer / t / 1e9:7.1f} GFLOP/s  "
              f"{flop_layer / t / roof:6.1%} of roofline")
    print(f"   speed-up over the naive baseline: {naive / ours:.2f}×")

    if args.skip_build:
        return
    flop_model = flop_layer * adapter.n_layers * len(adapter.matrices)
    with tempfile.TemporaryDirectory() as tmp:
        wall, rss = fresh_build([args.model, "--out", tmp, "--force"])
    head_bytes = vocab * d * 4
    print(f"\n3. full `atlas build {args.model}` (read, project, top-k, statistics, Parquet), fresh process:")
    print(f"   wall {wall:.1f} s, {flop_model / 1e12:.2f} TFLOP → {flop_model / wall / 1e9:.1f} GFLOP/s = "
          f"{flop_model / wall / roof:.1%} of the roofline; naive baseline would take "
          f"{naive * adapter.n_layers * len(adapter.matrices):.1f} s of compute alone")
    print(f"   peak RSS {rss / 2**30:.2f} GiB (fp32 LM head alone {head_bytes / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
