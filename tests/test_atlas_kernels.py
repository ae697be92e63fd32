"""The CPU kernels (scan, exact rescoring) against torch's topk and float64 products, ties and ragged chunks included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.atlas import certified, kernels
from pipeline.atlas.certified import FastHead


def running_scan(logits: np.ndarray, c: int, chunk: int) -> tuple[np.ndarray, ...]:
    """The c largest and c smallest values of each row with their ids, by the scan a chunk at a time
    (uint16 logits are bf16 bit patterns)."""
    n, width = logits.shape[0], -(-c // kernels.BLOCK) * kernels.BLOCK
    state = (np.full((n, width), -np.inf, np.float32), np.full((n, width), -1),
             np.full((n, width), -np.inf, np.float32), np.full((n, width), -1))
    for s in range(0, logits.shape[1], chunk):  # the scan reads a chunk token by token: [tokens, rows]
        kernels.scan_chunk(np.ascontiguousarray(logits[:, s:s + chunk].T), s, *state)
    kernels.sort_rows(*state[:2])
    kernels.sort_rows(*state[2:])
    return state[0][:, :c], state[1][:, :c], -state[2][:, :c], state[3][:, :c]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [25, 32, 64])
@pytest.mark.parametrize("chunk", [1, 31, 32, 100, 5000])
def test_scan_keeps_the_c_largest_and_smallest_values_lower_ids_first_on_ties(chunk, c, dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 3001, generator=g)
    logits[:, 2000:2500] = logits[:, 100:600]  # repeated values: ties everywhere
    logits[3] = 0.5  # a constant row
    logits[7, ::97] = 9.0  # the top spread over many blocks, tied
    logits[9, -40:] = -9.0  # the bottom in the ragged tail
    logits[11, :40], logits[11, 100:110] = 5.0, 6.0  # later, larger values push out the highest tied ids
    # bounds of either sign (bf16 values are compared as order-preserving int16 keys, whose sign flips)
    logits[13], logits[15] = logits[13].abs() + 0.1, -logits[15].abs() - 0.1  # all positive; all negative
    logits[17] = 0.0  # signed zeros, which compare equal, at the cut, among tiny values of both signs
    logits[17, 1::3], logits[17, ::50], logits[17, 7::50] = -0.0, 2 ** -100, -(2 ** -100)
    logits[19, 5::400], logits[19, 9::400] = torch.inf, -torch.inf
    logits = logits.to(dtype)  # bf16: many more ties, read by the scan as they are
    bits = logits.view(torch.uint16).numpy() if dtype == torch.bfloat16 else logits.numpy()
    tv, ti, bv, bi = running_scan(bits, c, chunk)
    x = logits.float().numpy()
    ids = np.arange(x.shape[1])
    for values, kept, sign in ((tv, ti, 1), (bv, bi, -1)):  # reference: sort by (value, then lower id)
        order = np.stack([np.lexsort((ids, -sign * row))[:c] for row in x])
        assert np.array_equal(kept, order)
        assert np.array_equal(values, np.take_along_axis(x, order, 1))


@pytest.mark.parametrize(("sets_hold", "n", "rows"), [(None, 30, 30), (7, 34, 7), (100, 70, 64)])
def test_scan_and_topk_candidates_agree_in_fp32_and_bf16(sets_hold, n, rows, monkeypatch):
    g = torch.Generator().manual_seed(1)
    head, vectors = torch.randn(2500, 64, generator=g), torch.randn(n, 64, generator=g)
    head[1000:1010] = head[5]  # duplicated rows tie exactly
    # the sets of at most `sets_hold` neurons fit: products of 7 (the last of 6), or of 64 and 6; a ragged
    # product of 1 or 2 fp32 rows may sum in another order with its operands swapped, as topk has them
    if sets_hold:
        monkeypatch.setattr(certified, "SETS_BYTES", sets_hold * 2 * 64 * 12)
    assert certified.scan_rows(64, len(vectors)) == rows
    for dtype in (torch.float32, torch.bfloat16):
        fast = FastHead.from_weight(head, dtype)
        v = vectors.to(dtype)
        scan = certified.scan_candidates(v, fast, 40, 300)
        # the same products (an fp32 product's sums depend on its number of rows), by topk
        topk = [torch.cat(side) for side in zip(*(certified.topk_candidates(v[b:b + rows], fast, 40, 300)
                                                  for b in range(0, len(v), rows)))]
        assert torch.equal(scan[0], topk[0]) and torch.equal(scan[2], topk[2])  # values; tied ids may differ
        for values, ids in ((scan[0], scan[1]), (-scan[2], scan[3])):
            exact = (v.float() @ fast.weight.float().T).gather(1, ids)
            # bf16 rounds each product's output once; fp32 sums depend on the product's shape, by a few ulps
            rtol = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -20
            torch.testing.assert_close(exact, values, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize(("dtype", "c"), [(torch.float32, 28), (torch.bfloat16, 64)])
def test_floors_change_no_candidate_of_rows_c_values_pass_and_flag_the_rest(dtype, c):
    g = torch.Generator().manual_seed(3)
    head, vectors = torch.randn(5000, 48, generator=g), torch.randn(30, 48, generator=g)
    head[4000:4070] = head[17]  # 71 equal rows: a floor can sit on a tie
    vectors[0] = 0  # a dead row: every value equals its floor
    vectors[1] = head[17]
    fast = FastHead.from_weight(head, dtype)
    logits = (vectors.to(dtype) @ fast.weight.T).float()  # what the scan sees
    top, bottom = logits.sort(1, descending=True).values, (-logits).sort(1, descending=True).values
    # floors at the c-th value, just below or above it, deep inside the row, above every value, or none
    picks = [c - 1, c, c - 2, 3 * c, 0, -1] * 5
    floors = certified.Floors(*(torch.stack([
        torch.tensor(-torch.inf) if pick < 0 else side[r, pick] + (1e30 if pick == 0 else 0)
        for r, pick in enumerate(picks[j:] + picks[:j])]) for j, side in ((0, top), (1, bottom))))
    passing = [(logits > floors.top[:, None]).sum(1), (-logits > floors.bottom[:, None]).sum(1)]
    assert all(bool((n < c).any() and (n >= c).any()) for n in passing)  # both ways out of the scan are taken
    plain = certified.scan_candidates(vectors.to(dtype), fast, c, 700)
    floored = certified.scan_candidates(vectors.to(dtype), fast, c, 700, floors)
    short = (passing[0] < c) | (passing[1] < c)
    assert torch.equal(certified.short_rows(floored), short.nonzero().squeeze(1))  # left to be scanned again
    assert all(torch.equal(a[~short], b[~short]) for a, b in zip(plain, floored))


def test_rescore_is_the_float64_dot_product_rounded_once():
    g = torch.Generator().manual_seed(2)
    head, vectors = torch.randn(3000, 130, generator=g), torch.randn(50, 130, generator=g) * 4
    head[7] = head[11]
    ids = torch.randint(0, 3000, (50, 33), generator=g)
    ids[:, 0], ids[:, 1] = 7, 11
    ours = certified.rescore(vectors, head, ids)
    exact = (vectors.double()[:, None, :] * head.double()[ids]).sum(-1)
    torch.testing.assert_close(ours, exact.float(), rtol=0, atol=0)
    assert torch.equal(ours[:, 0], ours[:, 1])  # identical rows, identical values
    for budget in (certified.RESCORE_BYTES, 1):  # all rows in one product; a row at a time
        torch.testing.assert_close(certified.bmm_rescore(vectors, head, ids, budget), ours, rtol=0, atol=0)
    holes = ids.clone()
    holes[:, 5::3] = -1  # placeholders: nothing to score there, the rest unchanged
    partial = certified.rescore(vectors, head, holes)
    assert torch.equal(partial[holes >= 0], ours[holes >= 0]) and bool((partial[holes < 0] == 0).all())
    # as `settle`'s second pass has them: among each row's first few columns, from none to all, some skipped
    holes[torch.arange(33) >= torch.arange(50)[:, None] % 37] = -1
    for budget in (certified.RESCORE_BYTES, 1, 8 * 130 * 40):  # one batch, a row at a time, rows of 40 values
        assert torch.equal(certified.bmm_rescore(vectors, head, holes, budget), certified.rescore(vectors, head, holes))
    with pytest.raises(ValueError, match="beyond the head"):
        certified.rescore(vectors, head, ids + 3000)
