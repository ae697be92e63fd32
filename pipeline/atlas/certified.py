"""Exact top-k at the speed of the fastest product: a candidate pass, a proven error bound, a re-score.

The product over the whole vocabulary runs in the compute dtype (fp32, or bf16 where it is faster) and
only *proposes* candidates; a near-tie can come out in the wrong order in either. For neuron `w` and
head row `h`, with copies in the compute dtype `ŵ = w − δw`, `ĥ = h − δh` (δ = 0 in fp32), the
product accumulated in fp32 and rounded once to the output dtype (unit roundoff u: 2⁻⁸ for bf16, 0
for fp32, whose rounding the accumulation term covers), each approximate logit `a` obeys

    |w·h − a| ≤ ‖ŵ‖‖δh‖ + ‖δw‖(‖ĥ‖ + ‖δh‖) + γ_d ‖ŵ‖‖ĥ‖ + u|w·h|,      γ_d = d·2⁻²⁴ / (1 − d·2⁻²⁴)

(Cauchy–Schwarz on the rounding terms; Higham's bound for an fp32 dot product of length d, on an
accelerator's truncating block sums 5d in place of d: `accumulation_roundings`; plus what flushing
values below fp32's normal range to zero may lose: `ErrorBound`). With
the token's own ‖ĥ‖, ‖δh‖ and a it gives a bound ε_t per neuron and token; with the maxima over the
vocabulary, one ε per neuron, for every token at or below a given a (a + ε grows with a). Keep the
c > k best approximate tokens and re-score the k leading ones with float64 sums: the smallest of
their exact logits, L₀, is at most the exact k-th logit of the row. A token can be in the exact top-k
only if its exact logit reaches L₀, so only candidates with a_t + ε_t ≥ L₀ need exact values
(`settle`); among those re-scored, the k-th largest exact logit L is again at most the row's exact
k-th. Any token t outside the candidates has a_t ≤ a_c, so if a_c + ε < L its exact logit is below L
and it is not in the top-k: the row is proven, its top-k being the re-scored candidates' ordered by
(value desc, id asc). Using the exact L
instead of a_k − ε halves the margin the candidates must clear, so a third as many suffice. Rows
where the margin does not hold (a crowd of near-equal logits at the cut) are projected again with four
times the candidates, in the compute dtype (the crowd often fits) and then, for those still open, in
fp32 over the exact head, whose bound is the accumulation's alone; rows that still fail (exact ties at
the cut) are settled from float64 logits of the whole vocabulary. A dead neuron (a zero vector: every
logit exactly 0) takes the first k ids, without a pass.
Either way the atlas is the same on every device and dtype: the order of the true logits, stored in
fp32 (as float64 sums rounded once, which another summation order could round differently only within
float64's error of an fp32 rounding boundary).
"""
from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
import torch

from pipeline.atlas import kernels

U_BF16 = 2.0 ** -8
U_FP32 = 2.0 ** -24
MIN_NORMAL = 2.0 ** -126  # fp32's and bf16's: below it hardware may flush inputs, sums and outputs to zero
TINY_NORM = 2.0 ** -40  # rows whose fp32 norm is below this (fp32 squares may underflow)…
HUGE_NORM = 2.0 ** 60  # …or above it (they may overflow) are summed again in float64 (`row_norms`)
ACCELERATOR_ROUNDINGS = 5  # per product term, in units of 2⁻²⁴ of Σ|ŵᵢĥᵢ| (`accumulation_roundings`)
RESCORE_BYTES = 1 << 28  # float64 head rows gathered at a time by `bmm_rescore`
SETS_BYTES = 384 << 10  # the scan's running sets of one product's neurons: within a core's L2, with room
SCAN_ALIGN = kernels.BF16_STEP  # neurons per product a multiple of the scan's widest step (no ragged tail);
#                                 AMX also ran products of 229 neurons 1.4× slower than of 256
FLOOR_TAIL = 1 / 400  # a scan starts where a normal row has this share of the vocabulary above (z ≈ 2.8)…
FLOOR_ABOVE = 2  # …or 2·c values, if more


class Floors(NamedTuple):
    """Per row `[n]`, the first bound of each side's scan: top values, and bottom values negated."""

    top: torch.Tensor
    bottom: torch.Tensor


@dataclass(frozen=True)
class FastHead:
    """The head in the compute dtype and the per-row sizes the error bound needs, prepared once per model."""

    weight: torch.Tensor  # [V, d] in the compute dtype (the fp32 head itself when that is fp32)
    norms: torch.Tensor  # [V] float64 ‖ĥ‖ of each row, raised to cover its own rounding (`_row_norms`)
    errors: torch.Tensor  # [V] float64 ‖h − ĥ‖ of each row, likewise
    roundoff: float  # unit roundoff of the product's output dtype beyond fp32 accumulation
    dtype: torch.dtype  # the product's: `weight`'s, or fp32 over an exact bf16 head (`in_fp32`)

    @cached_property
    def row_norm(self) -> float:
        """max ‖ĥ‖ over the vocabulary."""
        return float(self.norms.max())

    @cached_property
    def row_error(self) -> float:
        """max ‖h − ĥ‖ over the vocabulary."""
        return float(self.errors.max())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype = torch.float32, chunk: int = 8192) -> FastHead:
        return cls.from_rows(lambda rows: weight[rows], len(weight), dtype, chunk)[0]

    @classmethod
    def from_rows(cls, read: Callable[[slice], torch.Tensor], vocab: int, dtype: torch.dtype = torch.float32,
                  chunk: int = 8192) -> tuple[FastHead, torch.Tensor]:
        """The fast head from the fp32 head read `chunk` rows at a time, and the exact head: the fast copy
        itself where it holds every row exactly (a bf16 checkpoint's head), else an fp32 copy. Either way
        no full-size temporary: a head of GBs is held once, or once in each dtype. A row that is not finite
        makes `row_norm` not finite."""
        low = exact = None
        norms, errors = [], []
        for s in range(0, vocab, chunk):
            rows = read(slice(s, min(s + chunk, vocab))).float()
            if low is None:
                low = torch.empty(vocab, rows.shape[1], dtype=dtype, device=rows.device)
            lo = low[s:s + len(rows)]
            lo.copy_(rows)
            wide = lo.float()
            norms.append(_row_norms(wide))
            errors.append(_row_norms(rows - wide) if dtype != torch.float32  # exact in fp32: ĥ is h rounded
                          else torch.zeros(len(rows), dtype=torch.float64, device=rows.device))
            if exact is None and bool(errors[-1].any()):  # the first row the fast copy rounds: keep fp32 from here on
                exact = torch.empty(low.shape, device=low.device)
                exact[:s] = low[:s]
            if exact is not None:
                exact[s:s + len(rows)] = rows
        fast = cls(low, torch.cat(norms), torch.cat(errors), U_BF16 if dtype == torch.bfloat16 else 0.0, dtype)
        return fast, low if exact is None else exact

    def in_fp32(self, exact: torch.Tensor) -> FastHead:
        """The exact head as a fast head multiplied in fp32: no rounded inputs, so its bound is the fp32
        accumulation's alone, for rows whose candidates the fast dtype could not settle."""
        # ‖h‖ ≤ ‖ĥ‖ + ‖δh‖ row by row
        return FastHead(exact, self.norms + self.errors, torch.zeros_like(self.errors), 0.0, torch.float32)


class ErrorBound:
    """The bound on |exact − approximate| logit of a block of neurons for a product run on `device` (default:
    the vectors'): over the whole vocabulary, from the head's largest row sizes, or for given candidates,
    from their own rows' sizes and approximate values. Per neuron it is linear in the head row's ‖ĥ‖ and
    ‖δh‖ and in |a|, so it keeps those three coefficients and a constant."""

    def __init__(self, vectors: torch.Tensor, fast: FastHead, device: torch.device | None = None) -> None:
        d = vectors.shape[1]
        v_low = vectors.to(fast.dtype).float()
        v_norm, v_err = _row_norms(v_low), _row_norms(vectors - v_low)  # [n] float64
        sums = accumulation_roundings(d, device or vectors.device)
        gamma, u = sums * U_FP32 / (1 - sums * U_FP32), fast.roundoff
        # pre = ‖ŵ‖‖δh‖ + ‖δw‖(‖ĥ‖ + ‖δh‖) + γ‖ŵ‖‖ĥ‖ + what flushing to zero may lose: inputs below the
        # normal range (< MIN_NORMAL·Σ|other factor| ≤ MIN_NORMAL·√d·‖other‖), products and sums
        # (< MIN_NORMAL each), the output; then the output's rounding, u·|exact| ≤ u·(|a| + pre), and
        # /(1−u) for the rest: bound = pre·(1+u)/(1−u) + |a|·u/(1−u)
        scale = (1 + u) / (1 - u)
        self.per_norm = scale * (gamma * v_norm + v_err + MIN_NORMAL * d ** 0.5)
        self.per_error = scale * (v_norm + v_err)
        self.fixed = scale * MIN_NORMAL * (d ** 0.5 * v_norm + d + sums + 1)
        self.per_logit = u / (1 - u)
        self.fast = fast

    def whole(self, abs_logit: torch.Tensor) -> torch.Tensor:
        """`[n]` float64: for every token whose |approximate logit| is at most each neuron's `abs_logit`."""
        f = self.fast
        return (self.per_norm * f.row_norm + self.per_error * f.row_error + self.fixed
                + self.per_logit * abs_logit.double())

    def each(self, approx: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`[n, m]` float64: for each neuron's candidates `ids`, of approximate values `approx`. Tighter than
        `whole` by the spread of the head's row norms (SmolLM2's: max 7.5, median 3.2): a quarter fewer
        SmolLM2 candidates re-scored."""
        f = self.fast
        bound = f.norms[ids].mul_(self.per_norm[:, None]).addcmul_(f.errors[ids], self.per_error[:, None])
        return bound.add_(self.fixed[:, None]).add_(approx.abs().double(), alpha=self.per_logit)


def accumulation_roundings(d: int, device: torch.device) -> int:
    """n such that an fp32 accumulation of d products on `device` is off by less than n·2⁻²⁴·Σ|ŵᵢĥᵢ|.

    A CPU BLAS adds in fp32 rounded to nearest (FMA; AVX-512 BF16 and AMX dot products), so Higham's d.
    GPU tensor cores add a block of b products to the accumulator in one step, aligned to the largest
    term with the bits shifted out dropped and the sum truncated (Fasi et al. 2021 on V100 to A100;
    Khattak and Mikaitis 2025 model H100 and B200, whose widths differ and are undocumented). A step
    then loses less than 2⁻²³ of its largest term for each of b terms and 2⁻²³ of its sum, so under
    (b + 1)·2⁻²³ of its terms' absolute sum, and ⌈d/b⌉ steps under (4d + 4)·2⁻²⁴·Σ|ŵᵢĥᵢ| whatever b is;
    with the inner dimension split into s partial sums (each at least one MMA's 16 long) added in fp32,
    under (4d + 6s)·2⁻²⁴ ≤ ACCELERATOR_ROUNDINGS·d·2⁻²⁴. A test emulates such sums at b = 1 to 32."""
    return d if device.type == "cpu" else ACCELERATOR_ROUNDINGS * d


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Each row's Euclidean norm in float64: the fp32 norm, but summed in float64 for rows `beyond_fp32`,
    whose fp32 squares may underflow or overflow (a neuron of weights near 1e-30 has an fp32 norm of 0,
    one near 1e20 an infinite one). Not finite only where the row is not."""
    norms = x.norm(dim=1).double()
    beyond = beyond_fp32(norms)
    if beyond.any():
        norms[beyond] = x[beyond].double().norm(dim=1)
    return norms


def beyond_fp32(norms: torch.Tensor) -> torch.Tensor:
    """Rows whose norm is outside [TINY_NORM, HUGE_NORM), or not a number: their squares and quadratic
    forms need float64."""
    return ~((norms >= TINY_NORM) & (norms < HUGE_NORM))


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """`row_norms` raised by (1 + (d+2)·2⁻²⁴), which covers their own rounding (a sum of d squares; the
    squares fp32 may flush to zero in a row above TINY_NORM change its norm by under d·2⁻⁴⁶ of it; below
    HUGE_NORM none overflows)."""
    return row_norms(x) * (1 + (x.shape[1] + 2) * U_FP32)


def candidates(vectors: torch.Tensor, fast: FastHead, c: int, chunk: int, floors: Floors | None = None
               ) -> tuple[torch.Tensor, ...]:
    """Approximate top-c and bottom-c (values sorted descending, ids) over the vocabulary, a chunk at a time.

    The bottom side comes back negated (the top of −logits), so both sides read the same way. The CPU
    folds each chunk into running candidates with a compiled scan, starting from `floors` where given
    (rows that fewer than c values pass are left with placeholders: `short_rows`); accelerators run
    `topk` fast.
    """
    c = min(c, fast.weight.shape[0])
    if vectors.device.type != "cpu":
        return topk_candidates(vectors.to(fast.dtype), fast, c, chunk)
    return scan_candidates(vectors.to(fast.dtype), fast, c, chunk, floors)


def scan_floors(mean: torch.Tensor, std: torch.Tensor, c: int, vocab: int) -> Floors | None:
    """Per row, the value that a share FLOOR_TAIL of the logits, or FLOOR_ABOVE·c if more, would exceed on
    each side were they normal: a first bound for the scan, which otherwise admits hundreds of values per
    row while its own bound climbs. Only a guess: rows that fewer than c logits pass must be scanned again
    without it (`short_rows`). Real rows' tails follow the normal to about z = 2.8 and are thinner beyond:
    Gemma 3's (vocabulary 262,144, c = 64) leave 4 rows of 2,048 short at z = 2.8, 7 at 2.9, 57 at 3.1;
    SmolLM2's (49,152) 0 at z = 2.3, 1 of 1,536 at 2.8 (its scan 22 → 14 ms), 237 at 3.0."""
    tail = max(FLOOR_TAIL, FLOOR_ABOVE * c / vocab)
    if tail >= 0.5:
        return None
    z = NormalDist().inv_cdf(1 - tail)
    usable = torch.isfinite(mean) & torch.isfinite(std) & (std > 0)
    none = torch.full_like(mean, -torch.inf)
    return Floors(torch.where(usable, mean + z * std, none), torch.where(usable, z * std - mean, none))


def topk_candidates(v: torch.Tensor, fast: FastHead, c: int, chunk: int) -> tuple[torch.Tensor, ...]:
    """`candidates` by `topk` per chunk and a merge: any device. `topk` reads the product's output as it is
    (bf16: half the bytes of an fp32 copy, and half the radix passes), and only the values it keeps are
    widened: the same values, since every bf16 value is an fp32 one."""
    top = bottom = None
    for s in range(0, fast.weight.shape[0], chunk):
        a = v @ fast.weight[s:s + chunk].to(v.dtype).T  # [n, chunk]
        cc = min(c, a.shape[1])
        t, b = a.topk(cc, dim=1), a.topk(cc, dim=1, largest=False)  # no negated copy of the chunk
        t, b = (t.values.float(), t.indices + s), (-b.values.float(), b.indices + s)
        top = t if top is None else _keep(top, t, c)
        bottom = b if bottom is None else _keep(bottom, b, c)
    return top[0], top[1], bottom[0], bottom[1]


def scan_candidates(v: torch.Tensor, fast: FastHead, c: int, chunk: int, floors: Floors | None = None
                    ) -> tuple[torch.Tensor, ...]:
    """`candidates` by the compiled scan (kernels.py) over each product's logits while they are in cache: the CPU.

    A set starts as `width` placeholders (id −1) at its row's floor (−inf without one), which only values
    above it replace. A set is the `width` best of its row's values above the floor and the
    placeholders, so if at least c real ids are left in it, they are the row's exact top c; rows with
    fewer (`short_rows`) must be scanned again from −inf. Each chunk of the head is multiplied by at most
    `scan_rows` neurons at a time, so their sets stay in the core's cache while the long rows of logits
    stream past them.
    """
    n = v.shape[0]
    width = kernels.set_width(c)  # a few more than c
    start = floors or Floors(torch.full((n,), -torch.inf), torch.full((n,), -torch.inf))
    sets = [start.top[:, None].expand(n, width).float().contiguous(), torch.full((n, width), -1),
            start.bottom[:, None].expand(n, width).float().contiguous(), torch.full((n, width), -1)]
    state = [t.numpy() for t in sets]  # top values, ids; negated bottom values, ids
    block = scan_rows(width, n)
    buffer = torch.empty(block * min(chunk, len(fast.weight)), dtype=fast.dtype)  # one product's logits
    for i, rows in enumerate(fast.weight.split(chunk)):
        rows = rows.to(v.dtype)
        for b in range(0, n, block):
            part = v[b:b + block]
            out = buffer[:len(part) * len(rows)].view(len(rows), len(part))  # token-major: head rows on the left
            torch.matmul(rows, part.T, out=out)
            kernels.scan_chunk(_numpy(out), i * chunk, *(s[b:b + block] for s in state))
    kernels.sort_rows(*state[:2])
    kernels.sort_rows(*state[2:])
    return tuple(t[:, :c] for t in sets)


def short_rows(found: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Rows of `candidates` whose floor held fewer than c values on either side: a placeholder (id −1) is
    left among their c, and they must be scanned again from −inf."""
    return ((found[1][:, -1] < 0) | (found[3][:, -1] < 0)).nonzero().squeeze(1)


def scan_rows(width: int, n: int) -> int:
    """Neurons per product of the scan of n: as many as keep their running sets of `width` (fp32 values
    and int64 ids, both sides) within SETS_BYTES, in multiples of SCAN_ALIGN where that fits, so only the
    last product (a block's few riders) has a ragged width, which slows its product and its scan."""
    most = max(1, SETS_BYTES // (2 * width * 12))
    aligned = most // SCAN_ALIGN * SCAN_ALIGN or most  # sets too wide for SCAN_ALIGN neurons: as many as fit
    return max(1, min(n, aligned))


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy, bf16 as its uint16 bit patterns (numpy has no bf16)."""
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _keep(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], c: int):
    vals, ids = torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1)
    vals, perm = vals.topk(min(c, vals.shape[1]), dim=1)
    return vals, ids.gather(1, perm)


class Settled(NamedTuple):
    """One side's exact top-k `[n, k]` (values descending, ties by lower id) and `[n]` proven rows."""

    values: torch.Tensor
    ids: torch.Tensor
    proven: torch.Tensor


def settle(vectors: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor, ids: torch.Tensor, k: int,
           bound: ErrorBound, sign: int = 1) -> Settled:
    """The exact top-k of `sign`·logits among the candidates (approximate values `approx` sorted
    descending, `ids`), re-scoring only those that can reach it, and which rows it is proven for.

    A candidate can reach the top-k only if its approximate value plus its own bound reaches the least
    exact value of the first k; whether a token outside the candidates could is decided with the bound
    over the whole vocabulary. Comparisons run in float64 a unit in the last place below the fp32 value
    compared with, so a token ruled out is below it even after its exact logit is rounded to fp32."""
    vocab, c = weight.shape[0], approx.shape[1]
    first = sign * rescore(vectors, weight, ids[:, :k])
    reaches = torch.ones(approx.shape, dtype=torch.bool, device=approx.device)  # the first k: scored already
    after = approx[:, k:]  # a bound that is NaN, for logits beyond fp32, reaches nothing more
    reaches[:, k:] = after.double() + bound.each(after, ids[:, k:]) >= _ulp_below(first.min(1, keepdim=True).values)
    last = c - reaches.flip(1).byte().argmax(1)  # one past each row's last candidate that reaches
    # a row whose last candidate reaches is unlikely to be proven: it must not widen the others' work
    m = max(k, int(last[last < c].max())) if (last < c).any() else c
    pending = reaches[:, k:m]  # each row scores only its own candidates that reach
    rest = sign * rescore(vectors, weight, ids[:, k:m].where(pending, -1))
    exact = torch.cat([first, rest.masked_fill(~pending, -torch.inf)], 1)
    values, order = sort_by_value_then_id(exact, ids[:, :m], k)
    proven = last <= m
    if c < vocab:  # a + bound(|a|) grows with a (its slope in |a| is u/(1−u) < 1): the last candidate's caps the rest
        proven &= approx[:, -1].double() + bound.whole(approx[:, -1].abs()) < _ulp_below(values[:, k - 1])
    return Settled(values, order, proven)


def _ulp_below(x: torch.Tensor) -> torch.Tensor:
    """In float64, at least one fp32 unit in the last place below `x`: whatever is less rounds below x."""
    x = x.double()
    return x - x.abs() * U_FP32 * 2 - 2.0 ** -149


def sort_by_value_then_id(values: torch.Tensor, ids: torch.Tensor, k: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first `k` (default: all) by value, descending, then by id, ascending: one sort of a
    64-bit key, the fp32 value's bits made monotone above the id's complement (ids below 2³¹)."""
    bits = (values.float() + 0.0).view(torch.int32).long()  # + 0.0: −0.0 becomes +0.0, they tie
    key = (torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) << 32) + (0xFFFFFFFF - ids.long())
    perm = key.topk(k, dim=1).indices if k is not None and k < key.shape[1] else key.sort(dim=1, descending=True).indices
    return values.gather(1, perm), ids.gather(1, perm)


def rescore(vectors: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits `[n, m]` of each neuron for its own candidate ids, summed in float64 (identical head rows
    give identical values whatever a kernel's summation order) and stored in fp32; negative ids are
    placeholders, their values meaningless."""
    if vectors.device.type != "cpu":
        return bmm_rescore(vectors, weight, ids)
    out = torch.empty(ids.shape, dtype=torch.float32)
    if not len(vectors):  # every row of a block left short: numpy gives an empty array no row strides
        return out
    kernels.rescore(vectors.float().contiguous().numpy(), _numpy(weight), ids.contiguous().numpy(), out.numpy())
    return out


def bmm_rescore(vectors: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, budget: int = RESCORE_BYTES
                ) -> torch.Tensor:
    """`rescore` by gathered rows and a float64 batched product, at most `budget` bytes of gathered rows at a
    time: any device. A row's trailing placeholders are not gathered: rows go in order of how many columns
    they score, in batches of rows that differ in width by at most a quarter, each batch as wide as its
    widest row (a block's second `settle` pass scores 0 to m candidates a row, mostly its first few; at 8
    bytes a value, gathering is the bulk of a GPU's re-scoring)."""
    out = torch.zeros(ids.shape, dtype=torch.float32, device=vectors.device)
    valid = ids >= 0
    last = torch.cat([ids.new_zeros(len(ids), 1), valid * torch.arange(1, ids.shape[1] + 1, device=ids.device)], 1)
    widths, order = last.amax(1).sort()  # each row's last column to score, 1-based (0: none)
    widths, row_bytes = widths.tolist(), 8 * weight.shape[1]
    s = widths.count(0)  # rows with nothing to score
    while s < len(order):
        e = bisect_right(widths, widths[s] * 5 // 4, s)  # rows at most a quarter wider: few placeholders gathered
        e = min(e, s + max(1, budget // (row_bytes * widths[e - 1])))
        batch, m = order[s:e], widths[e - 1]
        picked = weight[ids[batch, :m]].double()  # [rows, m, d]
        exact = torch.bmm(picked, vectors[batch, :, None].double()).squeeze(2).float()
        out[batch, :m] = exact.masked_fill_(~valid[batch, :m], 0)
        s = e
    return out


def fastest_dtype(device: torch.device, d_model: int, vocab: int) -> torch.dtype:
    """bf16 where this device multiplies the atlas's shapes clearly faster in it (GPUs, AMX CPUs), else fp32.

    Measured, not assumed: an AVX2-only CPU runs bf16 several times slower than fp32, an AMX CPU
    several times faster. bf16 must win by 1.5× to pay for its wider candidate set.
    """
    if device.type == "cuda":
        return torch.bfloat16
    a = torch.randn(128, d_model, device=device)
    b = torch.randn(min(vocab, 2048), d_model, device=device)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y.T  # warm-up
        runs = []
        for _ in range(5):  # the best of five: the least disturbed by whatever else the machine runs
            t0 = time.perf_counter()
            x @ y.T
            runs.append(time.perf_counter() - t0)
        seconds[dtype] = min(runs)
    return torch.bfloat16 if seconds[torch.bfloat16] * 1.5 < seconds[torch.float32] else torch.float32


@contextmanager
def exact_matmul() -> Iterator[None]:
    """The bound assumes fp32 accumulation: no TF32 inputs and no reduced-precision bf16 sums on CUDA."""
    flags = torch.backends.cuda.matmul
    saved = flags.allow_tf32, flags.allow_bf16_reduced_precision_reduction
    flags.allow_tf32, flags.allow_bf16_reduced_precision_reduction = False, False
    try:
        yield
    finally:
        flags.allow_tf32, flags.allow_bf16_reduced_precision_reduction = saved
