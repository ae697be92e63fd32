"""CPU loops that torch cannot run at the speed of the product: a running top/bottom scan and exact rescoring.

Both are compiled by numba, release the GIL (a build runs one lane per core, each in its own thread)
and work in place on numpy views of torch tensors.

`scan_chunk` keeps, per row, the c largest and c smallest values seen so far, sorted. It reads a chunk
of logits 32 values at a time: the block's maximum and minimum are compared with the row's current
c-th values, and only a block that beats one is walked value by value. After the first chunks few
blocks do (a new value enters the top c of t values seen with chance c/t): on SmolLM2's logits about
1 ns per logit on one core, where `torch.topk` on both sides costs several. (numba leaves the
block's max/min scalar here; a vectorised one would be faster still.)

`rescore` sums each neuron's dot product with its candidate rows in float64, in one fixed order (eight
interleaved partial sums, then combined pairwise): the products of two fp32 values are exact in float64, so
the result depends on nothing but the inputs, whatever the machine.
"""
from __future__ import annotations

import numba
import numpy as np

BLOCK = 32
LANES = 8  # partial sums per row in `rescore`
ROWS = 8  # head rows `rescore` sums side by side
_FAST = {"nnan", "nsz", "reassoc"}  # max/min reductions only; no value is NaN, infinities stay exact


@numba.njit(nogil=True, cache=True, fastmath=_FAST, inline="always")
def _walk(row, start, stop, offset, values, ids, bound, descending):
    """Insert each value of `row[start:stop]` that beats `bound` into the sorted candidates; the new bound."""
    last = values.shape[0] - 1
    for j in range(start, stop):
        x = row[j]
        if (x > bound) if descending else (x < bound):
            p = last
            while p > 0 and ((values[p - 1] < x) if descending else (values[p - 1] > x)):
                values[p] = values[p - 1]
                ids[p] = ids[p - 1]
                p -= 1
            values[p] = x
            ids[p] = offset + j
            bound = values[last]
    return bound


@numba.njit(nogil=True, cache=True, fastmath=_FAST)
def scan_chunk(logits, offset, top_values, top_ids, bottom_values, bottom_ids):
    """Fold a `[n, m]` chunk of logits (token ids `offset…offset+m−1`) into the running top and bottom."""
    n, m = logits.shape
    c = top_values.shape[1]
    full = m - m % BLOCK
    for r in range(n):
        row = logits[r]
        tv, ti, bv, bi = top_values[r], top_ids[r], bottom_values[r], bottom_ids[r]
        high, low = tv[c - 1], bv[c - 1]
        for start in range(0, full, BLOCK):
            hi = row[start]
            lo = row[start]
            for j in range(start + 1, start + BLOCK):
                x = row[j]
                hi = x if x > hi else hi
                lo = x if x < lo else lo
            if hi > high:
                high = _walk(row, start, start + BLOCK, offset, tv, ti, high, True)
            if lo < low:
                low = _walk(row, start, start + BLOCK, offset, bv, bi, low, False)
        high = _walk(row, full, m, offset, tv, ti, high, True)  # the ragged tail, value by value
        _walk(row, full, m, offset, bv, bi, low, False)


@numba.njit(nogil=True, cache=True)
def rescore(vectors, weight, ids, out):
    """`out[r, j]` = vectors[r] · weight[ids[r, j]], summed in float64 in a fixed order, stored in fp32.

    ROWS head rows are summed side by side, so their cache misses overlap (a row at a time waits on
    memory for each); each row's own sum keeps LANES partial sums over t, combined pairwise.
    """
    n, m = ids.shape
    d = vectors.shape[1]
    body = d - d % LANES
    v = np.empty(d, np.float64)
    acc = np.empty((ROWS, LANES), np.float64)
    rows = np.empty(ROWS, np.int64)
    for r in range(n):
        for t in range(d):
            v[t] = vectors[r, t]
        for first in range(0, m, ROWS):
            k = min(ROWS, m - first)
            for p in range(k):
                rows[p] = ids[r, first + p]
            acc[:] = 0.0
            for t in range(0, body, LANES):
                for p in range(k):
                    h = weight[rows[p]]
                    for q in range(LANES):  # independent partial sums: no sum is reordered
                        acc[p, q] += v[t + q] * np.float64(h[t + q])
            for p in range(k):
                h = weight[rows[p]]
                for t in range(body, d):
                    acc[p, 0] += v[t] * np.float64(h[t])
                a = acc[p]
                out[r, first + p] = np.float32(((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])))
