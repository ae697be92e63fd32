"""The projection math against a float64 brute force with an explicit tie rule (value desc, id asc)."""
from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from pipeline.atlas import certified, project
from pipeline.atlas.certified import FastHead
from pipeline.atlas.project import Head, Projection, fold_gain, project_block, project_blocks, z_scores


def reference(vectors: torch.Tensor, head: torch.Tensor, k: int):
    """The definition of the atlas order: exact logits (float64) rounded to the stored fp32, sorted with
    numpy's lexsort by value, then by lower id."""
    logits = (vectors.double() @ head.double().T).numpy()
    stored = logits.astype(np.float32)
    ids = np.arange(head.shape[0])
    top = np.stack([np.lexsort((ids, -row))[:k] for row in stored])
    bottom = np.stack([np.lexsort((ids, row))[:k] for row in stored])
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
    for logits in (p.top_logits[5], p.bottom_logits[5]):  # 0, as the float64 product gives it: not −0
        assert torch.equal(logits, torch.zeros(12)) and not logits.signbit().any()
    assert p.top_ids[9, :5].tolist() == [3, 7, 10, 2500, 2999]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_whose_floor_is_too_high_ride_along_the_next_blocks_scan(monkeypatch, dtype):
    """A neuron whose logits are far from normal leaves fewer than c above its floor; such rows are scanned
    again from −inf with the next block's rows (no pass of their own), the last block's alone, and every
    block comes out exact."""
    g = torch.Generator().manual_seed(9)
    head = torch.randn(3000, 48, generator=g)
    head[50:, :2] = 0  # along the first two coordinates only 50 of 3,000 rows are non-zero
    blocks = [torch.randn(40, 48, generator=g) for _ in range(3)]
    for vectors in blocks:
        vectors[::5, 2:] = 0  # every fifth neuron reads those coordinates only: 2,950 of its logits are 0
    fitted = Head.from_weight(head, dtype)
    scanned, candidates = [], certified.candidates
    monkeypatch.setattr(certified, "candidates", lambda v, fast, *a: (
        scanned.append(len(v)) if fast is fitted.fast else None) or candidates(v, fast, *a))
    for vectors, p in zip(blocks, project_blocks(iter(blocks), fitted, k=12), strict=True):
        logits, top, bottom = reference(vectors, head, 12)
        assert np.array_equal(p.top_ids.numpy(), top) and np.array_equal(p.bottom_ids.numpy(), bottom)
        np.testing.assert_array_equal(p.top_logits.numpy(), np.take_along_axis(logits, top, 1).astype(np.float32))
    assert scanned == [40, 48, 48, 8]  # 8 short rows a block: with the next block's 40, the last block's alone


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


@pytest.mark.parametrize("d", [1, 3, 7, 48, 130, 515])
def test_head_statistics_are_the_whole_products_and_the_same_on_any_threads(d):
    """The head's statistics are computed with every core: their bits must not depend on how many (a BLAS
    splits a small product's sums over its threads)."""
    x = torch.randn(3000, d, generator=torch.Generator().manual_seed(d)) + 0.5
    threads = torch.get_num_threads()
    try:
        heads = []
        for n in (1, 3):
            torch.set_num_threads(n)
            heads.append(project.Head.from_weight(x, chunk=700))  # five chunks: waves of 1 and of 3
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    g = project.gram(x)
    scale = x.double().abs().T @ x.double().abs()  # fp32 sums err relative to the sum of magnitudes
    assert bool(((g.double() - x.double().T @ x.double()).abs() <= 1e-5 * scale).all())
    assert torch.equal(g, g.T)
    centred = x.double() - x.double().mean(0)
    torch.testing.assert_close(heads[0].mean.double(), x.double().mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(heads[0].cov.double(), centred.T @ centred / len(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(heads[0].mean, heads[1].mean) and torch.equal(heads[0].cov, heads[1].cov)


@pytest.mark.parametrize("d", [1, 3, 7, 48, 130, 515])
def test_quadratic_form_from_the_upper_block_triangle_equals_the_whole_product(d):
    g = torch.Generator().manual_seed(d)
    x, m = torch.randn(40, d, generator=g), torch.randn(d, d, generator=g)
    sym = m + m.T
    expected = ((x.double() @ sym.double()) * x.double()).sum(1)
    scale = ((x.double().abs() @ sym.double().abs()) * x.double().abs()).sum(1)  # fp32 sums err relative to it
    assert bool(((project.quadratic_form(x, sym).double() - expected).abs() <= 1e-5 * scale).all())


def test_k_larger_than_the_vocabulary_returns_every_token():
    head = torch.randn(10, 8)
    p = project_block(torch.randn(3, 8), Head.from_weight(head), k=50, chunk=4)
    assert p.top_ids.shape == (3, 10)
    assert sorted(p.top_ids[0].tolist()) == list(range(10))
    assert p.bottom_ids[0].tolist() == p.top_ids[0].flip(0).tolist()


def test_one_product_split_into_blocks_equals_a_product_per_block(head_with_ties):
    """How an accelerator projects: several blocks in one product, kept (and written) as blocks."""
    vectors = torch.randn(150, 48, generator=torch.Generator().manual_seed(4))
    head = Head.from_weight(head_with_ties)
    blocks = project_block(vectors, head, k=7).split(64)
    assert [len(b.top_ids) for b in blocks] == [64, 64, 22]
    for start, block in zip(range(0, 150, 64), blocks):
        own = project_block(vectors[start:start + 64], head, k=7)
        for name in ("top_ids", "top_logits", "bottom_ids", "bottom_logits"):
            assert torch.equal(getattr(block, name), getattr(own, name)), name
        for name in ("mean", "std", "norm"):
            torch.testing.assert_close(getattr(block, name), getattr(own, name), rtol=1e-6, atol=1e-6)


def test_z_score_of_a_constant_vector_is_zero_not_nan():
    p = project_block(torch.zeros(2, 8), Head.from_weight(torch.randn(20, 8)), k=3)
    assert torch.equal(z_scores(p.top_logits, p.mean, p.std), torch.zeros(2, 3))


def test_centering_equals_centering_each_token_column_over_the_layer():
    g = torch.Generator().manual_seed(3)
    head, vectors, gain = torch.randn(200, 16, generator=g), torch.randn(40, 16, generator=g), torch.rand(16, generator=g)
    folded = fold_gain(vectors, gain, center=True)
    logits = (vectors * gain) @ head.T
    torch.testing.assert_close(folded @ head.T, logits - logits.mean(0, keepdim=True), rtol=1e-4, atol=1e-4)


def test_bf16_error_bound_holds_for_every_logit():
    """Each token's own bound, from its head row's sizes, holds and is tighter for short rows; the bound
    over the vocabulary holds for every token at or below a value, however far below (it is used at the
    last candidate's value for all the tokens outside the candidates)."""
    g = torch.Generator().manual_seed(3)
    head, vectors = torch.randn(5000, 96, generator=g), torch.randn(40, 96, generator=g) * 3
    head[:2500] *= 0.1  # short rows: as a real head's, whose norms spread (SmolLM2's: max 7.5, median 3.2)
    low = FastHead.from_weight(head, torch.bfloat16)
    approx = (vectors.to(torch.bfloat16) @ low.weight.T).float()
    exact = vectors.double() @ head.double().T
    error = (exact - approx.double()).abs()
    bound = certified.ErrorBound(vectors, low)
    each = bound.each(approx, torch.arange(5000).expand(40, -1))
    assert (each >= error).all() and (error.max(1).values > each.max(1).values / 20).all()
    assert (each[:, :2500].max(1).values < each[:, 2500:].min(1).values / 3).all()
    whole = bound.whole(approx.abs().max(1).values)
    assert (whole[:, None] >= error).all()
    for q in (0.999, 0.5, 0.01):  # a cut above the mean, at it and far below it
        cut = approx.quantile(q, dim=1).double()[:, None]
        below = approx.double() <= cut
        assert (exact[below] <= (cut + bound.whole(cut.abs()[:, 0])[:, None]).expand_as(exact)[below]).all()


def truncating_block_sums(x: np.ndarray, y: np.ndarray, block: int) -> np.ndarray:
    """Row-wise dot products of bf16 values as the least precise tensor cores modelled: each step adds
    `block` exact products to the fp32 accumulator, every term aligned to the largest with the bits below
    its 24 dropped, and the sum truncated to 24 bits (no extra bits, rounding toward zero)."""
    def truncate(values: np.ndarray, top: np.ndarray) -> np.ndarray:
        step = np.exp2(np.frexp(top)[1] - 24.0)[:, None]  # one unit in the 24th bit of `top`
        return np.trunc(values / step) * step  # exact in float64: every value is a 24-bit multiple of step or less

    products = x * y  # exact: 8-bit significands
    acc = np.zeros((len(x), 1))
    for s in range(0, x.shape[1], block):
        terms = np.concatenate([acc, products[:, s:s + block]], 1)
        aligned = truncate(terms, np.abs(terms).max(1)).sum(1)
        acc = truncate(aligned[:, None], np.abs(aligned))
    return acc[:, 0]


def test_the_accelerator_bound_covers_truncating_tensor_core_sums():
    """A GPU's bf16 products are summed in blocks with truncation, not rounded to nearest: the bound
    counts 5d roundings there against the CPU's d. Vectors whose every product after the first falls just
    short of the accumulator's last bit lose all of them, about 2d·2⁻²⁴ of the logit: more than the CPU's
    bound allows, within the accelerator's, at every block size; rounding to nearest loses almost none.
    Random vectors of every scale stay within it too."""
    g = torch.Generator().manual_seed(11)
    d = 256
    edge = torch.full((3, d), 2.0 ** -12), torch.full((2, d), (1 - 2 ** -8) * 2.0 ** -11)
    edge[0][:, 0] = edge[1][:, 0] = 1.0
    edge[1][1, 1::2] *= -1
    spread = torch.logspace(-3, 3, 20)[:, None]
    cases = {"edge": edge, "random": (torch.randn(20, d, generator=g).bfloat16().float() * spread,
                                       torch.randn(30, d, generator=g).bfloat16().float())}
    for name, (vectors, head) in cases.items():
        row, col = (ix.ravel().numpy() for ix in torch.meshgrid(torch.arange(len(vectors)), torch.arange(len(head)),
                                                                indexing="ij"))
        x, y = vectors.double().numpy()[row], head.double().numpy()[col]
        exact = (x * y).sum(1)
        fast = FastHead.from_weight(head, torch.float32)  # the accumulation alone: inputs exact, fp32 output
        bound = {dev: certified.ErrorBound(vectors, fast, torch.device(dev)).whole(torch.zeros(len(vectors))).numpy()[row]
                 for dev in ("cpu", "cuda")}
        for block in (1, 2, 4, 8, 16, 32):
            error = np.abs(truncating_block_sums(x, y, block) - exact)
            assert (error <= bound["cuda"]).all()
            if name == "edge":
                assert (error[col == 0] > bound["cpu"][col == 0]).all()
        nearest = np.zeros(len(x), dtype=np.float32)
        for i in range(d):
            nearest = (nearest + x[:, i] * y[:, i]).astype(np.float32)  # each product added, rounded to nearest
        assert (np.abs(nearest - exact) <= bound["cpu"]).all()


def accelerator_steps(monkeypatch) -> None:
    """What a GPU runs, on CPU tensors: `topk` per chunk (no floors) and float64 re-scoring of gathered rows."""
    topk = certified.topk_candidates
    monkeypatch.setattr(certified, "scan_candidates", lambda v, fast, c, chunk, floors=None: topk(v, fast, c, chunk))
    monkeypatch.setattr(certified, "rescore", certified.bmm_rescore)


@pytest.mark.parametrize("accelerator", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neurons_beyond_fp32_squares_are_exact(head_with_ties, dtype, accelerator, monkeypatch):
    """Weights near 1e-30 have fp32 squares of 0 and near 1e20 infinite ones, and bf16 products flush below
    1e-38: such rows' norms are summed in float64, the bound allows for what flushing loses, and their
    statistics come from float64."""
    if accelerator:
        accelerator_steps(monkeypatch)
    g = torch.Generator().manual_seed(12)
    scales = torch.tensor([1.0, 1e-20, 1e-30, 1e-38, 1e-41, 1e20, 1e30]).repeat_interleave(3)
    vectors = torch.randn(len(scales), 48, generator=g) * scales[:, None]
    p = project_block(vectors, Head.from_weight(head_with_ties, dtype), k=12)
    logits, top, bottom = reference(vectors, head_with_ties, 12)
    assert np.array_equal(p.top_ids.numpy(), top) and np.array_equal(p.bottom_ids.numpy(), bottom)
    stored = logits.astype(np.float32)
    np.testing.assert_array_equal(p.top_logits.numpy(), np.take_along_axis(stored, top, 1))
    np.testing.assert_array_equal(p.bottom_logits.numpy(), np.take_along_axis(stored, bottom, 1))
    std = logits.std(1)
    np.testing.assert_allclose(p.std.double().numpy(), std, rtol=1e-4)
    assert (np.abs(p.mean.double().numpy() - logits.mean(1)) <= 1e-4 * std).all()
    np.testing.assert_allclose(p.norm.double().numpy(), vectors.double().norm(dim=1).numpy(), rtol=1e-6,
                               atol=2.0 ** -149)  # 1e-41 is below fp32's normal range: its norm has fewer bits


def crowded(head_with_ties: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A head with ten rows closer than bf16 can tell apart, and 64 vectors among which a dead neuron, one
    aligned with the duplicated rows and one whose top tokens are the ten near-tied rows."""
    head = head_with_ties.clone()
    g = torch.Generator().manual_seed(2)
    head[100:110] = head[50] + 1e-4 * torch.randn(10, 48, generator=g)
    vectors = torch.randn(64, 48, generator=g)
    vectors[5] = 0
    vectors[9] = head_with_ties[3]
    vectors[20] = head[50] * 2
    return head, vectors


def assert_exact(p: Projection, vectors: torch.Tensor, head: torch.Tensor, k: int = 12) -> None:
    """`p` (on the CPU) is the reference's top-k and bottom-k: the same ids in the same order, logits and
    std within fp32 rounding."""
    logits, top, bottom = reference(vectors, head, k)
    assert np.array_equal(p.top_ids.numpy(), top) and np.array_equal(p.bottom_ids.numpy(), bottom)
    np.testing.assert_allclose(p.top_logits.numpy(), np.take_along_axis(logits, top, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.bottom_logits.numpy(), np.take_along_axis(logits, bottom, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.std.double().numpy(), logits.std(1), rtol=1e-4, atol=1e-6)


def joined(parts: list[Projection]) -> Projection:
    return Projection(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Projection)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("candidates", [2, 13, 64, 128])
def test_fp32_and_bf16_paths_give_the_exact_atlas(head_with_ties, candidates, dtype):
    """Candidates + exact re-score equal the float64 reference, near-ties and fallbacks included."""
    head, vectors = crowded(head_with_ties)
    p = project_block(vectors, Head.from_weight(head, dtype), k=12, chunk=1000, candidates=candidates)
    assert_exact(p, vectors, head)
    assert set(p.top_ids[20, :11].tolist()) == {50, *range(100, 110)}


@pytest.mark.parametrize("candidates", [2, 13, 64])
def test_the_accelerators_candidates_and_rescoring_give_the_exact_atlas_through_a_stream(head_with_ties, candidates,
                                                                                      monkeypatch):
    """What a GPU runs (`topk` per chunk, float64 re-scoring of gathered rows; no floors, so no short rows)
    through blocks of a stream, its retries included, here on CPU tensors."""
    accelerator_steps(monkeypatch)
    head, vectors = crowded(head_with_ties)
    parts = project_blocks(vectors.split(24), Head.from_weight(head, torch.bfloat16), k=12, chunk=1000,
                           candidates=candidates)
    assert_exact(joined(list(parts)), vectors, head)


def test_most_neurons_are_proven_with_the_default_candidates_and_every_proven_row_is_exact(head_with_ties):
    """The fast path is the common path: from k + 44 bf16 candidates nearly every row is proven; a proof
    is never wrong, with k + 1 candidates (few proven) as with more."""
    g = torch.Generator().manual_seed(4)
    vectors = torch.randn(256, 48, generator=g)
    low = FastHead.from_weight(head_with_ties, torch.bfloat16)
    _, top, bottom = reference(vectors, head_with_ties, 20)
    proven = {}
    for c in (21, 64):
        tv, ti, bv, bi = certified.candidates(vectors, low, c, 1000)
        bound = certified.ErrorBound(vectors, low)
        sides = (certified.settle(vectors, head_with_ties, tv, ti, 20, bound),
                 certified.settle(vectors, head_with_ties, bv, bi, 20, bound, sign=-1))
        for side, expected in zip(sides, (top, bottom)):
            rows = side.proven.numpy()
            assert np.array_equal(side.ids.numpy()[rows], expected[rows])
        proven[c] = (sides[0].proven & sides[1].proven).float().mean()
    assert proven[64] > 0.95 and proven[21] < 0.5


def test_settling_re_scores_only_the_candidates_their_own_bound_lets_reach(head_with_ties, monkeypatch):
    """Over a head whose row norms spread, a candidate on a short row is re-scored only if its own, smaller
    bound reaches the first k's least exact value: fewer than the bound over the vocabulary would pass,
    the same exact top-k."""
    head = head_with_ties.clone()
    head[::2] *= 0.25
    vectors = torch.randn(128, 48, generator=torch.Generator().manual_seed(5))
    low = FastHead.from_weight(head, torch.bfloat16)
    tv, ti, _, _ = certified.candidates(vectors, low, 64, 1000)
    scored, rescore = [], certified.rescore
    monkeypatch.setattr(certified, "rescore", lambda v, w, ids: scored.append(int((ids >= 0).sum())) or rescore(v, w, ids))
    bound = certified.ErrorBound(vectors, low)
    top = certified.settle(vectors, head, tv, ti, 20, bound)
    least = rescore(vectors, head, ti[:, :20]).double().min(1, keepdim=True).values
    whole = (tv.double() + bound.whole(tv.abs().max(1).values)[:, None] >= least).sum()
    extra = sum(scored) - 20 * 128  # beyond the first k, which are always scored
    assert 0 < extra < 0.8 * (int(whole) - 20 * 128)
    _, expected, _ = reference(vectors, head, 20)
    assert top.proven.float().mean() > 0.9 and np.array_equal(top.ids.numpy()[top.proven], expected[top.proven])


def test_a_head_bf16_holds_exactly_is_kept_once_in_bf16_and_any_other_in_fp32(head_with_ties):
    """A bf16 checkpoint's head needs no fp32 copy: re-scoring reads the bf16 rows, and the atlas is the same."""
    exact16 = head_with_ties.bfloat16().float()
    late = exact16.clone()
    late[2500, 3] += 2 ** -12  # one row bf16 cannot hold, in the fourth chunk read
    vectors = torch.randn(40, 48, generator=torch.Generator().manual_seed(8))
    for weight, kept in ((exact16, torch.bfloat16), (late, torch.float32)):
        head = Head.from_rows(lambda rows: weight[rows], len(weight), torch.bfloat16, chunk=700)
        assert head.weight.dtype == kept and torch.equal(head.weight.float(), weight)
        assert (head.weight.data_ptr() == head.fast.weight.data_ptr()) == (kept == torch.bfloat16)
        reference_head = Head.from_weight(weight)
        torch.testing.assert_close(head.mean, reference_head.mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(head.cov, reference_head.cov, rtol=1e-5, atol=1e-7)
        p = project_block(vectors, head, k=12)
        logits, top, bottom = reference(vectors, weight, 12)
        assert np.array_equal(p.top_ids.numpy(), top) and np.array_equal(p.bottom_ids.numpy(), bottom)
        np.testing.assert_allclose(p.top_logits.numpy(), np.take_along_axis(logits, top, 1), rtol=1e-6, atol=1e-6)


def test_sort_by_value_then_id_matches_lexsort_with_ties_signed_zeros_and_infinities():
    g = torch.Generator().manual_seed(6)
    values = torch.randn(30, 50, generator=g).round(decimals=1)  # many ties
    values[0, :10], values[0, 10:20] = 0.0, -0.0  # equal values: ordered by id alone
    values[1, ::7], values[2, 3::5] = -torch.inf, torch.inf
    values[3] = torch.tensor(-3e38).nextafter(torch.tensor(0.0))  # extremes of the fp32 range
    ids = torch.stack([torch.randperm(60_000, generator=g)[:50] for _ in range(30)]) + 2 ** 31 - 60_000
    for k in (None, 7, 50):
        got_values, got_ids = certified.sort_by_value_then_id(values, ids, k)
        order = np.stack([np.lexsort((i, -v)) for v, i in zip(values.numpy(), ids.numpy())])[:, :k]
        assert np.array_equal(got_ids.numpy(), np.take_along_axis(ids.numpy(), order, 1))
        assert np.array_equal(got_values.numpy(), np.take_along_axis(values.numpy(), order, 1))


@pytest.mark.parametrize("bf16_checkpoint", [False, True])
def test_rows_left_unproven_are_settled_in_bf16_then_fp32_with_wider_candidates_then_in_float64(
        head_with_ties, monkeypatch, bf16_checkpoint):
    """Only rows that need it pay, each in the cheapest pass that proves it. A cut inside a crowd of 41
    head rows closer than bf16 resolves is settled by bf16 with four times the candidates (the crowd fits);
    a crowd of 201 by fp32 over the exact head (fp32, or a bf16 checkpoint's head kept in bf16); a cut
    inside 131 identical head rows (exact ties, more than any pass's candidates) from float64 logits; a
    dead neuron (every logit exactly 0) from its first k ids, without a pass."""
    head = head_with_ties.clone()
    g = torch.Generator().manual_seed(7)
    crowds = {60: range(1000, 1040), 80: range(1100, 1300)}
    if bf16_checkpoint:  # rows a few bf16 ulps apart in one coordinate: ties in bf16 logits, not in exact ones
        head = head.bfloat16().float()
        for centre, rows in crowds.items():
            for i, row in enumerate(rows):
                value = head[centre, i % 48].bfloat16()
                for _ in range(i // 48 + 1):
                    value = value.nextafter(torch.tensor(9.0, dtype=torch.bfloat16))
                head[row] = head[centre]
                head[row, i % 48] = value.float()
    else:
        for centre, rows in crowds.items():  # far closer than bf16 resolves, far wider than fp32's bound
            head[rows] = head[centre] + 1e-3 * torch.randn(len(rows), 48, generator=g)
    head[1300:1430] = head[90]
    vectors = torch.randn(50, 48, generator=g)
    vectors[3] = head[60] * 3  # its top 12 lie among the 41 near-ties
    vectors[4] = 0
    vectors[5] = head[80] * 3  # its top 12 lie among the 201
    vectors[6] = head[90] * 3  # its top 131 tie exactly
    seen = {}
    candidates, float64 = certified.candidates, project._float64_topk

    def spy_candidates(v, fast, c, *rest):
        if c > 32:  # the first pass is at 32, and so is a scan of the rows its floors left short
            rows = [i for i in range(len(vectors)) if (v == vectors[i]).all(1).any()]
            seen.setdefault("projected again", []).append((c, fast.dtype, rows))
        return candidates(v, fast, c, *rest)

    monkeypatch.setattr(certified, "candidates", spy_candidates)
    monkeypatch.setattr(project, "_float64_topk", lambda v, *a: seen.setdefault("float64", []).append(len(v)) or float64(v, *a))
    fitted = Head.from_weight(head, torch.bfloat16)
    assert (fitted.weight.dtype == torch.bfloat16) == bf16_checkpoint
    p = project_block(vectors, fitted, k=12, chunk=1000, candidates=32)
    logits, top, bottom = reference(vectors, head, 12)
    assert np.array_equal(p.top_ids.numpy(), top) and np.array_equal(p.bottom_ids.numpy(), bottom)
    np.testing.assert_array_equal(p.top_logits.numpy(), np.take_along_axis(logits, top, 1).astype(np.float32))
    (c16, dtype16, rows16), (c32, dtype32, rows32) = seen["projected again"]
    assert (c16, dtype16, c32, dtype32) == (128, torch.bfloat16, 128, torch.float32)
    assert {3, 5, 6} <= set(rows16) and 4 not in rows16 and rows32 == [5, 6] and seen["float64"] == [1]


def test_logits_within_fp32_rounding_are_ordered_by_their_true_values():
    """Rows one ulp apart: a plain fp32 product orders them by its rounding errors, the atlas by the true
    logits as stored (equal after rounding → lower id first)."""
    g = torch.Generator().manual_seed(5)
    head = torch.randn(2000, 64, generator=g)
    for i in range(100, 140, 2):
        head[i + 1] = head[i]
        head[i + 1, 7] = torch.nextafter(head[i, 7], torch.tensor(10.0))  # one ulp apart in one coordinate
    vectors = head[100:140:2] * 1.5
    p = project_block(vectors, Head.from_weight(head), k=4)
    _, top, _ = reference(vectors, head, 4)
    assert np.array_equal(p.top_ids.numpy(), top)
