"""`atlas build` in a fresh process, timed, with the peak memory the build measures for itself.

The OS's peak for a child (`RUSAGE_CHILDREN`, and even the child's own `ru_maxrss`, which survives
exec) also counts the pages the child shared with this parent at fork; the build reports its address
space's high-water mark instead (`pipeline.atlas.job.peak_rss_bytes`).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time


def fresh_build(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of `atlas build ARGS` in a new Python process."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "build", *args], check=True, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    peak = re.search(r"peak memory ([0-9.]+) GiB", done.stdout)
    if peak is None:
        raise SystemExit(f"atlas build printed no summary line:\n{done.stdout}{done.stderr}")
    return seconds, int(float(peak.group(1)) * 2**30)
