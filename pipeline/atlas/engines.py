"""Where a build's partitions run: in this process, in a local process pool, or on a Ray cluster.

Every engine runs the same pure shard function, `build_shard(cfg, parts)`: it opens the source,
projects the listed partitions and writes their Parquet files and completion markers. So the output
layout and the resume semantics are the same whatever the engine. The driver (`AtlasJob.run`) holds
the model's lock, plans what is left and writes the tokens table; a shard writes only its own
partitions. A shard is whole layers (dealt round-robin, so shards are balanced), so each layer is read
once.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from pipeline.config import AtlasConfig
from pipeline.errors import AtlasError

RAY_CPUS_PER_WORKER = 4  # default share of a Ray cluster's CPUs per shard when --workers is not given


def build_shard(cfg: AtlasConfig, parts: list, threads: int | None = None) -> int:
    """Project and write `parts` (Partition list) of `cfg`'s model; what every worker runs."""
    from pipeline.atlas.job import AtlasJob

    if threads:
        torch.set_num_threads(threads)
    AtlasJob(cfg).execute(parts, progress=False)
    return len(parts)


def shards(parts: list, n: int) -> list[list]:
    """At most `n` groups of whole layers, dealt round-robin."""
    layers = sorted({p.layer for p in parts})
    groups = [set(layers[i::n]) for i in range(min(n, len(layers)))]
    return [[p for p in parts if p.layer in g] for g in groups]


def run_engine(cfg: AtlasConfig, parts: list, done: Callable[[int], None]) -> None:
    """Run `parts` on `cfg.engine` with `cfg.workers` shards; `done(n)` after each shard finishes."""
    if cfg.engine == "ray":
        _run_ray(cfg, parts, done)
    else:
        _run_pool(cfg, parts, done)


def _run_pool(cfg: AtlasConfig, parts: list, done: Callable[[int], None]) -> None:
    groups = shards(parts, cfg.workers or 1)
    threads = max(1, (os.cpu_count() or 1) // len(groups))
    # spawn, not fork: a forked child of a process that already ran OpenMP can hang in it
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(groups), mp_context=context) as pool:
        for future in as_completed([pool.submit(build_shard, cfg, g, threads) for g in groups]):
            done(future.result())


def _run_ray(cfg: AtlasConfig, parts: list, done: Callable[[int], None]) -> None:
    try:
        import ray
    except ImportError:
        raise AtlasError("the ray engine needs Ray: pip install '.[ray]' (or pip install ray)") from None
    if not ray.is_initialized():  # RAY_ADDRESS, if set, names the cluster; else a local instance starts
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = cfg.workers or max(1, cpus // RAY_CPUS_PER_WORKER)
    groups = shards(parts, workers)
    per_task = max(1, cpus // len(groups))
    task = ray.remote(num_cpus=per_task)(build_shard)
    pending = [task.remote(cfg, g, per_task) for g in groups]
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        done(ray.get(finished[0]))
