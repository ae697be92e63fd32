"""Resume and atomicity: a crashed or killed build, rerun, gives the atlas an uninterrupted run gives."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from filelock import FileLock

from pipeline.arch import ArchAdapter
from pipeline.atlas.job import AtlasJob
from pipeline.config import AtlasConfig
from tests.conftest import run_cli


def snapshot(out: Path) -> dict[str, object]:
    """Every Parquet file's data (metadata left aside: it records the creation time)."""
    return {str(p.relative_to(out)): pq.read_table(p).replace_schema_metadata(None)
            for p in sorted(out.rglob("*.parquet"))}


def assert_same_atlas(a: Path, b: Path) -> None:
    sa, sb = snapshot(a), snapshot(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].equals(sb[name]), name


@pytest.fixture
def deep_model(model_dir):
    return model_dir("llama", n_layers=12, d_ff=256)


def test_rerun_after_a_crash_resumes_and_matches_an_uninterrupted_run(deep_model, tmp_path, monkeypatch):
    assert run_cli("build", deep_model, "--out", tmp_path / "clean", "-q").exit_code == 0
    real = ArchAdapter.neuron_matrix

    def failing(self, matrix, layer, *args):
        if layer == 7:
            raise OSError("disk went away")
        return real(self, matrix, layer, *args)

    monkeypatch.setattr(ArchAdapter, "neuron_matrix", failing)
    with pytest.raises(OSError):
        run_cli("build", deep_model, "--out", tmp_path / "crashed", "-q")
    done = list((tmp_path / "crashed" / ".state" / "atlas").glob("*/*.json"))
    assert 0 < len(done) < 36
    assert not list((tmp_path / "crashed").rglob("*.tmp"))
    monkeypatch.setattr(ArchAdapter, "neuron_matrix", real)
    result = run_cli("build", deep_model, "--out", tmp_path / "crashed")
    assert result.exit_code == 0
    assert f"{len(done)} partitions already built, skipped" in result.stderr
    assert_same_atlas(tmp_path / "clean", tmp_path / "crashed")


def test_a_rerun_restores_a_missing_tokens_table_without_rebuilding_partitions(deep_model, tmp_path, monkeypatch):
    from pipeline.atlas import job

    assert run_cli("build", deep_model, "--out", tmp_path / "clean", "-q").exit_code == 0
    real = job.AtlasJob._write_tokens
    monkeypatch.setattr(job.AtlasJob, "_write_tokens", lambda self: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):  # the tokens table is written beside the partitions, which all finish
        run_cli("build", deep_model, "--out", tmp_path / "partial", "-q")
    assert not list((tmp_path / "partial" / "tokens").rglob("*.parquet"))
    monkeypatch.setattr(job.AtlasJob, "_write_tokens", real)
    result = run_cli("build", deep_model, "--out", tmp_path / "partial")
    assert result.exit_code == 0 and "36 partitions already built, skipped" in result.stderr
    assert_same_atlas(tmp_path / "clean", tmp_path / "partial")


def test_kill_9_at_any_moment_then_rerun_gives_the_same_atlas(deep_model, tmp_path):
    assert run_cli("build", deep_model, "--out", tmp_path / "clean", "-q").exit_code == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline", "build", str(deep_model), "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    state = out / ".state" / "atlas" / deep_model.name
    deadline = time.monotonic() + 120
    while not list(state.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(state.glob("*.json")))
    assert finished < 36, "the build finished before it could be killed; make the model deeper"
    for path in out.rglob("*.parquet"):  # whatever is there under a final name is complete
        pq.read_table(path)
    assert run_cli("build", deep_model, "--out", out, "-q").exit_code == 0
    assert not list(out.rglob("*.tmp"))
    assert_same_atlas(tmp_path / "clean", out)


def test_force_recomputes_and_changed_settings_are_refused(model_dir, tmp_path):
    folder = model_dir("llama")
    assert run_cli("build", folder, "--out", tmp_path, "-k", 5, "-q").exit_code == 0
    again = run_cli("build", folder, "--out", tmp_path, "-k", 5)
    assert "9 partitions already built" in again.stderr and "0 partitions written" in again.stdout
    assert "9 partitions written" in run_cli("build", folder, "--out", tmp_path, "-k", 5, "--force").stdout
    refused = run_cli("build", folder, "--out", tmp_path, "-k", 6)
    assert refused.exit_code == 1 and "k: 5 → 6" in refused.stderr and "--force" in refused.stderr
    assert run_cli("build", folder, "--out", tmp_path, "-k", 6, "--force", "-q").exit_code == 0
    assert len(pq.read_table(next((tmp_path / "atlas").rglob("*.parquet")))) == 48 * 2 * 6


def test_a_second_build_into_the_same_folder_is_locked_out(model_dir, tmp_path):
    folder = model_dir("llama")
    lock_path = tmp_path / ".state" / "atlas" / f"{folder.name}.lock"
    lock_path.parent.mkdir(parents=True)
    with FileLock(str(lock_path)):
        result = run_cli("build", folder, "--out", tmp_path)
    assert result.exit_code == 1
    assert "another `atlas build` is writing" in result.stderr
    assert not list(tmp_path.rglob("*.parquet"))


def test_the_build_reports_its_lanes_time_within_its_own(model_dir, tmp_path):
    """The lanes' time (after the head's preparation) is what the 8B-shape bench takes a layer's cost from:
    reported for a build in this process, within the build's time; not where nothing was built or where
    another engine's workers built the partitions."""
    folder = model_dir("llama")
    report = AtlasJob(AtlasConfig(model=str(folder), out=tmp_path / "a", k=5)).run(progress=False)
    assert report.written == 9 and 0 < report.lanes_seconds < report.seconds
    again = AtlasJob(AtlasConfig(model=str(folder), out=tmp_path / "a", k=5)).run(progress=False)
    assert again.written == 0 and again.lanes_seconds is None
    pool = AtlasJob(AtlasConfig(model=str(folder), out=tmp_path / "b", k=5, workers=2)).run(progress=False)
    assert pool.written == 9 and pool.lanes_seconds is None
    line = run_cli("build", folder, "--out", tmp_path / "c", "-k", 5).stdout
    assert re.search(r"9 partitions written, 0 already built, in [0-9.]+ s \([0-9.]+ s of it on the partitions, "
                     r"peak memory [0-9.]+ GiB\)", line), line
