"""EAP and EAP-IG edge scoring on a real model, timed against one plain forward + backward pass.

Loads MODEL (default: the embedded SmolLM2-135M-Instruct, 123,211 edges), takes `--pairs` pairs of a
shipped task (default ioi), and times, in the same run: one forward + backward over all pairs (the
unit), EAP, EAP-IG with `--steps`, and one faithfulness evaluation of a 1% circuit. Prints each as a
multiple of the unit, and the peak RSS against the score buffer's size.

    .venv/bin/python bench/circuit_speed.py [MODEL] [--pairs 100] [--steps 5] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from pipeline.attribution.inputs import encode
from pipeline.circuits.graph import Graph
from pipeline.circuits.job import circuit, forward_backward, load_pairs, make_batches, selection_order
from pipeline.circuits.patching import faithfulness
from pipeline.circuits.scores import edge_scores
from pipeline.live.load import load_live
from pipeline.sources.embedded import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    live = load_live(args.model, progress=False)
    pairs = load_pairs(args.task, args.pairs)
    batches = make_batches(encode(pairs, live.tokenizer, None), args.batch_size, live.model.device)
    graph = Graph.for_model(live.model)
    unit, _ = forward_backward(live.model, batches)
    print(f"{live.name}: {len(pairs.prompts)} {args.task} pairs in {len(batches)} batches, {graph.n_edges:,} edges, "
          f"{torch.get_num_threads()} threads; one forward + backward over them: {unit:.2f} s")
    scores = None
    for method in ("eap", "eap-ig"):
        t0 = time.perf_counter()
        scores = sum(edge_scores(live.model, graph, b, method, "logit_diff", steps=args.steps) for b in batches)
        seconds = time.perf_counter() - t0
        print(f"  {method:7s} {seconds:7.2f} s = {seconds / unit:5.1f}× forward+backward"
              + (f" (m = {args.steps})" if method == "eap-ig" else ""))
    keep = circuit(selection_order(scores, graph, "topn"), graph.n_edges // 100, graph)
    t0 = time.perf_counter()
    got = faithfulness(live.model, graph, batches, keep, "logit_diff")
    seconds = time.perf_counter() - t0
    print(f"  one faithfulness evaluation (1% of edges, F = {got['F']:.2f}): {seconds:.2f} s = "
          f"{seconds / unit:.1f}× forward+backward")
    longest = max(b.clean.shape[1] for b in batches)
    buffer = len(graph.sources) * args.batch_size * longest * live.model.config.hidden_size * 4
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; the difference "
          f"buffer of one batch is {buffer / 2**30:.2f} GiB (sources × batch × positions × d_model, fp32)")


if __name__ == "__main__":
    main()
