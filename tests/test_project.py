"""The projection math against a float64 brute force with an explicit tie rule (value desc, id asc)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.atlas.project import Head, fold_gain, project_block, z_scores


def reference(vectors: torch.Tensor, head: torch.Tensor, k: int):
    """Full logit matrix in float64, sorted with numpy's lexsort: the definition of the atlas order."""
    logits = (vectors.double() @ head.double().T).numpy()
    ids = np.arange(head.shape[0])
    top = np.stack([np.lexsort((ids, -row))[:k] for row in logits])
    bottom = np.stack([np.lexsort((ids, row))[:k] for row in logits])
    return logits, top, bottom


@pytest.fixture
def head_with_ties() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    head = torch.randn(3000, 48, generator=g)
    head[[7, 10, 2500, 2999]] = head[3].clone()  # duplicated rows (as SmolLM2's special tokens have): exact ties
    return head


@pytest.mark.parametrize("chunk", [256, 1000, 8192])
def test_top_and_bottom_ids_match_brute_force_whatever_the_chunking(head_with_ties, chunk):
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(64, 48, generator=g)
    vectors[5] = 0  # a dead neuron: every logit ties
    vectors[9] = head_with_ties[3]  # aligned with the duplicated rows: ties at the top
    p = project_block(vectors, Head.from_weight(head_with_ties), k=12, chunk=chunk)
    logits, top, bottom = reference(vectors, head_with_ties, 12)
    assert np.array_equal(p.top_ids.numpy(), top)
    assert np.array_equal(p.bottom_ids.numpy(), bottom)
    np.testing.assert_allclose(p.top_logits.numpy(), np.take_along_axis(logits, top, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.bottom_logits.numpy(), np.take_along_axis(logits, bottom, 1), rtol=1e-5, atol=1e-5)
    assert p.top_ids[5].tolist() == list(range(12))  # all tied: lowest ids first
    assert p.top_ids[9, :5].tolist() == [3, 7, 10, 2500, 2999]


def test_statistics_equal_the_full_logit_vector(head_with_ties):
    vectors = torch.randn(32, 48, generator=torch.Generator().manual_seed(2)) * 3
    p = project_block(vectors, Head.from_weight(head_with_ties, chunk=500), k=5)
    logits = vectors.double() @ head_with_ties.double().T
    np.testing.assert_allclose(p.mean.numpy(), logits.mean(1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p.std.numpy(), logits.std(1, unbiased=False).numpy(), rtol=1e-4)
    np.testing.assert_allclose(p.norm.numpy(), vectors.double().norm(dim=1).numpy(), rtol=1e-6)
    z = z_scores(p.top_logits[:, :1], p.mean, p.std)[:, 0].double()
    expected = (logits.max(1).values - logits.mean(1)) / logits.std(1, unbiased=False)
    np.testing.assert_allclose(z.numpy(), expected.numpy(), rtol=1e-4)


def test_k_larger_than_the_vocabulary_returns_every_token():
    head = torch.randn(10, 8)
    p = project_block(torch.randn(3, 8), Head.from_weight(head), k=50, chunk=4)
    assert p.top_ids.shape == (3, 10)
    assert sorted(p.top_ids[0].tolist()) == list(range(10))
    assert p.bottom_ids[0].tolist() == p.top_ids[0].flip(0).tolist()


def test_z_score_of_a_constant_vector_is_zero_not_nan():
    p = project_block(torch.zeros(2, 8), Head.from_weight(torch.randn(20, 8)), k=3)
    assert torch.equal(z_scores(p.top_logits, p.mean, p.std), torch.zeros(2, 3))


def test_centering_equals_centering_each_token_column_over_the_layer():
    g = torch.Generator().manual_seed(3)
    head, vectors, gain = torch.randn(200, 16, generator=g), torch.randn(40, 16, generator=g), torch.rand(16, generator=g)
    folded = fold_gain(vectors, gain, center=True)
    logits = (vectors * gain) @ head.T
    torch.testing.assert_close(folded @ head.T, logits - logits.mean(0, keepdim=True), rtol=1e-4, atol=1e-4)
