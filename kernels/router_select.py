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
  the a-wide candidate vectors, read back from scratch, and for the n-wide inputs in
  ``_select_half_lanes``, read through a [E / 4, L, 4] view: 16-byte vector loads, each lane's
  indices contiguous, the same registers and lanes as the [E, L] view).

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
def _lane_bracket(r_EL, S: tl.constexpr, IS64: tl.constexpr):
    """(lo, hi) keys bracketing the a-th largest of a lane-chunked [E, L] vector of ranking
    values (padding -inf), with S * L >= a groups (S per lane, E / S elements each): every
    group has its maximum >= lo = the least group maximum, so count(>= lo) >= S * L >= a;
    hi = key(max) + 1. S = 0: lo = key(min), as ``_select_half``."""
    E: tl.constexpr = r_EL.shape[0]
    L: tl.constexpr = r_EL.shape[1]
    if S == 0:
        m_L = tl.max(r_EL, axis=0)
        lo = _key(tl.min(r_EL), IS64)
    else:
        m_SL = tl.max(tl.reshape(r_EL, [S, E // S, L]), axis=1)
        m_L = tl.max(m_SL, axis=0)
        lo = _key(tl.min(m_SL), IS64)
    return lo, _key(tl.max(m_L), IS64) + 1


@triton.jit
def _lane_tile(v_ptr, e0, n, E: tl.constexpr, L: tl.constexpr, CE: tl.constexpr,
               IS64: tl.constexpr):  # fmt: skip
    """(values in VT, indices) of the [CE, L] tile of a lane-chunked [E, L] vector holding
    rows e0 .. e0 + CE - 1 (index l * E + e), -inf past n. Read as a [CE / V, L, V] tile: V
    consecutive indices per lane and load (one vector load where n allows it), in the same
    registers and lanes as the [CE, L] view."""
    V: tl.constexpr = 4 if CE >= 4 else CE
    offs_QLV = (
        e0
        + tl.arange(0, CE // V)[:, None, None] * V
        + tl.arange(0, L)[None, :, None] * E
        + tl.arange(0, V)[None, None, :]
    )
    raw_QLV = tl.load(v_ptr + offs_QLV, mask=offs_QLV < n, other=float("-inf"))
    if IS64:
        raw_QLV = raw_QLV.to(tl.float64)
    else:
        raw_QLV = raw_QLV.to(tl.float32)
    raw_CL = tl.reshape(tl.permute(raw_QLV, (0, 2, 1)), [CE, L])
    return raw_CL, tl.reshape(tl.permute(offs_QLV, (0, 2, 1)), [CE, L])


@triton.jit
def _sign_sum(d_EL, IS64: tl.constexpr):
    """Per lane, minus the number of elements of d with the sign bit set: d = r - t is
    negative exactly when r < t for ranking values r (no NaN, no -0.0, no +inf) and a probe t
    (-inf < t <= the largest finite value; t = -0.0 gives r - t = +0.0 at r = +0.0): every
    difference of two such floats rounds to a result of its true sign or to +0.0 at r = t
    (also flushed to zero: -0.0 then keeps the sign), and an overflow is an infinity of
    the right sign. An arithmetic shift and an add per element, where a compare and a
    select-and-add cost more instructions (ptxas, sm_90)."""
    if IS64:
        s_EL = (d_EL.to(tl.int64, bitcast=True) >> 63).to(tl.int32)
    else:
        s_EL = d_EL.to(tl.int32, bitcast=True) >> 31
    return tl.sum(s_EL, axis=0)


@triton.jit
def _lane_excl_scan(x_L):
    """Exclusive prefix sum over the lanes of a per-lane vector."""
    return tl.cumsum(x_L, axis=0) - x_L


@triton.jit
def _select_half_lanes(
    v_ptr, n, a, idx_ptr, val_ptr, E: tl.constexpr, L: tl.constexpr, IS64: tl.constexpr,
    S: tl.constexpr, CE: tl.constexpr,
):  # fmt: skip
    """``_select_half``'s result (the same a indices and input values in the same slots) with
    the vector lane-chunked: lane l holds indices l * E .. l * E + E - 1, read by vector loads
    (``_lane_tile``). An index-order prefix sum is then an in-thread scan plus one warp scan
    of per-lane totals instead of a cross-lane scan per row: the kept count of each lane is
    carried out of the bisection (the round that set lo counted it), so the compaction re-reads
    the half in [CE, L] chunks (L1 hits) with a per-lane running slot. The bisection starts
    from ``_lane_bracket`` (S > 0), not from (min, max).

    The bisection compares the input values themselves: its probes t lie strictly between
    two ranking-value keys, so -inf < t <= the largest finite value, where v >= t and
    ``_rank_value(v) >= t`` agree for NaN and +inf too; so does v >= tau at the end unless
    the search never moved lo (then cnt_lo = n > a and the tie path uses ranking values)."""
    raw_EL, offs_EL = _lane_tile(v_ptr, 0, n, E, L, E, IS64)
    r_EL = _rank_value(raw_EL, IS64) + 0.0  # + 0.0: -0.0 becomes +0.0 (for the sign count)
    lo, hi = _lane_bracket(r_EL, S, IS64)
    # Invariant: count(v >= unkey(lo)) >= a > count(v >= unkey(hi)); cnt_lo (per lane: cnt_L)
    # that count once lo has moved (n before: an exact count of a ends the search early).
    cnt_lo = n
    cnt_L = tl.zeros([L], dtype=tl.int32)
    active = (lo < hi - 1) & (cnt_lo != a)
    while active:
        mid = _mid(lo, hi)
        c_L = E + _sign_sum(r_EL - _unkey(mid, IS64), IS64)
        cnt = tl.sum(c_L)
        big = cnt >= a
        lo = tl.where(big, mid, lo)
        cnt_lo = tl.where(big, cnt, cnt_lo)
        cnt_L = tl.where(big, c_L, cnt_L)
        hi = tl.where(big, hi, mid)
        active = (lo < hi - 1) & (cnt_lo != a)
    tau = _unkey(lo, IS64)
    tied = cnt_lo > a
    eq0_L = cnt_L * 0
    n_eq = a
    if tied:  # values equal to tau straddle the a-th place: the lowest indices of them win
        gt_L = tl.sum((r_EL > tau).to(tl.int32), axis=0)
        eq_L = tl.sum(((r_EL == tau) & (offs_EL < n)).to(tl.int32), axis=0)
        n_eq = a - tl.sum(gt_L)
        eq0_L = _lane_excl_scan(eq_L)
        cnt_L = gt_L + tl.minimum(tl.maximum(n_eq - eq0_L, 0), eq_L)
    slot0_L = _lane_excl_scan(cnt_L)
    for e0 in range(0, E, CE):
        raw_CL, offs_CL = _lane_tile(v_ptr, e0, n, E, L, CE, IS64)
        if tied:
            r_CL = _rank_value(raw_CL, IS64)
            eq_CL = ((r_CL == tau) & (offs_CL < n)).to(tl.int32)
            eq_rank_CL = eq0_L[None, :] + tl.cumsum(eq_CL, axis=0) - eq_CL
            keep_CL = (r_CL > tau) | ((eq_CL > 0) & (eq_rank_CL < n_eq))
            eq0_L += tl.sum(eq_CL, axis=0)
        else:
            keep_CL = raw_CL >= tau
        keep_i_CL = keep_CL.to(tl.int32)
        slot_CL = slot0_L[None, :] + tl.cumsum(keep_i_CL, axis=0) - keep_i_CL
        tl.store(idx_ptr + slot_CL, offs_CL, mask=keep_CL)
        tl.store(val_ptr + slot_CL, raw_CL, mask=keep_CL)
        slot0_L += tl.sum(keep_i_CL, axis=0)


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
