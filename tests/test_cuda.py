"""The `--device cuda` path (topk candidates, gathered float64 re-scoring, lanes on CUDA streams, pinned
copies) against the float64 reference and the CPU build. Skipped where torch sees no CUDA device, as
in CI; on a GPU, bench/gpu_check.sh runs this file before the GPU benchmark."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.atlas.certified import exact_matmul
from pipeline.atlas.project import Head, project_blocks
from tests.conftest import run_cli
from tests.test_project import assert_exact, crowded, head_with_ties, joined  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("candidates", [2, 13, 64])
def test_cuda_projection_equals_the_float64_reference(head_with_ties, candidates):  # noqa: F811
    """Near-ties the bf16 product cannot tell apart, a dead neuron and duplicated head rows, in blocks of a
    stream and head chunks of 1,000 rows: few candidates force the fp32 retry and the float64 fallback."""
    head, vectors = crowded(head_with_ties)
    with exact_matmul():
        parts = project_blocks(vectors.cuda().split(24), Head.from_weight(head.cuda(), torch.bfloat16), k=12,
                               chunk=1000, candidates=candidates)
        assert_exact(joined([p.cpu() for p in parts]), vectors, head)


@pytest.mark.parametrize("stored, norm", [(torch.float32, "raw"), (torch.bfloat16, "both")])
def test_a_cuda_build_writes_the_atlas_of_a_cpu_build(model_dir, tmp_path, stored, norm):
    """Same tokens in the same order; statistics and logits equal to fp32 rounding (the GPU sums in
    another order). A bf16 checkpoint is sent as stored and converted, its gains folded, on the GPU."""
    folder = model_dir("llama", tie=True, dtype=stored)
    for device in ("cpu", "cuda"):
        options = ["--out", tmp_path / device, "--device", device, "--norm", norm, "-q"]
        assert run_cli("build", folder, *options).exit_code == 0
    files = sorted((tmp_path / "cpu").rglob("*.parquet"))
    assert len(files) == 2 * 9 + 1
    for path in files:
        cpu = pq.read_table(path).to_pandas()
        cuda = pq.read_table(tmp_path / "cuda" / path.relative_to(tmp_path / "cpu")).to_pandas()
        assert cpu.select_dtypes(exclude="float").equals(cuda.select_dtypes(exclude="float")), path
        floats = cpu.select_dtypes(include="float").columns
        np.testing.assert_allclose(cuda[floats].to_numpy(), cpu[floats].to_numpy(), rtol=1e-5, atol=1e-6)
