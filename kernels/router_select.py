"""Per-half device helpers of the Cartesian router: float keys, vector views, top-a
selection, column ranks.

Legend: n router half width, a = min(K, n) candidates per half, A = next power of two >= a,
K selected experts, E x L a per-token vector of E * L elements held as an [E, L] tile (dim 1
on the lanes, dim 0 in registers: Triton's default layout), P rows packed per scan word, VT the
value type (float32, or float64 when IS64), CH the column chunk of the float64 ranking.

Two views of a vector, both kept in that one layout by a contiguity hint of 1 (so loads and
scattered stores need no shared-memory layout conversion):
- row-major, element (e, l) is index e * L + l: loads are coalesced (used for the n-wide
  inputs); an index-order prefix sum needs a cross-lane scan per row, so P = 4 rows of 0/1
  flags are packed into one int32 (8 bits per row) first;
- lane-chunked, element (e, l) is index l * E + e: each lane owns E consecutive indices, so an
  index-order prefix sum is an in-thread scan plus one warp scan of the lane totals (used for
  the a-wide candidate vectors, read back from scratch).

Order-preserving keys map floats to integers of the same width (int32 for float32, int64 for
float64), -0.0 to +0.0's key, so bisections run over integer keys while the tensor work
compares floats against ``_unkey(mid)``: one float compare per element, and float equality
(-0.0 == +0.0), the order of the reference's sorts.
"""

from __future__ import annotations

import triton
import triton.language as tl

_FLIP64: tl.constexpr = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # order-preserving xor, negative f64
_FLIP32: tl.constexpr = tl.constexpr(0x7FFFFFFF)  # the same for float32 bit patterns
_LOW32: tl.constexpr = tl.constexpr(0xFFFFFFFF)
_I64_MIN: tl.constexpr = tl.constexpr(-0x8000000000000000)
_F32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)  # largest finite float32
_F64_MAX: tl.constexpr = tl.constexpr(1.7976931348623157e308)  # largest finite float64


@triton.jit
def _rank_value(v, IS64: tl.constexpr):
    """The value a score ranks by (``reference.rank_values``): NaN as -inf, +inf as the largest
    finite value of VT, anything else itself. So no pair sum is NaN (inf + -inf cannot occur)
    and every comparison of the searches is a total order: counts are exact for any input, the
    compacted candidates fill their slots, and no uninitialised scratch reaches the output."""
    v = tl.where(v != v, float("-inf"), v)
    if IS64:
        v = tl.where(v > _F64_MAX, _F64_MAX, v)
    else:
        v = tl.where(v > _F32_MAX, _F32_MAX, v)
    return v


@triton.jit
def _key(v, IS64: tl.constexpr):
    """Order-preserving integer image of a float32 (int32) or float64 (int64) tensor."""
    if IS64:
        b = tl.where(v == 0, 0.0, v).to(tl.float64).to(tl.int64, bitcast=True)
        k = tl.where(b < 0, b ^ _FLIP64, b)
    else:
        b = tl.where(v == 0, 0.0, v).to(tl.float32).to(tl.int32, bitcast=True)
        k = tl.where(b < 0, b ^ _FLIP32, b)
    return k


@triton.jit
def _unkey(k, IS64: tl.constexpr):
    """Inverse of ``_key``: the float whose key is k."""
    if IS64:
        v = tl.where(k < 0, k ^ _FLIP64, k).to(tl.float64, bitcast=True)
    else:
        v = tl.where(k < 0, k ^ _FLIP32, k).to(tl.float32, bitcast=True)
    return v


@triton.jit
def _mid(lo, hi):
    """Floor average of two integers of any sign, without overflow."""
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


@triton.jit
def _chunk_offs(E: tl.constexpr, L: tl.constexpr):
    """Indices of a lane-chunked [E, L] vector: element (e, l) is l * E + e."""
    offs_EL = tl.arange(0, E)[:, None] + E * tl.arange(0, L)[None, :]
    return tl.max_contiguous(tl.multiple_of(offs_EL, [1, 1]), [1, 1])


@triton.jit
def _rowmajor_offs(E: tl.constexpr, L: tl.constexpr):
    """Indices of a row-major [E, L] vector: element (e, l) is e * L + l."""
    offs_EL = tl.arange(0, E)[:, None] * L + tl.arange(0, L)[None, :]
    return tl.max_contiguous(tl.multiple_of(offs_EL, [1, 1]), [1, 1])


@triton.jit
def _excl_scan(x_EL):
    """Exclusive prefix sum of a lane-chunked vector in index order."""
    tot_L = tl.sum(x_EL, axis=0)
    return tl.cumsum(x_EL, axis=0) - x_EL + (tl.cumsum(tot_L, axis=0) - tot_L)[None, :]


@triton.jit
def _excl_scan_rowmajor(x_EL):
    """Exclusive prefix sum of a row-major vector of 0/1 flags in index order (L < 256)."""
    E: tl.constexpr = x_EL.shape[0]
    L: tl.constexpr = x_EL.shape[1]
    P: tl.constexpr = 4 if E >= 4 else E
    sh_P = 8 * tl.arange(0, P)
    w_QL = tl.sum(tl.reshape(x_EL, [E // P, P, L]) << sh_P[None, :, None], axis=1)
    incl_EL = tl.reshape(
        (tl.cumsum(w_QL, axis=1)[:, None, :] >> sh_P[None, :, None]) & 0xFF, [E, L]
    )
    tot_E = tl.reshape((tl.sum(w_QL, axis=1)[:, None] >> sh_P[None, :]) & 0xFF, [E])
    return incl_EL - x_EL + (tl.cumsum(tot_E, axis=0) - tot_E)[:, None]


@triton.jit
def _load_rank(v_ptr, offs_EL, ok_EL, IS64: tl.constexpr):
    """(input values, ranking values) in VT of v[offs], -inf where not ok."""
    if IS64:
        raw_EL = tl.load(v_ptr + offs_EL, mask=ok_EL, other=float("-inf")).to(tl.float64)
    else:
        raw_EL = tl.load(v_ptr + offs_EL, mask=ok_EL, other=float("-inf")).to(tl.float32)
    return raw_EL, _rank_value(raw_EL, IS64)


@triton.jit
def _select_half(
    v_ptr, n, a, idx_ptr, val_ptr, E: tl.constexpr, L: tl.constexpr, IS64: tl.constexpr,
    CE: tl.constexpr,
):  # fmt: skip
    """Write the top a of v[0:n] by ranking value (``_rank_value``; stable: lower index first
    among equal values) to idx_ptr[0:a], and their input values to val_ptr[0:a], in ascending
    index order; v is read as a row-major [E, L] vector (coalesced). The a-th largest value is
    bisected over keys, stopping once a probe counts exactly a (~log2(range / gap) rounds for
    continuous values, at most 32 for float32).

    Only the bisection holds the whole vector in registers (E values per lane). The compaction
    re-reads v in [CE, L] chunks (L1 / L2 hits) with a running slot and tie count: keeping the
    whole vector, its slots, flags and store addresses live at once took 168 registers per
    thread at n = 1024 (ptxas, sm_90), 12% occupancy for this one-warp program; CE = E is that
    single-chunk variant (``router_topk.SELECT_CHUNK_ROWS``)."""
    offs_EL = _rowmajor_offs(E, L)
    ok_EL = offs_EL < n
    v_EL = _load_rank(v_ptr, offs_EL, ok_EL, IS64)[1]
    # Invariant: count(v >= unkey(lo)) = cnt_lo >= a > count(v >= unkey(hi)). Probes lie above
    # the minimum, so the -inf padding is never counted.
    lo = _key(tl.min(tl.where(ok_EL, v_EL, float("inf"))), IS64)
    hi = _key(tl.max(v_EL), IS64) + 1
    cnt_lo = n
    active = (lo < hi - 1) & (cnt_lo != a)
    while active:
        mid = _mid(lo, hi)
        cnt = tl.sum((v_EL >= _unkey(mid, IS64)).to(tl.int32))
        big = cnt >= a
        lo = tl.where(big, mid, lo)
        cnt_lo = tl.where(big, cnt, cnt_lo)
        hi = tl.where(big, hi, mid)
        active = (lo < hi - 1) & (cnt_lo != a)
    tau = _unkey(lo, IS64)
    # Values equal to tau straddle the a-th place when cnt_lo > a: the lowest indices of them
    # win, a - n_gt in all; otherwise every value >= tau is kept.
    tied = cnt_lo > a
    n_eq = a
    if tied:
        n_eq -= tl.sum((v_EL > tau).to(tl.int32))
    slot0 = n * 0
    eq0 = n * 0
    for e0 in range(0, E, CE):
        offs_CL = e0 * L + _rowmajor_offs(CE, L)
        ok_CL = offs_CL < n
        raw_CL, r_CL = _load_rank(v_ptr, offs_CL, ok_CL, IS64)
        keep_CL = ok_CL & (r_CL >= tau)
        if tied:
            eq_CL = (keep_CL & (r_CL == tau)).to(tl.int32)
            keep_CL = (keep_CL & (eq_CL == 0)) | (
                (eq_CL > 0) & (eq0 + _excl_scan_rowmajor(eq_CL) < n_eq)
            )
            eq0 += tl.sum(eq_CL)
        keep_i_CL = keep_CL.to(tl.int32)
        slot_CL = slot0 + _excl_scan_rowmajor(keep_i_CL)
        tl.store(idx_ptr + slot_CL, offs_CL, mask=keep_CL)
        # The input values themselves (not their ranking values): the emitted scores are the
        # true sums, so a non-finite router input stays visible in the loss.
        tl.store(val_ptr + slot_CL, raw_CL, mask=keep_CL)
        slot0 += tl.sum(keep_i_CL)


@triton.jit
def _rank_columns(
    c_EL, ok_EL, cval_ptr, a, csort_ptr, crank_ptr, A: tl.constexpr, CH: tl.constexpr,
    IS64: tl.constexpr,
):  # fmt: skip
    """Stable descending ranks of the a candidate columns (lane-chunked, index order; c_EL
    holds their ranking values, cval_ptr their input values): writes the sorted ranking values
    (float64) to csort_ptr[0:a] and each column's rank to crank_ptr[0:a].
    Float32: one ``tl.sort`` of (key << 32 | A - 1 - slot); float64 keys leave no room for
    the slot, so there the rank is counted, #{j: c_j > c_i or (c_j == c_i and j < i)}, in
    CH-column chunks read back from cval_ptr."""
    offs_A = tl.arange(0, A)
    if IS64:
        ok_A = offs_A < a
        c_A = _rank_value(tl.load(cval_ptr + offs_A, mask=ok_A, other=0.0).to(tl.float64), True)
        rank_A = tl.zeros([A], dtype=tl.int32)
        for j0 in range(0, a, CH):
            offs_J = j0 + tl.arange(0, CH)
            c_J = tl.load(cval_ptr + offs_J, mask=offs_J < a, other=0.0).to(tl.float64)
            c_J = _rank_value(c_J, True)
            before_AJ = (c_J[None, :] > c_A[:, None]) | (
                (c_J[None, :] == c_A[:, None]) & (offs_J[None, :] < offs_A[:, None])
            )
            rank_A += tl.sum((before_AJ & (offs_J[None, :] < a)).to(tl.int32), axis=1)
        tl.store(csort_ptr + rank_A, c_A, mask=ok_A)
        tl.store(crank_ptr + offs_A, rank_A, mask=ok_A)
    else:
        E: tl.constexpr = c_EL.shape[0]
        L: tl.constexpr = c_EL.shape[1]
        low_EL = (A - 1 - _chunk_offs(E, L)).to(tl.int64)
        packed_EL = tl.where(ok_EL, (_key(c_EL, False).to(tl.int64) << 32) | low_EL, _I64_MIN)
        packed_A = tl.sort(tl.reshape(packed_EL, [A]), dim=0, descending=True)
        slot_A = A - 1 - (packed_A & _LOW32).to(tl.int32)
        sval_A = _unkey((packed_A >> 32).to(tl.int32), False).to(tl.float64)
        tl.store(csort_ptr + offs_A, sval_A, mask=offs_A < a)
        tl.store(crank_ptr + slot_A, offs_A, mask=offs_A < a)
