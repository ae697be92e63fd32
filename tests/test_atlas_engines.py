"""Engines: the same shard function in this process, in a local process pool and on a local Ray instance
gives the same atlas files, and resumes the same way."""
from __future__ import annotations

import importlib.util
import os

import pytest

from pipeline.atlas.engines import shards
from pipeline.atlas.job import Partition
from tests.conftest import run_cli
from tests.test_atlas_resume import assert_same_atlas

HAS_RAY = importlib.util.find_spec("ray") is not None


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """A small model and its atlas built in this process, the default engine."""
    folder = model_dir("llama", n_layers=6, d_ff=64)
    out = tmp_path_factory.mktemp("reference")
    assert run_cli("build", folder, "--out", out, "-q").exit_code == 0
    return folder, out


def test_shards_are_whole_layers_dealt_round_robin():
    parts = [Partition(m, layer) for layer in range(5) for m in ("up", "gate", "down")]
    groups = shards(parts, 2)
    assert [sorted({p.layer for p in g}) for g in groups] == [[0, 2, 4], [1, 3]]
    assert sorted(parts, key=str) == sorted((p for g in groups for p in g), key=str)
    assert len(shards(parts, 9)) == 5  # never more shards than layers


def test_local_process_pool_writes_the_same_atlas(reference, tmp_path):
    folder, out = reference
    result = run_cli("build", folder, "--out", tmp_path, "--workers", "2", "-q")
    assert result.exit_code == 0, result.output
    assert_same_atlas(out, tmp_path)


@pytest.mark.skipif(not HAS_RAY and not os.environ.get("CI"), reason="ray is not installed (pip install '.[ray]')")
def test_ray_engine_writes_the_same_atlas_and_resumes(reference, tmp_path):
    import ray

    folder, out = reference
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        result = run_cli("build", folder, "--out", tmp_path, "--engine", "ray", "--workers", "2", "-q")
        assert result.exit_code == 0, result.output
        assert_same_atlas(out, tmp_path)
        # a crash that lost one partition: a rerun on Ray rebuilds exactly that one
        lost = tmp_path / "atlas" / f"model={folder.name}" / "matrix=down" / "layer=3.parquet"
        lost.unlink()
        (tmp_path / ".state" / "atlas" / folder.name / "down-3.json").unlink()
        result = run_cli("build", folder, "--out", tmp_path, "--engine", "ray", "--workers", "2")
        assert result.exit_code == 0, result.output
        assert "1 partitions written, 17 already built" in result.output
        assert_same_atlas(out, tmp_path)
    finally:
        ray.shutdown()


def test_unknown_engine_and_zero_workers_are_usage_errors(reference, tmp_path):
    folder, _ = reference
    assert run_cli("build", folder, "--out", tmp_path, "--engine", "spark").exit_code == 2
    assert run_cli("build", folder, "--out", tmp_path, "--workers", "0").exit_code == 2
