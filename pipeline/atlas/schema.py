"""The atlas tables as explicit Arrow schemas, built from projections, written atomically to Parquet.

Layout (hive): `atlas/model=<slug>/matrix=<m>/layer=<l>.parquet` (one row per neuron × side × rank),
`neurons/model=<slug>/matrix=<m>/layer=<l>.parquet` (one row per neuron), and
`tokens/model=<slug>/tokens.parquet`. Every file carries `atlas.*` key-value metadata.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atlas.project import Projection, z_scores
from pipeline.tokens import TokenTable

ATLAS = pa.schema([
    ("model", pa.string()), ("matrix", pa.string()), ("layer", pa.int32()), ("neuron", pa.int32()),
    ("side", pa.string()), ("rank", pa.int16()), ("token_id", pa.int32()), ("token", pa.string()),
    ("logit", pa.float32()), ("z", pa.float32()),
])
NEURONS = pa.schema([
    ("model", pa.string()), ("matrix", pa.string()), ("layer", pa.int32()), ("neuron", pa.int32()),
    ("norm", pa.float32()), ("logit_mean", pa.float32()), ("logit_std", pa.float32()),
    ("max_z", pa.float32()), ("min_z", pa.float32()),
    ("top1_token_id", pa.int32()), ("top1_token", pa.string()),
    ("bottom1_token_id", pa.int32()), ("bottom1_token", pa.string()),
    # the k ids of each side in rank order, so comparisons need not regroup the long `atlas` table
    ("top_token_ids", pa.list_(pa.int32())), ("bottom_token_ids", pa.list_(pa.int32())),
])
LOW_CARDINALITY = ("model", "matrix", "side")  # string columns worth a dictionary: a few distinct values
TOKENS = pa.schema([
    ("model", pa.string()), ("token_id", pa.int32()), ("token", pa.string()), ("piece", pa.string()),
    ("raw", pa.binary()), ("is_special", pa.bool_()), ("is_word", pa.bool_()),
])


def partition_path(out: Path, table: str, model: str, matrix: str, layer: int) -> Path:
    """Where one (model, matrix, layer) partition of `atlas` or `neurons` lives."""
    return out / table / f"model={model}" / f"matrix={matrix}" / f"layer={layer}.parquet"


def tokens_path(out: Path, model: str) -> Path:
    return out / "tokens" / f"model={model}" / "tokens.parquet"


def atlas_rows(p: Projection, texts: pa.Array, model: str, matrix: str, layer: int, first: int) -> pa.Table:
    """Long format: for each neuron, its k top then k bottom tokens, rank 1 = most extreme."""
    n, k = p.top_ids.shape
    ids = np.concatenate([p.top_ids.numpy(), p.bottom_ids.numpy()], axis=1).astype(np.int32)  # [n, 2k]
    logits = np.concatenate([p.top_logits.numpy(), p.bottom_logits.numpy()], axis=1)
    z = np.concatenate([z_scores(p.top_logits, p.mean, p.std).numpy(),
                        z_scores(p.bottom_logits, p.mean, p.std).numpy()], axis=1)
    side = np.tile(np.repeat(np.array([0, 1], dtype=np.int32), k), n)
    flat_ids = pa.array(ids.ravel())
    return pa.table([
        pa.repeat(model, 2 * k * n), pa.repeat(matrix, 2 * k * n),
        pa.array(np.full(2 * k * n, layer, dtype=np.int32)),
        pa.array(np.repeat(np.arange(first, first + n, dtype=np.int32), 2 * k)),
        pc.take(pa.array(["top", "bottom"]), pa.array(side)),
        pa.array(np.tile(np.arange(1, k + 1, dtype=np.int16), 2 * n)),
        flat_ids, pc.take(texts, flat_ids),
        pa.array(logits.ravel().astype(np.float32)), pa.array(z.ravel().astype(np.float32)),
    ], schema=ATLAS)


def _id_lists(ids: np.ndarray) -> pa.Array:
    """`[n, k]` ids as n lists of k int32."""
    n, k = ids.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                    pa.array(ids.astype(np.int32).ravel()))


def neuron_rows(p: Projection, texts: pa.Array, model: str, matrix: str, layer: int, first: int) -> pa.Table:
    """One row per neuron: stored vector's L2 norm, logit mean/std, extreme z-scores, top-1/bottom-1 tokens,
    and the top-k and bottom-k ids as lists."""
    n = p.top_ids.shape[0]
    top1 = pa.array(p.top_ids[:, 0].numpy().astype(np.int32))
    bottom1 = pa.array(p.bottom_ids[:, 0].numpy().astype(np.int32))
    return pa.table([
        pa.repeat(model, n), pa.repeat(matrix, n), pa.array(np.full(n, layer, dtype=np.int32)),
        pa.array(np.arange(first, first + n, dtype=np.int32)),
        pa.array(p.norm.numpy().astype(np.float32)), pa.array(p.mean.numpy().astype(np.float32)),
        pa.array(p.std.numpy().astype(np.float32)),
        pa.array(z_scores(p.top_logits[:, :1], p.mean, p.std)[:, 0].numpy().astype(np.float32)),
        pa.array(z_scores(p.bottom_logits[:, :1], p.mean, p.std)[:, 0].numpy().astype(np.float32)),
        top1, pc.take(texts, top1), bottom1, pc.take(texts, bottom1),
        _id_lists(p.top_ids.numpy()), _id_lists(p.bottom_ids.numpy()),
    ], schema=NEURONS)


def tokens_rows(table: TokenTable, model: str) -> pa.Table:
    n = len(table)
    return pa.table([
        pa.repeat(model, n), pa.array(np.arange(n, dtype=np.int32)), pa.array(table.text, pa.string()),
        pa.array(table.pieces, pa.string()), pa.array(table.raw, pa.binary()),
        pa.array(table.special, pa.bool_()), pa.array([table.is_word(i) for i in range(n)], pa.bool_()),
    ], schema=TOKENS)


def kv_metadata(fields: dict) -> dict[bytes, bytes]:
    """Namespaced Parquet key-value metadata (`atlas.<key>`), values as strings or JSON."""
    return {f"atlas.{k}".encode(): (v if isinstance(v, str) else json.dumps(v)).encode() for k, v in fields.items()}


@contextmanager
def atomic_parquet(path: Path, schema: pa.Schema, metadata: dict) -> Iterator[pq.ParquetWriter]:
    """Write `path.tmp`, rename onto `path` only when complete; delete the temporary file on error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    few_values = [c for c in LOW_CARDINALITY if c in schema.names]  # dictionary-encoding the rest costs time
    writer = pq.ParquetWriter(tmp, schema.with_metadata(kv_metadata(metadata)), compression="zstd",
                              use_dictionary=few_values)
    try:
        yield writer
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write a whole file (a plot, a page) under a temporary name and rename it, so it is never half there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_kv_metadata(path: Path) -> dict[str, str]:
    """The `atlas.*` key-value metadata of a Parquet file, keys without the namespace."""
    raw = pq.read_schema(path).metadata or {}
    return {k.decode().removeprefix("atlas."): v.decode() for k, v in raw.items() if k.startswith(b"atlas.")}
