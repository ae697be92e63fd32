"""`atlas build` in a fresh process, timed, with the peak memory and the lanes' time the build measures for
itself; and a build's fixed start-up cost alone.

The OS's peak for a child (`RUSAGE_CHILDREN`, and even the child's own `ru_maxrss`, which survives
exec) also counts the pages the child shared with this parent at fork; the build reports its address
space's high-water mark instead (`pipeline.atlas.job.peak_rss_bytes`).
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple


class Build(NamedTuple):
    seconds: float  # wall, process start to exit
    peak_rss: int  # bytes
    lanes_seconds: float  # the partitions' share: from the lanes' start, after the head's preparation, to their end


def fresh_build(args: list[str]) -> Build:
    """Wall seconds, peak RSS and the lanes' seconds of `atlas build ARGS` (one engine worker, as by
    default) in a new Python process."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "build", *args], check=True, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    summary = re.search(r"([0-9.]+) s of it on the partitions, peak memory ([0-9.]+) GiB", done.stdout)
    if summary is None:
        raise SystemExit(f"atlas build printed no summary line:\n{done.stdout}{done.stderr}")
    return Build(seconds, int(float(summary.group(2)) * 2**30), float(summary.group(1)))


STARTUP = """
import gc, sys
from pathlib import Path
from pipeline.atlas.engines import build_shard
from pipeline.config import AtlasConfig
build_shard(AtlasConfig(model=sys.argv[1], out=Path(sys.argv[2])), [])
gc.freeze()  # and exit as the CLI does
"""


def fresh_startup(model: str) -> float:
    """Wall seconds of what a build does besides its partitions, in a new process: imports, opening and
    hashing the source, the token table, the head's copy and statistics, loading the kernels, exiting
    (the shard function given no partitions)."""
    with tempfile.TemporaryDirectory() as out:  # a first build's: the source hashed, no cached digest
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", STARTUP, model, out], check=True, capture_output=True, text=True)
        return time.perf_counter() - t0
