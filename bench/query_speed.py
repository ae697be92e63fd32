"""DuckDB speed of sql/compare_models.sql over two atlases of Llama 3.1 8B's shape.

Writes two synthetic atlases in the real schema and layout (32 layers × 14,336 neurons, vocabulary
128,256, k = 20: 9.2 M top rows per matrix, 18.4 M with the bottom ones) through the same row builders
and Parquet writer as `atlas build`; "other" is "base" with a tenth of the neurons' top tokens
shuffled, as a fine-tune might. Then times `compare_models.sql` (what `atlas compare` runs), best of
`--repeats`, against a plain count of the rows it reads as the baseline of the same run.

    .venv/bin/python bench/query_speed.py [--matrices up] [--layers 32] [--dir /tmp/query-bench]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from pipeline.atlas import schema
from pipeline.atlas.project import Projection
from pipeline.config import AtlasConfig
from pipeline.query import connect, run_sql

VOCAB, NEURONS, K = 128256, 14336, 20
ROW_GROUP = AtlasConfig.block_size


def layer_projection(layer: int, matrix: str, shuffle: bool) -> Projection:
    """Plausible top/bottom tokens and logits for one layer, seeded by (layer, matrix)."""
    g = torch.Generator().manual_seed(layer * 7 + len(matrix))

    def distinct_ids(n: int) -> torch.Tensor:  # k distinct token ids per neuron, as a real top-k has
        return (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(K) * 6007) % VOCAB

    top_ids, bottom_ids = distinct_ids(NEURONS), distinct_ids(NEURONS)
    if shuffle:  # the fine-tune: a tenth of the neurons get other tokens
        moved = torch.arange(NEURONS) % 10 == layer % 10
        top_ids[moved] = distinct_ids(int(moved.sum()))
    top = torch.sort(torch.rand(NEURONS, K, generator=g) * 3 + 2, dim=1, descending=True).values
    bottom = -torch.sort(torch.rand(NEURONS, K, generator=g) * 3 + 2, dim=1, descending=True).values
    return Projection(top_ids, top, bottom_ids, bottom, torch.zeros(NEURONS), torch.ones(NEURONS),
                      torch.ones(NEURONS))


def write_atlases(out: Path, matrices: list[str], layers: int) -> None:
    texts = pa.array([f"tok{i}" for i in range(VOCAB)], pa.string())
    for model, shuffle in (("base", False), ("other", True)):
        tokens = pa.table([pa.array([model] * VOCAB), pa.array(range(VOCAB), pa.int32()), texts, texts,
                           pa.array([t.encode() for t in texts.to_pylist()], pa.binary()),
                           pa.array([False] * VOCAB), pa.array([True] * VOCAB)], schema=schema.TOKENS)
        with schema.atomic_parquet(schema.tokens_path(out, model), schema.TOKENS, {"table": "tokens"}) as w:
            w.write_table(tokens)
        for matrix in matrices:
            for layer in range(layers):
                p = layer_projection(layer, matrix, shuffle)
                for table, arrow_schema, rows in (("atlas", schema.ATLAS, schema.atlas_rows),
                                                  ("neurons", schema.NEURONS, schema.neuron_rows)):
                    path = schema.partition_path(out, table, model, matrix, layer)
                    with schema.atomic_parquet(path, arrow_schema, {"table": table, "model": model}) as w:
                        for s in range(0, NEURONS, ROW_GROUP):  # row groups as the build writes them
                            block = Projection(*(t[s:s + ROW_GROUP] for t in (p.top_ids, p.top_logits,
                                                 p.bottom_ids, p.bottom_logits, p.mean, p.std, p.norm)))
                            w.write_table(rows(block, texts, model, matrix, layer, s))
        print(f"wrote {model}: {len(matrices)} matrices × {layers} layers", flush=True)


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", default="up", help="comma list of up,gate,down")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="keep the atlases here and reuse them on the next run")
    args = parser.parse_args()
    out = args.dir or Path(tempfile.mkdtemp(prefix="query-bench-"))
    matrices = args.matrices.split(",")
    if not schema.tokens_path(out, "other").exists():
        write_atlases(out, matrices, args.layers)
    con = connect(out)
    rows = con.sql("SELECT count(*) FROM atlas WHERE model = 'base' AND side = 'top'").fetchall()[0][0]
    scan = best_of(lambda: con.sql("SELECT count(*), sum(token_id) FROM atlas WHERE side = 'top'").fetchall(),
                   args.repeats)
    result = run_sql(out, "compare_models", {"base": "base", "other": "other"})
    seconds = best_of(lambda: run_sql(out, "compare_models", {"base": "base", "other": "other"}), args.repeats)
    overall = result.filter(pa.compute.equal(result["level"], "overall")).to_pylist()[0]
    print(f"compare_models.sql over 2 × {rows:,} top rows ({len(matrices)} matrix, {args.layers} layers): "
          f"{seconds:.2f} s (target < 2 s); a plain scan of the same rows {scan:.2f} s "
          f"(ratio {seconds / scan:.1f}×); top-1 agreement {overall['top1_agreement']:.3f}")


if __name__ == "__main__":
    main()
