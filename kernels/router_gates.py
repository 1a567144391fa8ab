"""Triton kernels of the router gate scores after the GEMM: BatchNorm statistics, per-gate
log-softmax with the entropy, and their closed-form backward.

Legend: T tokens (this rank's), H = G * n gate scores per token (G gates of n scores each,
concatenated), B = ceil(T / STATS_ROWS) statistics blocks, P = ceil(T / BWD_ROWS) backward
programs, NP = next power of two >= n.

    z = x W^T (cuBLAS),  mu = mean_T z,  var = mean_T (z - mu)^2,  rstd = 1 / sqrt(var + eps),
    zh = (z - mu) * rstd,  y_g = log_softmax_n(zh_g),  entropy = -sum_g sum_n exp(y_g) y_g
    dzh = dy - softmax(zh) * sum_n dy
    dz  = (dzh - mean_T dzh - zh * mean_T(dzh * zh)) * rstd      (batch statistics)

Why our own kernels: as PyTorch ops this is ~20 launches forward and ~15 backward on a T x H
fp32 matrix of ~10 MB (a80m), each a full pass over it plus launch latency; here the forward
is two statistics launches and one fused normalise + log-softmax + entropy pass, the backward
one softmax-gradient pass (softmax recomputed from zh, so y is not saved) and one batch-norm
pass. Every reduction runs in a fixed order into per-block partials (no float atomics), so a
run is bitwise reproducible. The kernels use no ``tl.dot`` (the GEMMs stay cuBLAS), so the CPU
interpreter runs the same arithmetic.

Statistics (numerically safe: shifted data, two-pass per block, Chan et al.'s merge across
blocks): ``_col_partials`` writes per block b of STATS_ROWS rows the column sum s_b of z - K
(K = the first row of z: block means of shifted data keep their low digits when the mean is
large against the spread) and the sum m2_b of squared deviations from the block's own mean;
``_col_stats`` merges them: S' = sum_b s_b, mean = K + S' / T_all, M2 = sum_b m2_b + c_b (s_b /
c_b - S' / T_all)^2 (c_b rows in block b). S = S' + T K and M2 are sums over tokens, so under
sequence parallelism S and then M2 are all-reduced between launches of ``_col_stats``
(phases), as the PyTorch path all-reduces its sums (each rank's shift is its own first row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows x columns of one statistics block: 128 x 32 fp32 (16 KB) per program in registers
# (8 warps: 16 per thread).
STATS_ROWS = 128
STATS_COLS = 32
# Partial-statistics rows merged per step of ``_col_stats``.
MERGE_ROWS = 64
# Elements of one [tokens, NP] tile of the softmax kernels (tokens = max(1, TILE // NP)), over
# 8 warps at least: 8 floats per thread per live tile. ptxas for sm_90 at n = 76 and 1024, two
# gates: 112 / 62 registers forward, 97 / 80 backward; 4096 over 4 warps spilled (255 + stack).
TILE = 2048
# Tokens per backward program (its partial column sums cover that many rows): 256 programs at
# T = 16384, so the (P, 2, H) partials stay small (4 MB at H = 2048) while the grid still fills
# the GPU.
BWD_ROWS = 64
# Rows per program of the batch-norm backward (tiles of BN_ROWS x STATS_COLS).
BN_ROWS = 64


@triton.jit
def _col_partials(z_ptr, part_ptr, T, H, ROWS: tl.constexpr, BH: tl.constexpr):
    """Block b, columns c: part[b, 0, c] = sum over the block's rows of z - z[0] (the shift),
    part[b, 1, c] = sum of squared deviations from the block's mean. Grid (B, ceil(H / BH))."""
    b = tl.program_id(0)
    rows = b * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    ok = (rows < T)[:, None] & (cols < H)[None, :]
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], mask=ok, other=0.0)
    z = tl.where(ok, z - tl.load(z_ptr + cols, mask=cols < H, other=0.0)[None, :], 0.0)
    count = tl.minimum(T - b * ROWS, ROWS).to(tl.float32)
    s = tl.sum(z, axis=0)
    d = tl.where(ok, z - (s / count)[None, :], 0.0)
    m2 = tl.sum(d * d, axis=0)
    out = part_ptr + b.to(tl.int64) * 2 * H + cols
    tl.store(out, s, mask=cols < H)
    tl.store(out + H, m2, mask=cols < H)


@triton.jit
def _col_stats(
    z_ptr,  # (T, H): its first row is the shift of the partials
    part_ptr,  # (B, 2, H) from _col_partials
    sum_ptr,  # (H,) S = sum z: written by the SUM phase, else read (all-reduced by the caller)
    m2_ptr,  # (H,) M2: written by the M2 phase, else read
    mean_ptr,  # (H,) out (FINISH): mean
    rstd_ptr,  # (H,) out (FINISH): 1 / sqrt(var + eps)
    stats_ptr,  # (2, H) out (FINISH): mean, unbiased variance
    T,  # this rank's tokens
    tokens,  # tokens of the whole statistics group (float)
    unbiased,  # max(tokens - 1, 1) (float)
    H,
    eps,
    DO_SUM: tl.constexpr,
    DO_M2: tl.constexpr,
    DO_FINISH: tl.constexpr,
    ROWS: tl.constexpr,
    BB: tl.constexpr,
    BH: tl.constexpr,
):
    """Merge the block partials of BH columns in a fixed order. Grid (ceil(H / BH),)."""
    cols = tl.program_id(0) * BH + tl.arange(0, BH)
    cok = cols < H
    nb = tl.cdiv(T, ROWS)
    shift = tl.load(z_ptr + cols, mask=cok, other=0.0)
    if DO_SUM:
        acc = tl.zeros([BB, BH], dtype=tl.float32)
        for b0 in range(0, nb, BB):
            blk = b0 + tl.arange(0, BB)
            ok = (blk < nb)[:, None] & cok[None, :]
            offs = blk.to(tl.int64)[:, None] * 2 * H + cols[None, :]
            acc += tl.load(part_ptr + offs, mask=ok, other=0.0)
        s_shifted = tl.sum(acc, axis=0)
        if DO_M2:  # one process: the mean from the shifted sum keeps its low digits
            mean_shifted = s_shifted / tokens
            mean = shift + mean_shifted
        else:
            tl.store(sum_ptr + cols, s_shifted + T * shift, mask=cok)
    else:
        mean = tl.load(sum_ptr + cols, mask=cok, other=0.0) / tokens
        mean_shifted = mean - shift
    if DO_M2:
        acc = tl.zeros([BB, BH], dtype=tl.float32)
        for b0 in range(0, nb, BB):
            blk = b0 + tl.arange(0, BB)
            ok = (blk < nb)[:, None] & cok[None, :]
            offs = blk.to(tl.int64)[:, None] * 2 * H + cols[None, :]
            count = tl.minimum(T - blk * ROWS, ROWS).to(tl.float32)[:, None]
            s_b = tl.load(part_ptr + offs, mask=ok, other=0.0)
            m2_b = tl.load(part_ptr + offs + H, mask=ok, other=0.0)
            d = tl.where(ok, s_b / count - mean_shifted[None, :], 0.0)
            acc += m2_b + count * d * d
        m2 = tl.sum(acc, axis=0)
        if not DO_FINISH:
            tl.store(m2_ptr + cols, m2, mask=cok)
    else:
        m2 = tl.load(m2_ptr + cols, mask=cok, other=0.0)
    if DO_FINISH:
        tl.store(mean_ptr + cols, mean, mask=cok)
        tl.store(rstd_ptr + cols, 1.0 / tl.sqrt_rn(m2 / tokens + eps), mask=cok)
        tl.store(stats_ptr + cols, mean, mask=cok)
        tl.store(stats_ptr + H + cols, m2 / unbiased, mask=cok)


@triton.jit
def _softmax_rows(zh, cok):
    """(exp(zh - max), their sum, the max) over the valid columns of each row of a [BT, NP]
    tile; the invalid columns give exp = 0."""
    zm = tl.where(cok[None, :], zh, float("-inf"))
    mx = tl.max(zm, axis=1)
    e = tl.exp(zm - mx[:, None])
    return e, tl.sum(e, axis=1), mx


@triton.jit
def _gates_fwd(
    z_ptr,  # (T, H) in: z; out: zh (when NORM), the tensor saved for the backward
    mean_ptr,  # (H,) mean (NORM)
    rstd_ptr,  # (H,) 1 / sqrt(var + eps) (NORM)
    y_ptr,  # (G, T, n) out: log-probabilities, one contiguous (T, n) block per gate
    ent_ptr,  # (T,) out: entropy of the product distribution
    T,
    n,
    H,
    G: tl.constexpr,
    NP: tl.constexpr,
    BT: tl.constexpr,
    NORM: tl.constexpr,
):
    """Normalise, log-softmax per gate, entropy; BT tokens per program. Grid (ceil(T / BT),)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rok = rows < T
    rows = rows.to(tl.int64)
    cols = tl.arange(0, NP)
    cok = cols < n
    ok = rok[:, None] & cok[None, :]
    ent = tl.zeros([BT], dtype=tl.float32)
    for g in tl.static_range(G):
        offs = rows[:, None] * H + g * n + cols[None, :]
        zh = tl.load(z_ptr + offs, mask=ok, other=0.0)
        if NORM:
            mu = tl.load(mean_ptr + g * n + cols, mask=cok, other=0.0)
            rs = tl.load(rstd_ptr + g * n + cols, mask=cok, other=1.0)
            zh = (zh - mu[None, :]) * rs[None, :]
            tl.store(z_ptr + offs, zh, mask=ok)
        e, s, mx = _softmax_rows(zh, cok)
        y = zh - (mx + tl.log(s))[:, None]
        tl.store(y_ptr + (rows + g * T)[:, None] * n + cols[None, :], y, mask=ok)
        ent -= tl.sum(tl.where(ok, (e / s[:, None]) * y, 0.0), axis=1)
    tl.store(ent_ptr + rows, ent, mask=rok)


@triton.jit
def _gates_bwd(
    zh_ptr,  # (T, H) saved zh (z without norm)
    dy0_ptr,  # (T, n) gradient of gate 0's log-probabilities, strides (s0t, s0n)
    dy1_ptr,  # (T, n) gate 1's (G = 2), strides (s1t, s1n)
    s0t,
    s0n,
    s1t,
    s1n,
    rstd_ptr,  # (H,) (MODE 1)
    dz_ptr,  # (T, H) out: dzh (MODE 0, 2) or dzh * rstd (MODE 1)
    part_ptr,  # (P, 2, H) out (MODE 2): column sums of dzh and of dzh * zh per program
    T,
    n,
    H,
    G: tl.constexpr,
    NP: tl.constexpr,
    BT: tl.constexpr,
    SUB: tl.constexpr,
    MODE: tl.constexpr,  # 0 no norm, 1 running statistics, 2 batch statistics
):
    """dzh = dy - softmax(zh) * sum_n dy, softmax recomputed from zh; SUB tiles of BT tokens
    per program, so its partial column sums cover BT * SUB rows. Grid (ceil(T / (BT*SUB)),)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, NP)
    cok = cols < n
    for g in tl.static_range(G):
        if g == 0:
            dy_ptr, st, sn = dy0_ptr, s0t, s0n
        else:
            dy_ptr, st, sn = dy1_ptr, s1t, s1n
        if MODE == 1:
            rs = tl.load(rstd_ptr + g * n + cols, mask=cok, other=0.0)
        acc = tl.zeros([BT, NP], dtype=tl.float32)
        acc_z = tl.zeros([BT, NP], dtype=tl.float32)
        for i in range(SUB):
            rows = (pid * SUB + i) * BT + tl.arange(0, BT)
            ok = (rows < T)[:, None] & cok[None, :]
            rows = rows.to(tl.int64)
            offs = rows[:, None] * H + g * n + cols[None, :]
            zh = tl.load(zh_ptr + offs, mask=ok, other=0.0)
            dy = tl.load(dy_ptr + rows[:, None] * st + cols[None, :] * sn, mask=ok, other=0.0)
            e, s, _ = _softmax_rows(zh, cok)
            dzh = dy - (e / s[:, None]) * tl.sum(dy, axis=1)[:, None]
            if MODE == 1:
                dzh *= rs[None, :]
            tl.store(dz_ptr + offs, dzh, mask=ok)
            if MODE == 2:
                acc += dzh
                acc_z += dzh * zh
        if MODE == 2:
            out = part_ptr + pid.to(tl.int64) * 2 * H + g * n + cols
            tl.store(out, tl.sum(acc, axis=0), mask=cok)
            tl.store(out + H, tl.sum(acc_z, axis=0), mask=cok)


@triton.jit
def _bn_bwd(dz_ptr, zh_ptr, sums_ptr, rstd_ptr, tokens, T, H, BR: tl.constexpr, BH: tl.constexpr):
    """In place on a [BR, BH] tile: dz = (dzh - S1 / tokens - zh * S2 / tokens) * rstd, with
    sums = (S1_H, S2_H). Grid (ceil(T / BR), ceil(H / BH))."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    cok = cols < H
    ok = (rows < T)[:, None] & cok[None, :]
    a = tl.load(sums_ptr + cols, mask=cok, other=0.0) / tokens
    b = tl.load(sums_ptr + H + cols, mask=cok, other=0.0) / tokens
    rs = tl.load(rstd_ptr + cols, mask=cok, other=0.0)
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
    dzh = tl.load(dz_ptr + offs, mask=ok, other=0.0)
    zh = tl.load(zh_ptr + offs, mask=ok, other=0.0)
    tl.store(dz_ptr + offs, (dzh - a[None, :] - zh * b[None, :]) * rs[None, :], mask=ok)


def _tile(n: int) -> tuple[int, int, int]:
    """(NP, BT tokens per tile, warps) of the softmax kernels for n scores per gate."""
    np2 = triton.next_power_of_2(n)
    return np2, max(1, TILE // np2), min(16, max(8, np2 // 256))


def column_partials(z_TH: torch.Tensor) -> torch.Tensor:
    """(B, 2, H) per-block column sums and squared deviations from the block means."""
    T, H = z_TH.shape
    part = torch.empty(triton.cdiv(T, STATS_ROWS), 2, H, dtype=torch.float32, device=z_TH.device)
    grid = (part.shape[0], triton.cdiv(H, STATS_COLS))
    _col_partials[grid](z_TH, part, T, H, ROWS=STATS_ROWS, BH=STATS_COLS, num_warps=8)
    return part


def column_stats(
    z_TH: torch.Tensor,
    part: torch.Tensor,
    T: int,
    tokens: int,
    eps: float,
    phase: str,
    sum_H: torch.Tensor,
    m2_H: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Merge the partials of ``column_partials(z_TH)``: ``phase`` "all" -> (mean_H, rstd_H, stats_2H = (mean, unbiased
    var)); "sum" writes S into ``sum_H``; "m2" reads S from ``sum_H`` and writes M2 into
    ``m2_H``; "finish" reads both and returns the triple (the caller all-reduces in between)."""
    H = part.shape[2]
    mean_H, rstd_H = torch.empty_like(sum_H), torch.empty_like(sum_H)
    stats_2H = torch.empty(2, H, dtype=torch.float32, device=part.device)
    flags = {"all": (1, 1, 1), "sum": (1, 0, 0), "m2": (0, 1, 0), "finish": (0, 0, 1)}[phase]
    _col_stats[(triton.cdiv(H, STATS_COLS),)](
        z_TH, part, sum_H, m2_H, mean_H, rstd_H, stats_2H, T, float(tokens),
        float(max(tokens - 1, 1)), H, eps,
        DO_SUM=bool(flags[0]), DO_M2=bool(flags[1]), DO_FINISH=bool(flags[2]),
        ROWS=STATS_ROWS, BB=MERGE_ROWS, BH=STATS_COLS, num_warps=4,
    )  # fmt: skip
    return (mean_H, rstd_H, stats_2H) if flags[2] else None


def gates_forward(
    z_TH: torch.Tensor,
    num_gates: int,
    mean_H: torch.Tensor | None,
    rstd_H: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_GTn log-probabilities, entropy_T); with ``mean_H``/``rstd_H`` given, z_TH is
    normalised in place (it becomes zh). Without them (no norm) z_TH is left as it is."""
    T, H = z_TH.shape
    n = H // num_gates
    y_GTn = torch.empty(num_gates, T, n, dtype=torch.float32, device=z_TH.device)
    ent_T = torch.empty(T, dtype=torch.float32, device=z_TH.device)
    np2, bt, warps = _tile(n)
    norm = mean_H is not None
    _gates_fwd[(triton.cdiv(T, bt),)](
        z_TH, mean_H if norm else z_TH, rstd_H if norm else z_TH, y_GTn, ent_T, T, n, H,
        G=num_gates, NP=np2, BT=bt, NORM=norm, num_warps=warps,
    )  # fmt: skip
    return y_GTn, ent_T


def gates_backward(
    zh_TH: torch.Tensor,
    dys: list[torch.Tensor],
    rstd_H: torch.Tensor | None,
    batch: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dz_TH, partial sums (P, 2, H) of dzh and dzh * zh or None): dz is dzh (batch
    statistics: the batch-norm term is ``batchnorm_backward``'s), dzh * rstd (running
    statistics, ``rstd_H`` given) or dzh (no norm)."""
    T, H = zh_TH.shape
    G = len(dys)
    n = H // G
    np2, bt, warps = _tile(n)
    sub = max(1, BWD_ROWS // bt)
    programs = triton.cdiv(T, bt * sub)
    dz_TH = torch.empty_like(zh_TH)
    part = torch.empty(programs if batch else 1, 2, H, dtype=torch.float32, device=zh_TH.device)
    dy1 = dys[-1]
    mode = 2 if batch else (1 if rstd_H is not None else 0)
    _gates_bwd[(programs,)](
        zh_TH, dys[0], dy1, dys[0].stride(0), dys[0].stride(1), dy1.stride(0), dy1.stride(1),
        rstd_H if rstd_H is not None else zh_TH, dz_TH, part, T, n, H,
        G=G, NP=np2, BT=bt, SUB=sub, MODE=mode, num_warps=warps,
    )  # fmt: skip
    return dz_TH, (part if batch else None)


def batchnorm_backward(
    dz_TH: torch.Tensor, zh_TH: torch.Tensor, sums_2H: torch.Tensor, rstd_H: torch.Tensor, tokens
) -> torch.Tensor:
    """In place on ``dz_TH`` (holding dzh): (dzh - S1 / tokens - zh * S2 / tokens) * rstd."""
    T, H = dz_TH.shape
    grid = (triton.cdiv(T, BN_ROWS), triton.cdiv(H, STATS_COLS))
    _bn_bwd[grid](
        dz_TH, zh_TH, sums_2H, rstd_H, float(tokens), T, H, BR=BN_ROWS, BH=STATS_COLS, num_warps=4
    )
    return dz_TH
