"""The streaming, resumable build: (matrix, layer) partitions, one per lane (lanes.py) at a time.

A partition is a pure function of (source, settings, matrix, layer) → an `atlas` and a `neurons`
Parquet file, each written under a temporary name and renamed when complete. A completion marker in
`<out>/.state/atlas/<model>/` records the partition and the settings it was built with; a rerun skips
marked partitions, so a run killed at any moment resumes to the same atlas. One file lock per model
keeps two builds from writing the same atlas at once. Memory holds the LM head and, per lane, the
partition being read and projected; the one before it waits, its results and its few short rows'
vectors only, to be written once the next one's scan has carried those rows (project.project_blocks).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

from pipeline import __version__
from pipeline.arch import ArchAdapter
from pipeline.atlas import kernels, schema
from pipeline.atlas.certified import exact_matmul, fastest_dtype, row_norms
from pipeline.atlas.engines import run_engine
from pipeline.atlas.lanes import Feed, lane_pool, lane_shape, to_device
from pipeline.atlas.project import PRODUCT_BLOCK, Head, Projection, fold_gain, project_blocks
from pipeline.config import AtlasConfig
from pipeline.device import torch_device
from pipeline.errors import AtlasError
from pipeline.sources import open_source, resolve
from pipeline.sources.base import source_sha256
from pipeline.tokens import TokenTable

# 2: order by the exact logit rounded to fp32 (certified.py), on any dtype; 3: id lists in `neurons`
FORMAT_VERSION = "3"


@dataclass(frozen=True)
class Partition:
    matrix: str
    layer: int


@dataclass(frozen=True)
class BuildReport:
    """What a build did, for the CLI's summary line."""

    model: str
    out: Path
    written: int
    skipped: int
    seconds: float
    peak_rss_bytes: int
    lanes_seconds: float | None = None  # from the lanes' start, after the head's preparation, to their end;
    #                                     None where the partitions ran on another engine's workers


def fit_tokens(tokens: TokenTable, vocab: int) -> TokenTable:
    """Match the tokenizer to the head's rows; refuse a tokenizer that belongs to another model."""
    n = len(tokens)
    beyond_head = [i for i in range(vocab, n) if not tokens.special[i]]
    if beyond_head or vocab - n > max(128, vocab // 50):
        raise AtlasError(f"the tokenizer has {n} tokens but the LM head has {vocab} rows: "
                         f"wrong tokenizer for this model?")
    return tokens.fit(vocab)


class AtlasJob:
    """One model's atlas build, resolved and validated before anything is written."""

    def __init__(self, cfg: AtlasConfig) -> None:
        self.cfg = cfg
        resolved = resolve(cfg.model)
        self.resolved = resolved
        self.source = open_source(resolved.path)
        self.adapter = ArchAdapter(self.source)
        self.model = cfg.name or resolved.slug
        self.layers = self._check_layers(cfg.layers)
        self.matrices = self._check_matrices(cfg.matrices)
        self.device = torch_device(cfg.device)
        self.vocab, self.d_model = self.adapter.head_shape()
        if cfg.k > self.vocab:
            raise AtlasError(f"-k {cfg.k} is more than the {self.vocab} tokens of {self.model}'s LM head")
        with ThreadPoolExecutor(1, "atlas-sha256") as side:  # hashlib releases the GIL: hashed while tokens are read
            digest = side.submit(source_sha256, self.source, cfg.out / ".state" / "sha256.json", resolved.sha256)
            self.tokens = fit_tokens(self.source.token_table(), self.vocab)
        self.state = cfg.out / ".state" / "atlas" / self.model
        self.sha256 = digest.result()

    def _check_layers(self, layers: tuple[int, ...] | None) -> tuple[int, ...]:
        n = self.adapter.n_layers
        bad = [layer for layer in layers or () if layer >= n]
        if bad:
            raise AtlasError(f"layer {bad[0]} is out of range: {self.model} has layers 0-{n - 1}")
        return layers or tuple(range(n))

    def _check_matrices(self, matrices: tuple[str, ...] | None) -> tuple[str, ...]:
        missing = [m for m in matrices or () if m not in self.adapter.matrices]
        if missing:
            raise AtlasError(f"{self.adapter.family.name} MLPs have no {missing[0]!r} matrix; "
                             f"they have {', '.join(self.adapter.matrices)}")
        return matrices or self.adapter.matrices

    @cached_property
    def dtype(self) -> str:
        """The compute dtype; `auto` is measured only when there is something to compute."""
        if self.cfg.dtype != "auto":
            return self.cfg.dtype
        return str(fastest_dtype(self.device, self.d_model, self.vocab)).removeprefix("torch.")

    def settings(self) -> dict:
        """Everything the numbers depend on; a resumed run must agree with the partitions it keeps.
        The compute dtype is not among them: every dtype gives the same, exact atlas."""
        return {"format": FORMAT_VERSION, "source_sha256": self.sha256, "k": self.cfg.k,
                "norm": self.cfg.norm, "center": self.cfg.center}

    def provenance(self) -> dict:
        a = self.adapter
        return {"model": self.model, "model_id": self.resolved.model_id, "source_path": str(self.resolved.path),
                "source_sha256": self.sha256, "source_format": self.source.format,
                "architecture": self.source.model_type, "family": a.family.name, "n_layers": a.n_layers,
                "n_neurons": a.n_neurons, "d_model": self.d_model, "vocab_size": self.vocab,
                "tied_head": a.tied, "norm": self.cfg.norm, "center": self.cfg.center, "k": self.cfg.k,
                "dtype": self.dtype, "package_version": __version__,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "config": self.cfg.as_dict()}

    def run(self, progress: bool = True, log=lambda msg: print(msg, file=sys.stderr)) -> BuildReport:
        t0, lanes_seconds = time.perf_counter(), None
        self.state.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.state) + ".lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise AtlasError(f"another `atlas build` is writing the atlas of {self.model} in {self.cfg.out} "
                             f"(lock {lock.lock_file}); wait for it to finish") from None
        try:
            self._remove_temporaries()
            todo = self._plan(log)
            skipped = len(self.layers) * len(self.matrices) - len(todo)
            if skipped:
                log(f"{self.model}: {skipped} partitions already built, skipped (--force recomputes them)")
            if todo or not schema.tokens_path(self.cfg.out, self.model).exists():
                self.dtype  # measured once, before two threads would both want it
                with ThreadPoolExecutor(1, "atlas-tokens") as side:
                    tokens = side.submit(self._write_tokens)  # while the partitions are built
                    if todo:
                        lanes_seconds = self._run_partitions(todo, progress)
                    tokens.result()
        finally:
            lock.release()
        return BuildReport(self.model, self.cfg.out, len(todo), skipped, time.perf_counter() - t0, peak_rss_bytes(),
                           lanes_seconds)

    def _marker(self, part: Partition) -> Path:
        return self.state / f"{part.matrix}-{part.layer}.json"

    def _plan(self, log) -> list[Partition]:
        """Partitions still to build; refuses to mix settings within one model's atlas."""
        current = self.settings()
        built = {p: json.loads(p.read_text()) for p in self.state.glob("*.json")}
        stale = {p: s for p, s in built.items() if s != current}
        if stale:
            old = next(iter(stale.values()))
            diff = ", ".join(f"{k}: {old.get(k)} → {v}" for k, v in current.items() if old.get(k) != v)
            if not self.cfg.force:
                raise AtlasError(f"the atlas of {self.model} in {self.cfg.out} was built with other settings "
                                 f"({diff}); pass --force to rebuild it, or --name to keep both")
            log(f"{self.model}: settings changed ({diff}); rebuilding the whole atlas")
            self._remove_model_outputs()
        parts = [Partition(m, layer) for layer in self.layers for m in self.matrices]
        if self.cfg.force:
            for part in parts:
                self._marker(part).unlink(missing_ok=True)
        return [p for p in parts if not self._marker(p).exists()]

    def _model_dirs(self) -> list[Path]:
        return [self.cfg.out / t / f"model={self.model}" for t in ("atlas", "neurons", "tokens")]

    def _remove_temporaries(self) -> None:
        for d in self._model_dirs():
            for tmp in d.rglob("*.tmp"):
                tmp.unlink()

    def _remove_model_outputs(self) -> None:
        for path in [*self.state.glob("*.json"), *(f for d in self._model_dirs() for f in d.rglob("*.parquet"))]:
            path.unlink()

    def _write_tokens(self) -> None:
        meta = {**self.provenance(), "table": "tokens"}
        with schema.atomic_parquet(schema.tokens_path(self.cfg.out, self.model), schema.TOKENS, meta) as w:
            w.write_table(schema.tokens_rows(self.tokens, self.model))

    @property
    def _compact(self) -> bool:
        """An accelerator takes a bf16 or fp16 checkpoint's tensors as stored and converts (and transposes)
        them itself: half the bytes to read, pin and copy as in fp32, and no transposition on the host."""
        return self.device.type != "cpu"

    def _gain(self, role: str, layer: int | None = None) -> torch.Tensor:
        return to_device(self.adapter.gain(role, layer), self.device)

    def _load(self, part: Partition) -> tuple[torch.Tensor, torch.Tensor]:
        """One matrix of one layer, on the device, with the gains the normalisation folds in, and the raw
        vectors' norms."""
        stored, transposed = self.adapter.neuron_matrix(part.matrix, part.layer, self._compact)
        stored = to_device(stored, self.device).float()
        vectors = stored.T.contiguous() if transposed else stored
        gain = self._gain("mlp_norm", part.layer) if self.cfg.norm == "both" and part.matrix != "down" else None
        norms = row_norms(vectors)  # in float64 for extreme rows: not finite only where a weight is not
        if not bool(torch.isfinite(norms).all()):
            raise AtlasError(f"{self.model}: the {part.matrix} matrix of layer {part.layer} has weights that are "
                             f"not finite (NaN or inf): a broken checkpoint?")
        return fold_gain(vectors, gain, self.cfg.center), norms.float()

    def _head(self) -> Head:
        """The head read a chunk of rows at a time, so a bf16 checkpoint's is held once, in bf16."""
        gain = self._gain("final_norm") if self.cfg.norm in ("final", "both") else None

        def read(rows: slice) -> torch.Tensor:
            weight = to_device(self.adapter.head(rows, self._compact), self.device).float()
            return weight if gain is None else weight.mul_(gain)  # W_U (g ⊙ w) = (W_U ⊙ g) w

        head = Head.from_rows(read, self.vocab, getattr(torch, self.dtype))
        if not math.isfinite(head.fast.row_norm):
            raise AtlasError(f"{self.model}: the LM head has weights that are not finite (NaN or inf): "
                             f"a broken checkpoint?")
        return head

    def _write(self, part: Partition, blocks: list[Projection], texts: pa.Array) -> None:
        meta = {**self.provenance(), "matrix": part.matrix, "layer": part.layer}
        out, model = self.cfg.out, self.model
        paths = [schema.partition_path(out, t, model, part.matrix, part.layer) for t in ("neurons", "atlas")]
        for path, table, rows in zip(paths, (schema.NEURONS, schema.ATLAS), (schema.neuron_rows, schema.atlas_rows)):
            with schema.atomic_parquet(path, table, {**meta, "table": path.parts[-4]}) as w:
                first = 0
                for block in blocks:  # one row group per block of neurons
                    w.write_table(rows(block, texts, model, part.matrix, part.layer, first))
                    first += block.top_ids.shape[0]
        marker = self._marker(part)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.settings()))
        os.replace(tmp, marker)

    def _run_partitions(self, todo: list[Partition], progress: bool) -> float | None:
        """In this process, or as shards on the configured engine (same files, same markers); the lanes'
        seconds where they ran here."""
        if self.cfg.engine == "local" and (self.cfg.workers or 1) == 1:
            return self.execute(todo, progress)
        with tqdm(total=len(todo), desc=f"atlas {self.model} ({self.cfg.engine})", unit="part", file=sys.stderr,
                  disable=None if progress else True) as bar:
            run_engine(self.cfg, todo, bar.update)
        return None

    def execute(self, todo: list[Partition], progress: bool) -> float:
        """Project and write `todo` here, lanes taking partitions in turn; the shard function of every engine.
        Returns the lanes' wall seconds, which leave out the build's fixed cost (the head's preparation).

        Reads and writes overlap other lanes' computing (lanes.py).
        """
        lanes, per_lane = lane_shape(self.device, self.cfg.lanes)
        with exact_matmul():
            with ThreadPoolExecutor(1, "atlas-kernels") as side:
                if self.device.type == "cpu":
                    side.submit(kernels.warm_up)
                head = self._head()  # with every core, before the lanes take one each
            texts = pa.array(self.tokens.text, pa.string())
            feed = Feed(todo)
            with tqdm(total=len(todo), desc=f"atlas {self.model}", unit="part", file=sys.stderr,
                      disable=None if progress else True) as bar, lane_pool(lanes, per_lane, self.device) as pool:
                start = time.perf_counter()  # the device's queue is empty: lane_pool waited for it
                counted = threading.Lock()

                def done() -> None:
                    with counted:
                        bar.update()

                futures = [pool.submit(self._run_lane, feed, head, texts, done) for _ in range(lanes)]
                try:
                    for finished in as_completed(futures):
                        finished.result()
                except BaseException:
                    feed.stop()  # partitions already taken finish and are kept
                    raise
        return time.perf_counter() - start

    def _run_lane(self, parts: Feed, head: Head, texts: pa.Array, done: Callable[[], None]) -> None:
        """Build partitions taken from `parts` until none is left, their blocks of up to PRODUCT_BLOCK
        neurons in one `project_blocks` stream: a partition is written once the next block is scanned."""
        bs = self.cfg.block_size
        step = bs * max(1, PRODUCT_BLOCK // bs)
        taken: deque[tuple[Partition, torch.Tensor, list[Projection]]] = deque()  # (part, norms, row groups)

        def blocks() -> Iterator[torch.Tensor]:
            for part in parts:
                vectors, norms = self._load(part)
                taken.append((part, norms, []))
                yield from vectors.split(step)
                del vectors  # not held while the next partition is read

        for projection in project_blocks(blocks(), head, self.cfg.k):
            part, norms, projected = taken[0]
            first = sum(len(group.mean) for group in projected)
            last = first + len(projection.mean)
            projected += replace(projection, norm=norms[first:last]).cpu().split(bs)  # the stored vector's norm
            if last == len(norms):
                taken.popleft()
                self._write(part, projected, texts)
                done()


def peak_rss_bytes() -> int:
    """This process's peak resident memory: the address space's high-water mark where Linux reports it
    (`ru_maxrss` survives exec, so a child started by a big parent would report the parent's pages)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_atlas(cfg: AtlasConfig, progress: bool = True) -> BuildReport:
    """Resolve, validate and build one model's atlas."""
    return AtlasJob(cfg).run(progress=progress)
