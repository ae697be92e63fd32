"""Neuron vectors through the LM head: top-k and bottom-k tokens, and logit statistics. Pure math.

For a block of neuron vectors `W` `[n, d]` and the head `W_U` `[V, d]`, the logits are `W W_Uᵀ`
(Davies 2025; Geva et al. 2022). They are computed one vocabulary chunk at a time in the compute dtype
(fp32, or bf16 where the machine multiplies faster in it), so a chunk of logits stays in cache while its
top candidates are taken; the candidates are then re-scored exactly and proven to contain the true
top-k (certified.py). Order is by logit (its exact value rounded to the stored fp32), then by lower token
id: identical head rows (tied special tokens) and all-zero vectors give exact ties, and the rule makes
the result deterministic whatever the chunking, dtype or device.

Mean and variance over the vocabulary need no logit matrix: `mean = w·μ`, `var = wᵀ Σ w`, with `μ`
and `Σ` the mean and (population) covariance of the head's rows, computed once per head.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from pipeline.atlas import certified, kernels
from pipeline.atlas.certified import FastHead, Settled, sort_by_value_then_id
from pipeline.atlas.lanes import lane_pool

CHUNK_BYTES = 5 << 20  # of the head per CPU product: long rows of logits for the scan, the chunk in cache
CHUNK_ROWS = 2048  # AMX, d = 4,096: products of 640 head rows ran at 741 GFLOP/s, of 2,048 at 921
ACCELERATOR_CHUNK = 1 << 16  # GPUs: few large products
PRODUCT_BLOCK = 4096  # neurons per `project_block` (a partition, mostly): the rows left unproven are settled together
STATS_CHUNK = 8192
GRAM_BLOCKS = 4  # covariance and variances multiply 10 of 4×4 blocks: Gemma 3's covariance 0.96 → 0.63 s
MIN_BAND = 128  # rows per block at least: smaller products' sums depend on the thread count (`_block_bounds`)
EXTRA_CANDIDATES = {torch.float32: 8, torch.bfloat16: 44}  # beyond k on a CPU: >98% of SmolLM2 rows are proven
ACCELERATOR_EXTRA = 108  # beyond k on accelerators, whose truncating sums widen the bound (`candidate_count`)
WIDEN = 4  # candidates are multiplied by this for the rows the fast dtype could not settle


@dataclass(frozen=True)
class Head:
    """The unembedding with its row statistics, prepared once per model and normalisation."""

    weight: torch.Tensor  # [V, d] the exact head: fp32, or the fast copy where that holds it exactly
    mean: torch.Tensor  # [d]    mean of the rows
    cov: torch.Tensor  # [d, d] population covariance of the rows
    fast: FastHead  # the head in the compute dtype, for the candidate pass

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype = torch.float32, chunk: int = STATS_CHUNK) -> Head:
        weight = weight.float()
        return cls.from_rows(lambda rows: weight[rows], len(weight), dtype, chunk)

    @classmethod
    def from_rows(cls, read: Callable[[slice], torch.Tensor], vocab: int, dtype: torch.dtype = torch.float32,
                  chunk: int = STATS_CHUNK) -> Head:
        """From the fp32 head read `chunk` rows at a time (FastHead.from_rows says what is kept); row mean
        and covariance accumulated in float64 over chunks."""
        fast, weight = FastHead.from_rows(read, vocab, dtype, chunk)
        chunks = weight.split(chunk)  # fp32 within a chunk, float64 across
        with one_thread_each(weight.device) as run:
            mean = (_sum_in_order(run(lambda rows: rows.sum(0, dtype=torch.float32), chunks)) / vocab).float()
            cov = _sum_in_order(gram(rows - mean, run) for rows in chunks)  # bf16 rows promoted to fp32
        return cls(weight, mean, cov.div_(vocab).float(), fast)


Run = Callable[[Callable, Iterable], Iterator]


@contextmanager
def one_thread_each(device: torch.device) -> Iterator[Run]:
    """A `map` that runs each call on one CPU thread, as many at once as torch has threads: a product split
    over threads sums in an order that depends on their number (MKL on a 2-core Xeon split even 128-row
    bands), and so would the head's statistics. On an accelerator, the plain `map`."""
    if device.type != "cpu":
        yield map
        return
    with lane_pool(torch.get_num_threads(), 1) as pool:
        yield pool.map


def _sum_in_order(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """`Σ parts` in float64, in order (fp32 → float64 is exact)."""
    total = None
    for part in parts:
        if total is None:
            total = torch.zeros_like(part, dtype=torch.float64)
        total.add_(part)
    return total


def gram(x: torch.Tensor, run: Run = map) -> torch.Tensor:
    """`xᵀx` from its upper block triangle, mirrored in place (so exactly symmetric, and no copy of a 70B
    head's 0.25-GiB Gram): of GRAM_BLOCKS² blocks only those on and above the diagonal are multiplied,
    10 of 16, each a call of `run`."""
    d = x.shape[1]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    bounds = _block_bounds(d)
    pairs = [(rows, cols) for i, rows in enumerate(bounds) for cols in bounds[i:]]

    def multiply(pair: tuple[tuple[int, int], tuple[int, int]]) -> None:
        (a, b), (c, e) = pair
        torch.matmul(x[:, a:b].T, x[:, c:e], out=out[a:b, c:e])

    for _ in run(multiply, pairs):
        pass
    for a, b in bounds:
        out[b:, a:b] = out[a:b, b:].T
        out[a:b, a:b] = out[a:b, a:b].triu() + out[a:b, a:b].triu(1).T
    return out


def quadratic_form(x: torch.Tensor, sym: torch.Tensor) -> torch.Tensor:
    """Each row's `x S xᵀ` for a symmetric `S`, from its upper block triangle (10 of 16 blocks): the
    variance of every neuron's logits, whose fp32 product has d/V of the projection's multiply-adds
    (12% of an 8B-shape partition's time in bf16 before the blocks)."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for a, b in _block_bounds(x.shape[1]):
        band = x[:, a:b] @ sym[a:b, a:]  # [n, d − a]
        total += (band[:, :b - a] * x[:, a:b]).sum(1) + 2 * (band[:, b - a:] * x[:, b:]).sum(1)
    return total


def logit_statistics(vectors: torch.Tensor, head: Head) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's logit mean and std over the vocabulary, and its norm, in fp32; rows `certified.beyond_fp32`
    in float64, since their fp32 squares underflow or overflow (std would read 0 or inf)."""
    mean, var, norm = vectors @ head.mean, quadratic_form(vectors, head.cov), certified.row_norms(vectors)
    beyond = certified.beyond_fp32(norm).nonzero().squeeze(1)
    if len(beyond):
        v = vectors[beyond].double()
        mean[beyond] = (v @ head.mean.double()).float()
        var = var.double().index_put_((beyond,), quadratic_form(v, head.cov.double()))  # 1e-60 or 1e50: not fp32
    return mean, var.clamp_min(0).sqrt().float(), norm.float()


def _block_bounds(d: int) -> list[tuple[int, int]]:
    """The column ranges [a, b) that split a width d: GRAM_BLOCKS of them, or one below GRAM_BLOCKS·MIN_BAND.

    A BLAS splits a product's inner dimension over threads when its output is small (bands of 12 rows
    did at 3 threads), and then its sums, so the atlas, would depend on the machine's thread count;
    on an AMD EPYC bands of ≥ 128 rows gave the same bits at 1 to 32 threads, as the whole product does.
    MKL on a 2-core Xeon split even those, so the head's statistics run each product on one thread
    (`one_thread_each`); a build's variances run in lanes, single-threaded.
    """
    blocks = GRAM_BLOCKS if d >= GRAM_BLOCKS * MIN_BAND else 1
    edges = [d * i // blocks for i in range(blocks + 1)]
    return list(zip(edges, edges[1:]))


@dataclass(frozen=True)
class Projection:
    """What the atlas keeps of one block of neurons: `[n, k]` top/bottom tokens and `[n]` statistics."""

    top_ids: torch.Tensor
    top_logits: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_logits: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    norm: torch.Tensor

    def cpu(self) -> Projection:
        return Projection(*(getattr(self, f.name).cpu() for f in fields(self)))

    def split(self, rows: int) -> list[Projection]:
        """Blocks of `rows` neurons (the last one shorter), as views."""
        parts = [getattr(self, f.name).split(rows) for f in fields(self)]
        return [Projection(*block) for block in zip(*parts)]


def fold_gain(vectors: torch.Tensor, gain: torch.Tensor | None, center: bool) -> torch.Tensor:
    """Prepare a layer's vectors: scale by a norm gain, optionally subtract the layer's mean vector.

    Centring removes the direction all neurons of the layer share, which equals centring each token's
    logit column over the layer's neurons (glitch tokens that top every neuron drop back).
    """
    if gain is not None:
        vectors = vectors * gain
    if center:
        vectors = vectors - vectors.mean(0, keepdim=True)
    return vectors


def project_block(vectors: torch.Tensor, head: Head, k: int, chunk: int | None = None,
                  candidates: int | None = None) -> Projection:
    """Project `[n, d]` vectors through the head and keep the top-k and bottom-k tokens of each: a
    `project_blocks` stream of one block."""
    return next(project_blocks([vectors], head, k, chunk, candidates))


def project_blocks(blocks: Iterable[torch.Tensor], head: Head, k: int, chunk: int | None = None,
                   candidates: int | None = None) -> Iterator[Projection]:
    """Project blocks of `[n, d]` vectors in turn, yielding each block's Projection in order.

    The product runs in the head's compute dtype and proposes `candidates` tokens per side (on the CPU a
    scan that starts at floors set by each row's exact mean and std), of which those that can make the
    top-k are re-scored exactly (certified.py); rows the error bound cannot settle are projected again
    with more candidates, in the compute dtype and then in fp32, and those that still fail from float64
    logits. Rows whose floor was
    too high must be scanned again from −inf: they ride along the next block's scan, because a pass of
    their own would stream the whole head for a handful of rows (20 ms of memory traffic for Gemma 3's
    bf16 head, the product's share of 13 rows 9 ms). So a block is settled at once but for those rows,
    kept (their vectors only) until the next block is scanned, then yielded; only the last block's
    short rows are scanned alone. A block's unproven rows, short or not, are projected again together.
    """
    pending = None
    for vectors in blocks:
        scanned = _Scanned(vectors, head, k, chunk, candidates, pending)
        del vectors  # not held while the next block is read: a lane keeps one partition's vectors
        if pending is not None:
            yield pending.finish(scanned.riders)
        pending = scanned
    if pending is not None:
        yield pending.finish()


class _Scanned:
    """A block's projection, settled at once but for the rows its floors left short, which wait (their
    vectors only) for the next block's scan; and the candidates of the block before's short rows, which
    rode along this one's."""

    def __init__(self, vectors: torch.Tensor, head: Head, k: int, chunk: int | None, candidates: int | None,
                 before: _Scanned | None) -> None:
        vocab, n = head.weight.shape[0], len(vectors)
        self.head, self.k = head, min(k, vocab)
        self.chunk = chunk or (cpu_chunk(head.weight.shape[1], head.fast.dtype) if vectors.device.type == "cpu"
                               else ACCELERATOR_CHUNK)
        self.c = candidate_count(self.k, vocab, head.fast.dtype, candidates, vectors.device)
        mean, std, norm = logit_statistics(vectors, head)
        floors = certified.scan_floors(mean, std, self.c, vocab)
        riders = before.waiting if before is not None else vectors[:0]
        scanned = torch.cat([vectors, riders]) if len(riders) else vectors  # riders from −inf, as the last rows
        if len(riders) and floors is not None:
            below = torch.full((len(riders),), -torch.inf, device=vectors.device)
            floors = certified.Floors(*(torch.cat([f, below]) for f in floors))
        found = certified.candidates(scanned, head.fast, self.c, self.chunk, floors)
        own, self.riders = tuple(t[:n] for t in found), tuple(t[n:].clone() for t in found)
        self.short = certified.short_rows(own)
        self.waiting = vectors[self.short]
        self.settled = tuple(torch.empty(n, self.k, dtype=dtype, device=vectors.device)
                             for dtype in (torch.float32, torch.long) * 2)  # top values, ids; bottom values, ids
        self.stats = (mean, std, norm)
        self.unproven: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, vectors) for one retry
        everyone = torch.arange(n, device=vectors.device)
        if len(self.short):
            rest = torch.ones(n, dtype=torch.bool, device=vectors.device).index_fill_(0, self.short, False)
            self._settle(vectors[rest], tuple(t[rest] for t in own), everyone[rest])
        else:
            self._settle(vectors, own, everyone)

    def _settle(self, vectors: torch.Tensor, found: tuple[torch.Tensor, ...], rows: torch.Tensor) -> None:
        """Settle `rows` of the block from their candidates; those left unproven wait for the block's retry."""
        top, bottom = settle_sides(vectors, self.head, self.k, found)
        _fill(self.settled, rows, (top, bottom))
        unproven = _unproven(top, bottom)
        if len(unproven):
            self.unproven.append((rows[unproven], vectors[unproven]))

    def finish(self, riders: tuple[torch.Tensor, ...] | None = None) -> Projection:
        """The block's projection: its short rows settled from `riders` or else from a scan of their own,
        then every row left unproven settled again, in one pass."""
        if len(self.short):
            found = riders if riders is not None else certified.candidates(self.waiting, self.head.fast, self.c,
                                                                           self.chunk)
            self._settle(self.waiting, found, self.short)
        if self.unproven:
            rows, vectors = (torch.cat(part) for part in zip(*self.unproven))
            _fill(self.settled, rows, _again(vectors, self.head, self.k, self.c, self.chunk))
        top_values, top_ids, bottom_values, bottom_ids = self.settled
        return Projection(top_ids, top_values, bottom_ids, -bottom_values, *self.stats)


def candidate_count(k: int, vocab: int, dtype: torch.dtype, candidates: int | None = None,
                    device: torch.device = torch.device("cpu")) -> int:
    """Candidates per side of the first pass: `candidates` or k + EXTRA_CANDIDATES, raised to a multiple
    of the scan's block (it keeps that many anyway). On an accelerator k + ACCELERATOR_EXTRA: its bound
    counts 5d roundings of the sums for the CPU's d (certified.accumulation_roundings). Of 256 random
    8B-shape neurons over an fp32 head (rows bf16 rounds: an fp32 checkpoint, folded gains), k + 44 left
    222 unproven (64 with the CPU's count), k + 108 none; in real builds with the accelerator's steps on
    CPU tensors, k + 108 left 0 SmolLM2 rows of 13,824 and 1 Gemma 3 row of 12,288 to retry."""
    extra = EXTRA_CANDIDATES[dtype] if device.type == "cpu" else ACCELERATOR_EXTRA
    c = candidates or k + extra
    return max(k, min(vocab, kernels.set_width(c)))


def cpu_chunk(d: int, dtype: torch.dtype) -> int:
    """Head rows per CPU product: CHUNK_BYTES of the head (4,096 rows of Gemma 3's in bf16), but at least
    CHUNK_ROWS (Llama 3.1 8B's 2,048 are 16 MiB), a multiple of the scan's block. Against 1,024 rows,
    Gemma 3's scan took 5% of the product instead of 11%: a row's set is set up once per chunk."""
    return max(CHUNK_BYTES // (d * dtype.itemsize), CHUNK_ROWS) // kernels.BLOCK * kernels.BLOCK


def settle_sides(vectors: torch.Tensor, head: Head, k: int, found: tuple[torch.Tensor, ...],
                 fast: FastHead | None = None) -> tuple[Settled, Settled]:
    """Both sides settled from their candidates `found` of the `fast` head (default: the head's), and the
    rows proven."""
    tv, ti, bv, bi = found
    bound = certified.ErrorBound(vectors, fast or head.fast)
    return (certified.settle(vectors, head.weight, tv, ti, k, bound),
            certified.settle(vectors, head.weight, bv, bi, k, bound, sign=-1))


def _unproven(top: Settled, bottom: Settled) -> torch.Tensor:
    return (~(top.proven & bottom.proven)).nonzero().squeeze(1)


def _again(vectors: torch.Tensor, head: Head, k: int, c: int, chunk: int
           ) -> tuple[Settled, Settled] | tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Rows c candidates of the compute dtype left unproven, projected again with WIDEN·c candidates and no
    floors (few rows, one pass each): in the compute dtype first where that is not fp32, since its head
    is half the bytes to stream (four SmolLM2 layers: it settled all 47 such rows in 5.9 ms a partition
    against 11.7 for the fp32 pass), then over the exact head in fp32, whose bound is the accumulation's
    alone; rows that still fail, or whose WIDEN·c would be a large share of the vocabulary, from float64
    logits. Every logit of a zero vector (a dead neuron, never proven: its logits tie) is exactly 0, so
    both its sides are the first k ids at 0, without a pass (its retries took 0.12–0.23 s at Llama 3.1 8B's
    shape)."""
    live = vectors.any(1).nonzero().squeeze(1)
    if len(live) < len(vectors):
        first = torch.arange(min(k, len(head.weight)), device=vectors.device).expand(len(vectors), -1).contiguous()
        zeros = torch.zeros(first.shape, device=vectors.device)
        sides = (zeros, first, -zeros, first.clone())  # the dead rows' answer (bottom negated); the live rows' over it
        if len(live):
            _fill(sides, live, _again(vectors[live], head, k, c, chunk))
        return sides[:2], sides[2:]
    wider = WIDEN * c
    if wider * 8 > head.weight.shape[0]:
        return _float64_topk(vectors, head.weight, k, chunk)
    exact = head.fast.in_fp32(head.weight)
    passes = (exact,) if head.fast.dtype == torch.float32 else (head.fast, exact)
    return _wider_sides(vectors, head, k, wider, chunk, passes)


def _wider_sides(vectors: torch.Tensor, head: Head, k: int, c: int, chunk: int, passes: tuple[FastHead, ...]
                 ) -> tuple[Settled, Settled]:
    """Top-k of the logits and of their negation from c candidates a side of the first of `passes`; the
    rows it leaves unproven from the next pass, after the last from float64 logits."""
    fast, rest = passes[0], passes[1:]
    top, bottom = settle_sides(vectors, head, k, certified.candidates(vectors, fast, c, chunk), fast)
    rows = _unproven(top, bottom)
    if len(rows):
        again = (_wider_sides(vectors[rows], head, k, c, chunk, rest) if rest
                 else _float64_topk(vectors[rows], head.weight, k, chunk))
        _fill((top.values, top.ids, bottom.values, bottom.ids), rows, again)
    return top, bottom


def _fill(sides: tuple[torch.Tensor, ...], rows: torch.Tensor, again) -> None:
    """Write the (values, ids) of both sides in `again` into `sides` (top values, ids, bottom values, ids)
    at `rows`."""
    for (values, ids), (new_values, new_ids, *_) in zip((sides[:2], sides[2:]), again):
        values[rows], ids[rows] = new_values, new_ids


def _float64_topk(vectors: torch.Tensor, weight: torch.Tensor, k: int, chunk: int):
    """Top-k of the logits and of their negation, ties by lower id, from every logit summed in float64
    and rounded to fp32 (`certified.rescore`, as the candidates' exact values), a chunk at a time."""
    top = bottom = None
    chunk = min(chunk, max(1, certified.RESCORE_BYTES // (8 * weight.shape[1])))  # one row's gather on a GPU
    for start in range(0, weight.shape[0], chunk):
        rows = weight[start:start + chunk]
        logits = certified.rescore(vectors, rows, torch.arange(len(rows), device=vectors.device).expand(len(vectors), -1))
        t = _chunk_topk(logits, k, start)
        b = _chunk_topk(-logits, k, start)
        top = t if top is None else _merge(top, t, k)
        bottom = b if bottom is None else _merge(bottom, b, k)
    return top, bottom


def z_scores(logits: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`(logit − mean) / std` per neuron row; 0 for a constant logit vector (std = 0)."""
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std[:, None] > 0, (logits - mean[:, None]) / safe[:, None], torch.zeros_like(logits))


def _chunk_topk(logits: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of one chunk ordered by (value desc, id asc), exact when values tie at the cut."""
    k = min(k, logits.shape[1])
    vals, idx = logits.topk(min(k + 1, logits.shape[1]), dim=1)
    tied = vals[:, k - 1] == vals[:, -1] if vals.shape[1] > k else torch.zeros_like(vals[:, 0], dtype=torch.bool)
    vals, idx = vals[:, :k], idx[:, :k]
    if tied.any():  # the (k+1)-th equals the k-th: which tokens make the cut is a tie-break by id
        rows = tied.nonzero().squeeze(1)
        order = logits[rows].sort(dim=1, descending=True, stable=True).indices[:, :k]
        idx[rows] = order
        vals[rows] = logits[rows].gather(1, order)
    return sort_by_value_then_id(vals, idx + offset)


def _merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], k: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two sorted top-k lists where every id of `a` is below every id of `b`."""
    vals = torch.cat([a[0], b[0]], 1)
    ids = torch.cat([a[1], b[1]], 1)
    vals, perm = vals.sort(dim=1, descending=True, stable=True)  # stable: equal values keep id order
    return vals[:, :k], ids.gather(1, perm)[:, :k]


