"""How close the atlas runs to this machine's matrix-multiply limit, measured in one run.

Prints, for one model (default: the embedded SmolLM2-135M-Instruct):
  1. the roofline: sustained GEMM rate at the atlas's shapes (blocks of neurons × chunks of the LM head,
     each written into a reused buffer; the best of a grid of shapes in short runs, then timed again in
     runs of seconds), fp32 and bf16, the faster of the two being the roofline; its shape is timed again
     after the build, and the faster of the two times stands (a roofline timed in a slow spell of a
     shared machine would flatter every ratio to it);
  2. a few partitions projected three ways: the naive baseline (fp32 `W @ W_U.T`, then `topk` and the
     mean/std over the whole logit matrix), our `project_block` and the bare product, the last two in
     the dtype `--dtype auto` picks and a partition per lane (one torch thread each) as the build runs them;
     and whether ours and the naive baseline give the exact top and bottom tokens of their first neurons;
  3. the full `atlas build` of the model in a subprocess: wall time, achieved FLOP/s
     (2 · neurons · d_model · vocabulary per matrix and layer), ratio to the roofline, peak RSS; and the
     bare product of every partition in lanes, as long as the build, right before and right after it:
     the machine's rate around the build (a shared machine drifts over a minute); and the build's start-up
     alone, which with that bare product gives the most a build could reach here.
Every figure is a ratio against a baseline taken in the same run: the machines here differ (AVX2-only
CPUs run bf16 several times slower than fp32, AMX CPUs several times faster) and are shared.

    .venv/bin/python bench/atlas_speed.py [MODEL] [--skip-build] [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from fresh_build import fresh_build, fresh_startup

from pipeline.arch import ArchAdapter
from pipeline.atlas import certified
from pipeline.atlas.certified import fastest_dtype, sort_by_value_then_id
from pipeline.atlas.lanes import lane_pool
from pipeline.atlas.project import PRODUCT_BLOCK, Head, candidate_count, cpu_chunk, project_block
from pipeline.sources import open_source, resolve
from pipeline.sources.embedded import DEFAULT_MODEL

ROOF_BLOCKS = (256, 512, 1024, 2048)
ROOF_CHUNKS = (512, 1024, 4096)
ROOF_SAMPLE = (2048, 16384)  # neurons × vocabulary rows timed per shape: the rate, not the size, matters
SUSTAINED, FINALISTS = 2.0, 3  # the best shapes of the short runs are timed again in runs of seconds
EXACT_SAMPLE = 256  # neurons of each partition checked against float64 logits (14 s for two of Gemma 3's)


def interleaved_best(fns: dict, repeats: int) -> dict[str, float]:
    """The fastest run of each function, runs taken in turn: a slow spell of the machine hits all alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` runs after one warm-up: the least disturbed by other work on the machine."""
    return interleaved_best({"run": fn}, repeats)["run"]


def bare_product(head: torch.Tensor, vectors: torch.Tensor, dtype: torch.dtype, block: int, chunk: int,
                 head_left: bool = True):
    """A closure computing the logits in `dtype` in [block, chunk] pieces into one reused buffer: as the
    build does, `head rows @ vectorsᵀ` (token by token), or with `head_left` false `vectors @ head rowsᵀ`."""
    h, v = head.to(dtype), vectors.to(dtype)
    buffer = torch.empty(block * chunk, dtype=dtype, device=head.device)

    def run():
        for s in range(0, len(h), chunk):  # as the build: each chunk of the head times every block
            cols = h[s:s + chunk]
            for b in range(0, len(v), block):
                rows = v[b:b + block]
                out = buffer[:len(rows) * len(cols)]
                if head_left:
                    torch.matmul(cols, rows.T, out=out.view(len(cols), len(rows)))
                else:
                    torch.matmul(rows, cols.T, out=out.view(len(rows), len(cols)))

    return run


def gemm_rate(head: torch.Tensor, vectors: torch.Tensor, dtype: torch.dtype, block: int, chunk: int,
              lanes: int, repeats: int, head_left: bool = True) -> float:
    """FLOP/s of the bare product at one shape: with every torch thread (lanes = 1), or as `lanes`
    single-threaded lanes each multiplying all of `vectors`, as the build runs a partition per lane."""
    runs = [bare_product(head, vectors, dtype, block, chunk, head_left) for _ in range(lanes)]
    seconds = best_time(lambda: runs[0]() if lanes == 1 else in_lanes(lambda run: run(), runs, lanes), repeats)
    return lanes * 2 * vectors.shape[0] * vectors.shape[1] * head.shape[0] / seconds


@dataclass(frozen=True)
class Roof:
    """One dtype's best sustained GEMM rate, its best in short runs, the shape, and that shape timed again."""

    rate: float
    burst: float
    how: str
    again: Callable[[], float]


def roofline(head: torch.Tensor, vectors: torch.Tensor, blocks: list[int], chunks: list[int], repeats: int
             ) -> dict[str, Roof]:
    """Per dtype: the best GEMM rate over modes, block and chunk shapes in runs of SUSTAINED seconds. The
    short runs pick the FINALISTS shapes timed again at length: the best of a grid of short runs is
    biased up by the machine's noise."""
    head, vectors = head[:ROOF_SAMPLE[1]], vectors.repeat(-(-ROOF_SAMPLE[0] // len(vectors)), 1)[:ROOF_SAMPLE[0]]
    threads = torch.get_num_threads()
    best = {}
    for dtype in ("float32", "bfloat16"):
        rates = sorted([(gemm_rate(head, vectors, getattr(torch, dtype), b, c, lanes, repeats, left), (b, c, lanes, left))
                        for lanes in sorted({1, threads}) for b in blocks for c in chunks for left in (True, False)],
                       reverse=True)
        burst = rates[0][0]
        once = 2 * vectors.shape[0] * vectors.shape[1] * head.shape[0] / burst  # seconds of one run
        longer = vectors.repeat(max(1, round(SUSTAINED / once)), 1)
        sustained, (b, c, lanes, left) = max((gemm_rate(head, longer, getattr(torch, dtype), *shape[:3], repeats,
                                                        shape[3]), shape) for _, shape in rates[:FINALISTS])
        how = (f"[{b}, {c}], {'one lane per core' if lanes > 1 else f'{threads} threads'}, "
               f"{'head rows' if left else 'neurons'} on the left")
        again = partial(gemm_rate, head, longer, getattr(torch, dtype), b, c, lanes, repeats, left)
        best[dtype] = Roof(sustained, burst, how, again)
    return best


def in_lanes(fn, items: list, lanes: int) -> None:
    """`fn` over `items` in `lanes` threads of one torch thread each, as `atlas build` runs partitions."""
    with lane_pool(lanes, 1) as pool:
        list(pool.map(fn, items))


def naive_layer(vectors: torch.Tensor, head: torch.Tensor, k: int) -> None:
    """What one would write first: the whole logit matrix, top-k both ways, statistics over it."""
    logits = vectors @ head.T  # [n, V]
    logits.topk(k, dim=1)
    (-logits).topk(k, dim=1)
    logits.mean(1)
    logits.std(1)


def exactness(parts: list[torch.Tensor], head: torch.Tensor, h: Head, k: int, sample: int = EXACT_SAMPLE) -> str:
    """Ours and the naive baseline against the reference on the first `sample` neurons of each partition:
    float64 logits rounded to fp32, ordered by value then lower id, both ends."""
    sides = same = naive_same = logits_equal = 0
    for part in parts:
        v = part[:sample]
        exact = (v.double() @ head.double().T).float()  # what the atlas promises, whatever the compute dtype
        ids = torch.arange(exact.shape[1]).expand_as(exact)
        ours = project_block(v, h, k)
        naive = v @ head.T
        for sign, got_ids, got_logits in ((1, ours.top_ids, ours.top_logits), (-1, ours.bottom_ids, ours.bottom_logits)):
            ref_values, ref_ids = sort_by_value_then_id(sign * exact, ids, k)
            match = (got_ids == ref_ids).all(1)
            sides += len(v)
            same += int(match.sum())
            logits_equal += int((match & (got_logits == sign * ref_values).all(1)).sum())
            naive_same += int(((sign * naive).topk(k, dim=1).indices == ref_ids).all(1).sum())
    return (f"   exactness, the first {sample} neurons of each partition against float64 logits rounded to fp32 (ties by "
            f"lower id), top and bottom: ours has the reference's ids in order in {same} of {sides} lists, and its "
            f"logits too in {logits_equal}; the naive fp32 baseline's ids in order in {naive_same} (its rounding "
            f"swaps near-ties)")


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
    n = layer.shape[0]  # neurons per layer
    print(f"model {args.model}: {adapter.n_layers} layers × {n} neurons × {len(adapter.matrices)} matrices, "
          f"d_model {d}, vocabulary {vocab}; torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")

    # the build's own shapes in either dtype: neurons per product (the scan's), head rows per chunk
    build = {dt: (certified.scan_rows(candidate_count(args.k, vocab, dt), n), cpu_chunk(d, dt))
             for dt in (torch.float32, torch.bfloat16)}
    blocks = sorted({*ROOF_BLOCKS, min(n, PRODUCT_BLOCK), *(b for b, _ in build.values())})
    chunks = sorted({*ROOF_CHUNKS, *(c for _, c in build.values())})
    rates = roofline(head, layer, blocks, chunks, args.repeats)
    roof_dtype = max(rates, key=lambda dt: rates[dt].rate)
    roof, burst = rates[roof_dtype].rate, rates[roof_dtype].burst
    print(f"\n1. roofline: GEMM rate of {ROOF_SAMPLE[0]} neurons (per lane) × {ROOF_SAMPLE[1]} head rows (d {d}), "
          f"best of blocks {blocks} × vocabulary chunks {chunks}, all threads or one lane per core, either operand on the left, "
          f"in short runs; then the {FINALISTS} best shapes in runs of {SUSTAINED:.0f} s, best of {args.repeats}:")
    for dt, r in rates.items():
        print(f"   {dt:9s} {r.rate / 1e9:8.1f} GFLOP/s sustained ({r.burst / 1e9:.1f} in short runs) at {r.how}"
              f"{'   <- roofline' if dt == roof_dtype else ''}")

    threads = torch.get_num_threads()
    parts = [adapter.neuron_vectors(m, layer).float() for layer in range(adapter.n_layers // 2, adapter.n_layers)
             for m in adapter.matrices][:max(2, threads)]
    flop_parts = 2 * sum(len(p) for p in parts) * d * vocab
    dtype = fastest_dtype(torch.device("cpu"), d, vocab)  # what the build's `--dtype auto` picks
    h = Head.from_weight(head, dtype)
    step, (block, chunk) = min(n, PRODUCT_BLOCK), build[dtype]  # neurons per project_block; per product

    def ours(part: torch.Tensor) -> None:
        [project_block(part[s:s + step], h, args.k) for s in range(0, len(part), step)]

    def product(part: torch.Tensor) -> None:
        bare_product(h.fast.weight, part, dtype, block, chunk)()  # the head converted once, as the build does

    naive = best_time(lambda: [naive_layer(p, head, args.k) for p in parts], args.repeats)
    lanes = interleaved_best({"ours": lambda: in_lanes(ours, parts, threads),
                              "product": lambda: in_lanes(product, parts, threads)}, args.repeats)
    print(f"\n2. {len(parts)} partitions of {n} neurons, top-{args.k}, bottom-{args.k}, mean and std; ours and "
          f"the bare product run as the build does, a partition per lane ({threads} lanes), in "
          f"{str(dtype).removeprefix('torch.')} (`--dtype auto` here):")
    for name, t in (("naive fp32 baseline", naive), ("project_block (ours)", lanes["ours"]),
                    (f"product alone [{block}, {chunk}]", lanes["product"])):
        print(f"   {name:27s} {t:7.3f} s  {flop_parts / t / 1e9:7.1f} GFLOP/s  "
              f"{flop_parts / t / roof:6.1%} of roofline")
    print(f"   speed-up over the naive baseline: {naive / lanes['ours']:.2f}×; "
          f"ours runs at {lanes['product'] / lanes['ours']:.1%} of its bare product")
    print(exactness(parts, head, h, args.k))

    if args.skip_build:
        return
    flop_model = 2 * n * d * vocab * adapter.n_layers * len(adapter.matrices)
    every = [adapter.neuron_vectors(m, layer).float() for layer in range(adapter.n_layers) for m in adapter.matrices]

    def sustained_product() -> float:
        """FLOP/s of the bare product of every partition in lanes: as long as the build, so as exposed to drift."""
        t0 = time.perf_counter()
        in_lanes(product, every, threads)
        return flop_model / (time.perf_counter() - t0)

    before = sustained_product()
    with tempfile.TemporaryDirectory() as tmp:
        wall, rss, lane_seconds = fresh_build([args.model, "--out", tmp, "--force"])
    after = sustained_product()
    again = rates[roof_dtype].again()  # a roofline timed in a slow spell would flatter every ratio to it
    startup = min(fresh_startup(args.model) for _ in range(2))
    rate, around = flop_model / wall, (before + after) / 2
    ceiling = flop_model / (startup + flop_model / around)
    head_bytes = vocab * d * 4
    print(f"\n3. full `atlas build {args.model}` (read, project, top-k, statistics, Parquet), fresh process:")
    if again > roof:
        print(f"   the roofline's shape timed again after the build: {again / 1e9:.1f} GFLOP/s, the roofline from here on")
        roof = again
    print(f"   wall {wall:.1f} s, {flop_model / 1e12:.2f} TFLOP → {rate / 1e9:.1f} GFLOP/s = {rate / roof:.1%} of the "
          f"roofline ({rate / burst:.1%} of its short-run rate); naive baseline would take "
          f"{naive / len(parts) * adapter.n_layers * len(adapter.matrices):.1f} s of compute alone")
    print(f"   the bare product of every partition in lanes, right before and right after the build: "
          f"{before / 1e9:.1f} and {after / 1e9:.1f} GFLOP/s ({before / roof:.1%}, {after / roof:.1%} of the "
          f"roofline: the machine's rate around the build); the build ran at {rate / around:.1%} of their mean")
    print(f"   the build's start-up alone (imports, source, token table, the head's copy and statistics, in a fresh "
          f"process): {startup:.1f} s; with it and nothing but that bare product, a build would reach "
          f"{ceiling / roof:.1%} of the roofline, so this one ran at {rate / ceiling:.1%} of that ceiling")
    print(f"   the build's lanes, from their start after the head's preparation to their end: {lane_seconds:.1f} s, "
          f"{flop_model / lane_seconds / around:.1%} of the bare product around the build; the other "
          f"{wall - lane_seconds:.1f} s are start-up and exit")
    if max(before, after) > roof:
        print("   (the bare product ran faster around the build than the roofline's shape, even timed again: the "
              "roofline was timed in slow spells of the machine, so every ratio to it reads high)")
    print(f"   peak RSS {rss / 2**30:.2f} GiB (fp32 LM head alone {head_bytes / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
