"""Where one block of neurons' time goes on a device, at Llama 3.1 8B's shape: each step of `project_block`.

A build spends most of its time in `project_block`, one block of up to 4,096 neurons at a time. This
times its steps alone on random bf16 weights of the 8B shape (d_model 4,096, vocabulary 128,256), the
device synchronised around each: the bare bf16 product over the head (the baseline), the candidate pass
(the product and `topk` per chunk on an accelerator, the compiled scan on the CPU), the logit variances
(`quadratic_form`, fp32), both sides' exact settling (error bound and float64 re-scoring), and the whole
`project_block`; at the full vocabulary, also the full model's time as that many blocks. On a GPU it says which step
to work on if the 8B build misses its target; `gpu_check.sh` runs it first. On a CPU, pass fewer
`--neurons` and a smaller `--vocab` to keep it short.

    .venv/bin/python bench/block_phases.py --device cuda [--neurons 4096] [--vocab 128256]
"""
from __future__ import annotations

import argparse

import torch
from atlas_speed import bare_product, best_time

from pipeline.atlas import certified
from pipeline.atlas.project import (ACCELERATOR_CHUNK, Head, candidate_count, cpu_chunk, project_block, quadratic_form,
                                    settle_sides)

D_MODEL, VOCAB, FULL_NEURONS, FULL_PARTITIONS = 4096, 128256, 14336, 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--neurons", type=int, default=4096, help="neurons in the block (a build's: up to 4,096)")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    head = (torch.randn(args.vocab, D_MODEL, generator=gen, device=device) * 0.02).bfloat16()
    vectors = torch.randn(args.neurons, D_MODEL, generator=gen, device=device) * 0.02
    dtype = certified.fastest_dtype(device, D_MODEL, args.vocab)
    dtype_name = str(dtype).removeprefix("torch.")
    h = Head.from_weight(head, dtype)
    del head
    c = candidate_count(args.k, args.vocab, dtype, device=device)
    chunk = ACCELERATOR_CHUNK if device.type != "cpu" else cpu_chunk(D_MODEL, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with certified.exact_matmul():  # as the build runs: no TF32, no reduced-precision bf16 sums
        found = certified.candidates(vectors, h.fast, c, chunk)
        steps = {
            # as an accelerator's `topk_candidates` multiplies: the whole block by each chunk of the head
            f"bare {dtype_name} product": bare_product(h.fast.weight, vectors, dtype, args.neurons, chunk, head_left=False),
            "candidates (product + top/bottom c)": lambda: certified.candidates(vectors, h.fast, c, chunk),
            "variances (fp32 quadratic form)": lambda: quadratic_form(vectors, h.cov),
            "settling both sides (bound, re-scoring)": lambda: settle_sides(vectors, h, args.k, found),
            "project_block (all of it)": lambda: project_block(vectors, h, args.k),
        }
        # the device synchronised after each run: a run's queued work is timed in it
        seconds = {name: best_time(lambda fn=fn: (fn(), sync()), args.repeats) for name, fn in steps.items()}
    blocks = FULL_PARTITIONS * FULL_NEURONS / args.neurons  # the full model's, in blocks of this size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"one block of {args.neurons} neurons × {args.vocab} head rows (d {D_MODEL}) on {device} ({name}), "
          f"{dtype_name}, c = {c}, chunks of {chunk} rows, best of {args.repeats}"
          f"{'; the full 8B as that many blocks' if args.vocab == VOCAB else ''}:")
    base = next(iter(seconds.values()))
    for step, t in seconds.items():
        full = f"  full 8B {t * blocks:6.1f} s" if args.vocab == VOCAB else ""
        print(f"   {step:42s} {t * 1e3:9.1f} ms  {t / base:5.2f}× the product{full}")


if __name__ == "__main__":
    main()
