"""CPU loops that torch cannot run at the speed of the product: a running top/bottom scan and exact rescoring.

Both are compiled by numba, release the GIL (a build runs one lane per core, each in its own thread)
and work in place on numpy views of torch tensors.

`scan_chunk` keeps, per neuron, the c largest values seen so far and the c largest negated values (the
bottom side), each as an unsorted set whose worst member is the bound a new value must beat. It reads
a chunk of logits laid out token by token (`[tokens, neurons]`: the product has the head's rows on its
left, which an AMX CPU multiplies faster, see below), a token's values for a span of neurons at a time
(64 bf16 values, 32 fp32 ones), as one vector compared with the vector of those neurons' bounds (a bit
mask), and visits only the values whose bit is set; after the first chunks few are (a new value enters
the top c of t values seen with chance c/t). bf16 logits are read as they are, their uint16 bit
patterns, with no fp32 copy of the chunk: each is mapped to the int16 that orders like its value
(`_key`), and compared with the key of the largest bf16 at or below the bound (`_keys_above`; the bottom
side likewise); an admitted value is then compared as a float. A set that starts at a floor
(certified.scan_floors) holds placeholders (id −1), which admitted values fill front to back with the
bound unchanged; once full, an admitted value replaces the worst member in place (`_admit`: a vector
minimum over the set, no sorted list to shift, about 23 ns). `sort_rows` orders the sets once at the
end. Measured on an AVX2 EPYC, one core, fp32 SmolLM2 logits, c = 28: 0.6–0.7 ns per logit from sets of
−inf, 0.45–0.55 from floors (a sorted insertion list took 1.1–1.4 ns, `torch.topk` on both sides
several); on an AVX-512 EPYC with the logits neuron by neuron, bf16, c = 64: the scan from floors 0.2
(Gemma 3) to 0.4 (SmolLM2) ns per logit, against 2.3–2.6 ns for the bf16 product itself. On a 2-core
Xeon with AMX, one core, the product with the head's rows on the left ran 22–26% faster (SmolLM2
119 → 87 ms a partition, Gemma 3 839 → 654 ms), and this scan 27–28 ms a SmolLM2 partition against
21–23 for the neuron-by-neuron one; a partition 203 → 179 ms in all (Gemma 3 1,030 → 914 ms).

`rescore` sums each neuron's dot product with its candidate rows in float64, in one fixed order (eight
interleaved partial sums, a vector of doubles, then combined pairwise): the products of two fp32 values
are exact in float64, so the result depends on nothing but the inputs, whatever the machine. The pairs
are taken in order of token id (a counting sort), so a row that several neurons' candidates share is
read once and the reads ascend through the head, and the row needed AHEAD dot products later is
prefetched while one is summed: 74 ns per dot product with 8 ahead, 141 with 1 (random rows of a
49,152 × 576 head, as SmolLM2's; one core of an AVX-512 EPYC; 59 ns for random bf16 rows in a
later run, by id and in row order alike). A Gemma 3 partition's candidates
(about 128,000 pairs over 87,000 distinct rows of its fp32 head) took 31.5 ms in row order, 24.7
by id, in two lanes.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

BLOCK = 32  # values per vector compare of a running set, whose size is a multiple of it
LANES = 8  # partial sums per dot product in `rescore`, a vector of doubles
AHEAD = 8  # `rescore` prefetches the head row it will need this many dot products later
BF16_STEP, FP32_STEP = 64, 32  # logits per step of the scan: one 64-bit mask per side; 64 fp32 values a
#                                step were no faster
_FAST = {"nnan", "nsz"}  # logits are never NaN; ±0 compare equal anyway


def _float32s(builder, data, array_type, start, lanes: int) -> ir.Value:
    """`lanes` values (a vector, or a scalar for 1) of a 1-D array from `start`, as float32 (elements
    adjacent: checked by the callers); an array of uint16 holds bf16 values, the high halves of float32s."""
    shaped = (lambda e: ir.VectorType(e, lanes)) if lanes > 1 else (lambda e: e)
    pointer = builder.gep(data, [start])
    if array_type.dtype != types.uint16:
        return builder.load(builder.bitcast(pointer, shaped(ir.FloatType()).as_pointer()), align=4)
    halves = builder.load(builder.bitcast(pointer, shaped(ir.IntType(16)).as_pointer()), align=2)
    sixteen = ir.Constant(shaped(ir.IntType(32)), [16] * lanes if lanes > 1 else 16)
    return builder.bitcast(builder.shl(builder.zext(halves, shaped(ir.IntType(32))), sixteen), shaped(ir.FloatType()))


def _block(context, builder, array_type, array, start, lanes: int = BLOCK) -> ir.Value:
    """`lanes` values of a 1-D array from `start`, as float32."""
    return _float32s(builder, context.make_array(array_type)(context, builder, array).data, array_type, start, lanes)


@intrinsic
def _at(typingctx, row, index):
    """`row[index]` as float32, from float32 values or from bf16 ones held as uint16."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return _float32s(builder, data, signature.args[0], args[1], 1)
    return types.float32(row, index), codegen


def _span(array_type) -> int:
    """Logits per step of the scan for the logits' type (bf16 held as uint16, or fp32)."""
    return BF16_STEP if array_type.dtype == types.uint16 else FP32_STEP


@intrinsic
def _step(typingctx, logits):
    """`_span` of the logits' type, a constant."""
    def codegen(context, builder, signature, args):
        return ir.Constant(ir.IntType(64), _span(signature.args[0]))
    return types.int64(logits), codegen


@intrinsic
def _holds_bf16(typingctx, logits):
    """Whether the logits are bf16 (held as uint16), a constant."""
    def codegen(context, builder, signature, args):
        return ir.Constant(ir.IntType(1), signature.args[0].dtype == types.uint16)
    return types.boolean(logits), codegen


def _splat(builder, scalar: ir.Value, vector: ir.VectorType) -> ir.Value:
    """`scalar` in every lane of a vector."""
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), vector.count), [0] * vector.count))


def _mask(builder, lanes: ir.Value) -> ir.Value:
    """A vector of booleans as the bits of a uint64 (bit i for lane i)."""
    return builder.zext(builder.bitcast(lanes, ir.IntType(lanes.type.count)), ir.IntType(64))


@intrinsic
def _equal(typingctx, row, start, bound):
    """The bit mask of `row[start:start + BLOCK] == bound` (bit i for row[start + i])."""
    def codegen(context, builder, signature, args):
        values = _block(context, builder, signature.args[0], args[0], args[1])
        return _mask(builder, builder.fcmp_ordered("==", values, _splat(builder, args[2], values.type)))
    return types.uint64(row, start, types.float32), codegen


@intrinsic
def _block_min(typingctx, row, start):
    """The smallest of `row[start:start + BLOCK]`, one vector reduction."""
    def codegen(context, builder, signature, args):
        values = _block(context, builder, signature.args[0], args[0], args[1])
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [values.type]),
                                            f"llvm.vector.reduce.fmin.v{BLOCK}f32")
        return builder.call(fn, [values], fastmath=("nnan",))
    return types.float32(row, start), codegen


@intrinsic
def _lowest_bit(typingctx, mask):
    """The index of the lowest set bit of a non-zero mask."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), [ir.IntType(64),
                                            ir.IntType(1)]), "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])
    return types.uint64(mask), codegen


@numba.njit(nogil=True, cache=True, fastmath=_FAST, inline="always")
def _worst(values):
    """The bound of a running set: its smallest value."""
    low = _block_min(values, 0)
    for s in range(BLOCK, values.shape[0], BLOCK):
        low = min(low, _block_min(values, s))
    return low


@numba.njit(nogil=True, cache=True, fastmath=_FAST, inline="always")
def _admit(values, ids, bound, x, token):
    """Put value `x` of id `token` in place of the set's worst member (the smallest value, the highest id
    among equals: ids arrive in increasing order, so lower ids win ties) and return the new bound."""
    slot = -1
    for s in range(0, values.shape[0], BLOCK):
        equal = _equal(values, s, bound)
        while equal:  # usually one member holds the worst value
            i = s + np.int64(_lowest_bit(equal))
            equal &= equal - np.uint64(1)
            if slot < 0 or ids[i] > ids[slot]:
                slot = i
    values[slot] = x
    ids[slot] = token
    return _worst(values)


def _compare_lanes(op: str):
    """An intrinsic: the bit mask of `row[at:at + BLOCK] op bounds[start:start + BLOCK]`, lane by lane
    (bit i for row[at + i]), as floats."""
    @intrinsic
    def compare(typingctx, row, at, bounds, start):
        def codegen(context, builder, signature, args):
            values = _block(context, builder, signature.args[0], args[0], args[1])
            limits = _block(context, builder, signature.args[2], args[2], args[3])
            return _mask(builder, builder.fcmp_ordered(op, values, limits))
        return types.uint64(row, at, bounds, start), codegen
    return compare


def _compare_keys(op: str):
    """An intrinsic: the bit mask of `key(row[at:at + n]) op keys[start:start + n]`, n = `_span` (64), for
    bf16 values held as uint16, `key` mapping their bits to int16 in the values' order (`_key`): integer
    compares, no conversion to fp32."""
    @intrinsic
    def compare(typingctx, row, at, keys, start):
        def codegen(context, builder, signature, args):
            lanes = _span(signature.args[0])
            vector = ir.VectorType(ir.IntType(16), lanes)

            def load(array_type, array, index):
                data = context.make_array(array_type)(context, builder, array).data
                return builder.load(builder.bitcast(builder.gep(data, [index]), vector.as_pointer()), align=2)

            bits = load(signature.args[0], args[0], args[1])
            magnitude = builder.and_(builder.ashr(bits, ir.Constant(vector, [15] * lanes)),
                                     ir.Constant(vector, [0x7FFF] * lanes))
            keys = load(signature.args[2], args[2], args[3])
            return _mask(builder, builder.icmp_signed(op, builder.xor(bits, magnitude), keys))
        return types.uint64(row, at, keys, start), codegen
    return compare


_above_each, _below_each = _compare_lanes(">"), _compare_lanes("<")
_keys_above, _keys_below = _compare_keys(">"), _compare_keys("<")


@intrinsic
def _float_bits(typingctx, x):
    """The bit pattern of a float32, as int64 (0 … 2³²−1)."""
    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))
    return types.int64(types.float32), codegen


@numba.njit(nogil=True, cache=True, inline="always")
def _key(bits):
    """A bf16 bit pattern (0 … 2¹⁶−1) as the int16 that orders like its value: negative values' magnitude
    bits flipped (−0 sorts just below +0; the scan compares floats after)."""
    signed = bits - 65536 if bits >= 32768 else bits
    return np.int16(signed ^ 0x7FFF if signed < 0 else signed)


@numba.njit(nogil=True, cache=True, inline="always")
def _key_at_most(bound):
    """The key of the largest bf16 value ≤ `bound`: a bf16 above it has a larger key."""
    bits = _float_bits(np.float32(bound))
    high = bits >> 16
    if bits >= 1 << 31 and bits & 0xFFFF:  # negative: truncation rounded toward zero, up
        high += 1
    return _key(high)


@numba.njit(nogil=True, cache=True, inline="always")
def _key_at_least(bound):
    """The key of the smallest bf16 value ≥ `bound`: a bf16 below it has a smaller key."""
    bits = _float_bits(np.float32(bound))
    high = bits >> 16
    if bits < 1 << 31 and bits & 0xFFFF:  # positive: truncation rounded down
        high += 1
    return _key(high)


@numba.njit(nogil=True, cache=True, fastmath=_FAST)
def scan_chunk(logits, offset, top_values, top_ids, bottom_values, bottom_ids):
    """Fold a chunk of logits laid out token by token, `[m, n]` (row t: token offset+t's logit for each of
    the n neurons; float32, or bf16 held as uint16), into each neuron's running sets: the c largest logits
    and the c largest negated logits. c is a multiple of BLOCK; a set starts at −inf, or at a floor as
    placeholders (id −1) filled front to back."""
    m, n = logits.shape
    packed = (m * n == 0 or (logits.strides[1] == logits.itemsize and logits.strides[0] == n * logits.itemsize)) \
        and top_values.strides[1] == top_values.itemsize and bottom_values.strides[1] == bottom_values.itemsize
    if not packed or top_values.shape[1] % BLOCK or bottom_values.shape[1] % BLOCK:
        raise ValueError("scan_chunk needs a contiguous chunk of logits and sets of a multiple of 32")
    width, bf16 = top_values.shape[1], _holds_bf16(logits)
    high, low = np.empty(n, np.float32), np.empty(n, np.float32)  # bounds; low: of values
    high_keys, low_keys = np.empty(n, np.int16), np.empty(n, np.int16)
    tn, bn = np.empty(n, np.int64), np.empty(n, np.int64)
    for r in range(n):
        high[r], low[r] = _worst(top_values[r]), -_worst(bottom_values[r])
        high_keys[r], low_keys[r] = _key_at_most(high[r]), _key_at_least(low[r])
        tn[r], bn[r] = _filled(top_ids[r]), _filled(bottom_ids[r])
    span = _step(logits)
    full, flat = n - n % span, logits.reshape(-1)
    for t in range(m):
        token, at = offset + t, t * n
        for start in range(0, n, span):
            if start >= full:  # the ragged tail: every value is a candidate, checked below
                up = down = (np.uint64(1) << np.uint64(n - start)) - np.uint64(1)
            elif bf16:
                up, down = _keys_above(flat, at + start, high_keys, start), _keys_below(flat, at + start, low_keys, start)
            else:
                up, down = _above_each(flat, at + start, high, start), _below_each(flat, at + start, low, start)
            while up:
                r = start + np.int64(_lowest_bit(up))
                up &= up - np.uint64(1)
                x = _at(flat, at + r)
                if x > high[r] and tn[r] < width:  # a placeholder's slot: the bound stays until none is left
                    top_values[r, tn[r]], top_ids[r, tn[r]] = x, token
                    tn[r] += 1
                    if tn[r] == width:
                        high[r] = _worst(top_values[r])
                        high_keys[r] = _key_at_most(high[r])
                elif x > high[r]:
                    high[r] = _admit(top_values[r], top_ids[r], high[r], x, token)
                    high_keys[r] = _key_at_most(high[r])
            while down:
                r = start + np.int64(_lowest_bit(down))
                down &= down - np.uint64(1)
                x = -_at(flat, at + r)
                if x > -low[r] and bn[r] < width:
                    bottom_values[r, bn[r]], bottom_ids[r, bn[r]] = x, token
                    bn[r] += 1
                    if bn[r] == width:
                        low[r] = -_worst(bottom_values[r])
                        low_keys[r] = _key_at_least(low[r])
                elif x > -low[r]:
                    low[r] = -_admit(bottom_values[r], bottom_ids[r], -low[r], x, token)
                    low_keys[r] = _key_at_least(low[r])


@numba.njit(nogil=True, cache=True, inline="always")
def _filled(ids):
    """How many members of a set are real: they fill it from the front, placeholders (id −1) follow."""
    if ids[ids.shape[0] - 1] >= 0:
        return ids.shape[0]
    i = 0
    while ids[i] >= 0:
        i += 1
    return i


@numba.njit(nogil=True, cache=True)
def sort_rows(values, ids):
    """Order each row's set by value, descending, then by id, ascending (insertion sort: sets are small)."""
    n, c = values.shape
    for r in range(n):
        v, t = values[r], ids[r]
        for i in range(1, c):
            x, token = v[i], t[i]
            p = i
            while p > 0 and (v[p - 1] < x or (v[p - 1] == x and t[p - 1] > token)):
                v[p], t[p] = v[p - 1], t[p - 1]
                p -= 1
            v[p], t[p] = x, token


@intrinsic
def _dot_float64(typingctx, v, h, ahead):
    """`v · h` of two rows (fp32, or bf16 held as uint16) in float64: LANES interleaved partial sums (a vector
    of doubles; each product of two fp32 values is exact in float64), the ragged tail added to the first,
    then summed pairwise. Prefetches the row `ahead` (one to be scored AHEAD dot products later), whose
    cache misses would stall."""
    def codegen(context, builder, signature, args):
        rows = [context.make_array(t)(context, builder, a) for t, a in zip(signature.args, args)]
        (d,) = cgutils.unpack_tuple(builder, rows[0].shape, 1)
        step = ir.Constant(d.type, LANES)
        body = builder.sub(d, builder.srem(d, step))
        doubles = ir.VectorType(ir.DoubleType(), LANES)
        byte = ir.IntType(8).as_pointer()

        def widened(row, row_type, t, lanes):
            """`lanes` values from t as double(s)."""
            double = ir.VectorType(ir.DoubleType(), lanes) if lanes > 1 else ir.DoubleType()
            return builder.fpext(_float32s(builder, row.data, row_type, t, lanes), double)

        prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [byte, ir.IntType(32), ir.IntType(32), ir.IntType(32)]), "llvm.prefetch.p0i8")
        read, keep, data = (ir.Constant(ir.IntType(32), i) for i in (0, 3, 1))
        acc = cgutils.alloca_once_value(builder, ir.Constant(doubles, [0.0] * LANES))
        with cgutils.for_range_slice(builder, ir.Constant(d.type, 0), body, step) as (t, _):
            x, y = (widened(r, typ, t, LANES) for r, typ in zip(rows[:2], signature.args[:2]))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(x, y)), acc)
            builder.call(prefetch, [builder.bitcast(builder.gep(rows[2].data, [t]), byte), read, keep, data])
        lanes = [builder.extract_element(builder.load(acc), ir.Constant(ir.IntType(32), i)) for i in range(LANES)]
        first = cgutils.alloca_once_value(builder, lanes[0])
        with cgutils.for_range_slice(builder, body, d, ir.Constant(d.type, 1)) as (t, _):
            x, y = (widened(r, typ, t, 1) for r, typ in zip(rows[:2], signature.args[:2]))
            builder.store(builder.fadd(builder.load(first), builder.fmul(x, y)), first)
        lanes[0] = builder.load(first)
        while len(lanes) > 1:
            lanes = [builder.fadd(a, b) for a, b in zip(lanes[::2], lanes[1::2])]
        return lanes[0]
    return types.float64(v, h, ahead), codegen


@numba.njit(nogil=True, cache=True)
def rescore(vectors, weight, ids, out):
    """`out[r, j]` = vectors[r] · weight[ids[r, j]], summed in float64 in a fixed order, stored in fp32;
    0 where the id is negative (nothing to score). `weight` is fp32, or bf16 held as uint16. Pairs are
    scored in order of id: a head row several neurons share is read once, and the reads ascend."""
    m = ids.shape[1]
    if vectors.strides[1] != vectors.itemsize or weight.strides[1] != weight.itemsize:
        raise ValueError("rescore needs rows of adjacent values")
    flat, scores = ids.reshape(-1), out.reshape(-1)
    scores[:] = 0
    order = _order_by_id(flat, weight.shape[0])
    last = len(order) - 1
    for q in range(len(order)):
        pair = order[q]
        following = flat[order[min(q + AHEAD, last)]]
        scores[pair] = np.float32(_dot_float64(vectors[pair // m], weight[flat[pair]], weight[following]))


@numba.njit(nogil=True, cache=True)
def _order_by_id(ids, vocab):
    """Positions of the non-negative entries of `ids`, ordered by id (a counting sort: linear, stable)."""
    start = np.zeros(vocab + 1, np.int64)
    for t in ids:
        if t >= vocab:
            raise ValueError("rescore got a token id beyond the head")
        if t >= 0:
            start[t + 1] += 1
    for t in range(vocab):
        start[t + 1] += start[t]
    order = np.empty(start[vocab], np.int64)
    for p in range(len(ids)):
        t = ids[p]
        if t >= 0:
            order[start[t]] = p
            start[t] += 1
    return order


def set_width(c: int) -> int:
    """Slots of a running set that keeps c values: c raised to a multiple of BLOCK, the scan's vector."""
    return -(-c // BLOCK) * BLOCK


def warm_up() -> None:
    """Load the compiled kernels: numba's first call in a process sets up its compiler (about 0.3 s),
    better spent beside the head's preparation than holding up the lanes."""
    values, ids = np.full((1, BLOCK), -np.inf, np.float32), np.zeros((1, BLOCK), np.int64)
    for logits in (np.zeros((BLOCK, 1), np.float32), np.zeros((BLOCK, 1), np.uint16)):  # fp32 and bf16
        scan_chunk(logits, 0, values, ids, values.copy(), ids.copy())
    sort_rows(values, ids)
    for head in (np.zeros((BLOCK, BLOCK), np.float32), np.zeros((BLOCK, BLOCK), np.uint16)):  # fp32, bf16
        rescore(np.zeros((1, BLOCK), np.float32), head, ids, values)  # the scan left ids 0…BLOCK−1
