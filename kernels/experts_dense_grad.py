"""Expert weight gradients as dense GEMMs, and the choice between them and the pair kernel.

Legend: T tokens, D hidden (columns), N experts, K experts per token, P = T * K pairs, C columns
of one expert chunk (plus one "no expert" column, rounded up to a multiple of 8). The segmented
reductions of ``experts_grad``

    dup_e   = sum_{pairs p of e} g_p * x_{t_p}       (g = dL/dh)
    ddown_e = sum_{pairs p of e} a_p * dy_{t_p}      (a = w * silu(h))

are GEMMs with a sparse left operand: ``dup_ND = G_TN^T @ x_TD`` with
``G[t, e] = sum_k g[t, k] * [ids[t, k] == e]`` (likewise ``ddown_ND = A_TN^T @ dy_TD``). At small
N that dense product on the tensor cores (cuBLAS through ``torch.mm``) costs less than the
latency-bound pair kernel: at ``a80m`` (T=16384, D=768, N=5776, K=64) 8*T*N*D = 0.58 TFLOP
against ~2.6 ms for ``_pair_block_grad_kernel`` on an H200. ``choose_grad_path`` decides per call.

Exactness (the contract of ``experts_grad``): for bf16 rows the coefficient is split into a bf16
high part and a bf16 residual, interleaved in one buffer (column 2e holds G_hi[:, e], 2e + 1
G_lo[:, e]: one 32-bit word per pair), so ONE GEMM ``G^T @ x`` gives both halves' products in
float32 (``torch.mm(..., out_dtype=float32)`` on CUDA; a float32 GEMM of the same bf16 values
on CPU); the two (C, D) halves (even and odd rows of the product) are added in float32 and the
result is rounded once to the table dtype: ~16 mantissa bits of the coefficient, as in the
pair kernel. (Side by side rather than stacked along T: the rows are read as they are, with no
(2T, D) copy of ``[x; x]``.) Other dtypes (float32, float16,
float64: tests and references, never chosen by "auto" on CUDA): one float64 GEMM, so no TF32
or reduced-precision setting of the process can touch it (no global flag is switched).
Opt-in, ``DENSE_COEF = "bf16"`` (``model.expert_grad_coef=bf16``) keeps only the high part:
8 significant bits of the coefficient, as a bf16 Linear layer's weight-gradient GEMM has of
its output gradient, for half the GEMM work and half the buffer.

Building G: when the caller promises distinct ids per token (``distinct_ids``: both routers
guarantee it, ``cartesian_topk`` and ``torch.topk``), each pair writes its coefficient at column
= id with one ``scatter_`` (the "no expert" id N is the dummy column). Otherwise a token's ids
are sorted (stable) and repeats of one id (the public contract allows them) are summed by a
segmented scan in log2(K) fixed-order steps (~6 K-wide launches per step: at K = 64 about 45
launches per call, which on the launch-bound GPU step cost more than their work);
the last pair of each run writes the sum with a plain ``scatter_`` (no two writes meet: no
float atomics), every other pair and every "no expert" pair (id N, see ``experts_pairs``)
writes into a dummy column that is never read. So the result is bitwise repeatable on one
device in both modes (cuBLAS GEMMs are run-to-run reproducible for a fixed shape and stream,
see its documentation; set ``CUBLAS_WORKSPACE_CONFIG`` as torch's reproducibility notes say
when several streams are used). No host synchronisation: capturable in a CUDA graph.

Memory: the G buffer is (T, 2C) bf16 (a80m: 16384 * 2 * 5784 * 2 B = 379 MB; (T, C) float64
for other dtypes), plus a (2C, D) float32 product. ``DENSE_MAX_BYTES`` caps the
buffer: above it the experts are processed in chunks of C columns (each chunk is one GEMM per
table). G is cleared by scattering zeros back at the written positions, not by a memset, and
it is kept between calls (one per device, dtype and shape, see ``_ZeroBuffers``): allocated
per call, zeroing it was a memset of the whole buffer each time (a80m on an H200: 0.11 ms per layer
backward, 0.22 ms under expert-parallel ``dim``; the layer step went 4.84 -> 4.64 ms there,
docs/benchmarks.md). The price: that memory is held for the life of the process, so it adds to
a step's peak when the peak is not in the backward (a80m: +0.3 GiB, 7.2 -> 7.5 GiB per GPU).
"""

from __future__ import annotations

import torch

GRAD_PATHS = ("auto", "dense", "pairs")
#: Forces every call that asks for "auto" onto one path ("dense" or "pairs"); None = decide.
#: For benchmarks and experiments; the argument of a call, when not "auto", wins over it.
FORCE_GRAD_PATH: str | None = None
#: How the dense path holds a pair's float32 coefficient in the bf16 G: "split" (a bf16 high
#: part and a bf16 residual, ~16 significant bits: the exact contract above, the default) or
#: "bf16" (the high part alone, 8 bits: what a bf16 Linear layer's weight-gradient GEMM gets
#: as its output gradient; half the GEMM and half the G buffer). The pair kernel's "experts"
#: schedule (``experts_grad_blocks``) reads it too: one product per chunk instead of two.
#: Process-wide, set from ``model.expert_grad_coef`` for every model built; float32/float64
#: rows ignore it.
COEF_MODES = ("split", "bf16")
DENSE_COEF = "split"
#: Cap on the G buffer of one chunk (bytes); bigger problems run in column chunks. 1 GiB keeps
#: a80m's layer under expert-parallel ``dim`` sharding (2T = 32768 gathered rows, N = 5776:
#: 758 MB) in one chunk: in two chunks its layer step measured 5.25 against 4.87 ms (graphed,
#: overlapped, 2 H200s, docs/benchmarks.md), each chunk scattering and clearing all pairs again.
DENSE_MAX_BYTES = 1 << 30

# Cost model constants (seconds), H200 bf16; ``benchmarks/bench_grad_paths.py`` measures both
# paths on a shape table so these can be refit. The pair kernel costs about PAIR_COLUMN_S per
# (real pair, column) for both tables together (a80m: 2.6 ms / (1,048,576 pairs * 768 columns)).
# The dense path costs 8*T*N*D flops at DENSE_FLOPS (two tables, hi and lo halves) plus
# ~12*T*N bytes of G traffic (scatter, two GEMM reads of the 2T x N bf16 buffer, one memset)
# at HBM_BYTES_PER_S, plus a fixed DENSE_OVERHEAD_S for the build's small launches.
# Refit on an H200 (2026-11-30, bench_grad_paths.py): pairs 3.0-3.4e-12 s per pair-column;
# dense 250-670 TFLOP/s effective with the build included (326 at a80m's d = 768), so 450e12
# (the a priori 600e12 predicted a80m at 1.31 ms against 1.78 measured). Every shape of the
# table kept the faster path under both constants.
# The "experts" schedule of the pair kernel (experts_grad.GRAD_SCHEDULE, twelfth session)
# measured 0.86-1.36e-12 s per pair-column on uniform random routing, but PAIR_COLUMN_S keeps
# the older schedule's 3.2e-12: the model cannot see a trained router's skew, which walks a
# hot expert's run in one program; with 1.0e-12 "auto" put a80m on the pair kernel and its
# training step was slower than on the dense GEMMs (214k vs 236k tokens/s, falling as the
# imbalance grew; docs/benchmarks.md).
PAIR_COLUMN_S = 3.2e-12
DENSE_FLOPS = 450e12
HBM_BYTES_PER_S = 4.0e12
DENSE_OVERHEAD_S = 60e-6


def dense_cost_s(T: int, N: int, D: int, coef: str | None = None) -> float:
    """Modelled seconds of the dense bf16 path (both tables); ``coef`` (default
    ``DENSE_COEF``) "bf16" halves the GEMMs and the G traffic."""
    halves = 1 if (coef or DENSE_COEF) == "bf16" else 2
    flops, g_bytes = 4 * halves * T * N * D, 6 * halves * T * N
    return flops / DENSE_FLOPS + g_bytes / HBM_BYTES_PER_S + DENSE_OVERHEAD_S


def pairs_cost_s(pairs: int, D: int) -> float:
    """Modelled seconds of ``experts_grad.expert_grads`` for ``pairs`` real pairs."""
    return pairs * D * PAIR_COLUMN_S


def choose_grad_path(
    grad_path: str,
    T: int,
    N: int,
    D: int,
    K: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    pairs: int | None = None,
) -> str:
    """Resolve ``grad_path`` ("auto" | "dense" | "pairs") to "dense" or "pairs".

    "auto" (unless ``FORCE_GRAD_PATH`` is set) picks "dense" only for bf16 rows on CUDA where
    ``dense_cost_s(T, N, D) < pairs_cost_s(pairs, D)``; ``pairs`` = the real (token, expert)
    pairs, T * K by default (the expert-parallel ``rows`` layout passes its expected share).
    CPU tensors (the tests, the Triton interpreter) and other dtypes take "pairs": the float32
    GEMM has no tensor-core advantage and the interpreter tests keep exercising the kernel.
    Raises ValueError for an unknown ``grad_path``.
    """
    if grad_path not in GRAD_PATHS:
        raise ValueError(f"grad_path={grad_path!r} must be one of {GRAD_PATHS}")
    if grad_path == "auto" and FORCE_GRAD_PATH is not None:
        grad_path = FORCE_GRAD_PATH
        if grad_path not in GRAD_PATHS[1:]:
            raise ValueError(f"FORCE_GRAD_PATH={grad_path!r} must be 'dense', 'pairs' or None")
    if grad_path != "auto":
        return grad_path
    if device.type != "cuda" or dtype != torch.bfloat16:
        return "pairs"
    real = T * K if pairs is None else pairs
    return "dense" if dense_cost_s(T, N, D) < pairs_cost_s(real, D) else "pairs"


def merged_columns(
    idx_TK: torch.Tensor, coefs: list[torch.Tensor], num_experts: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(col_TK, summed coefficients): the G column each pair writes and the value it writes.

    A token's pairs are sorted by id (stable); each run of one id gets the run's sum on its
    last pair (Hillis-Steele segmented scan: step s adds the value s places back when it has
    the same id, a fixed order), which writes column = id. Every other pair, and every pair
    with id >= ``num_experts`` ("no expert"), gets column ``num_experts`` (the dummy). So the
    columns < num_experts of one token are distinct: a plain scatter writes them exactly.
    """
    ids_TK, perm_TK = torch.sort(idx_TK.long(), dim=1, stable=True)
    vals = [c.gather(1, perm_TK) for c in coefs]
    top_k = ids_TK.shape[1]
    step = 1
    while step < top_k:
        same = ids_TK[:, step:] == ids_TK[:, :-step]
        vals = [
            torch.cat([v[:, :step], v[:, step:] + torch.where(same, v[:, :-step], 0)], dim=1)
            for v in vals
        ]
        step *= 2
    last_TK = torch.ones_like(ids_TK, dtype=torch.bool)
    last_TK[:, :-1] = ids_TK[:, 1:] != ids_TK[:, :-1]
    dummy = torch.full_like(ids_TK, num_experts)
    return torch.where(last_TK & (ids_TK < num_experts), ids_TK, dummy), vals


def _gemm_t(buf_RC: torch.Tensor, rows_RD: torch.Tensor) -> torch.Tensor:
    """buf^T @ rows -> (C, D): float32 with fp32 accumulation for bf16 operands, else in the
    float64 of the operands."""
    bf16 = buf_RC.dtype == torch.bfloat16
    if bf16 and buf_RC.is_cuda:
        return torch.mm(buf_RC.t(), rows_RD, out_dtype=torch.float32)
    if bf16:  # CPU: the same bf16 values in a float32 GEMM (products exact, fp32 sums)
        return torch.mm(buf_RC.t().float(), rows_RD.float())
    return torch.mm(buf_RC.t(), rows_RD)


class _ZeroBuffers:
    """All-zero G buffers kept between calls, one per (device, dtype, shape).

    Why kept: a call writes K coefficients per row and scatters zeros back at the same places,
    so a buffer is all zero again when a call returns, and the next call needs no memset of
    the whole buffer. Never freed or replaced: a CUDA graph captured with a buffer replays
    into its storage (``trainer.cuda_graphs``). A call that stopped between writing and
    clearing (an exception) leaves its buffer marked dirty; the next call zeroes it first.
    A process-wide cache, not thread-safe: one backward at a time per process (as autograd
    runs a step's backward).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._dirty: set[tuple] = set()

    def take(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> tuple:
        """(key, buffer): an all-zero ``shape`` buffer, marked dirty until ``give_back(key)``."""
        key = (device, dtype, shape)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.zeros(shape, dtype=dtype, device=device)
        elif key in self._dirty:
            buf.zero_()
        self._dirty.add(key)
        return key, buf

    def give_back(self, key: tuple) -> None:
        """The buffer is all zero again (every written position was cleared)."""
        self._dirty.discard(key)


ZERO_BUFFERS = _ZeroBuffers()


def _chunk_columns(T: int, N: int, elem_bytes: int, max_bytes: int) -> int:
    """Experts per chunk: all N when the (rows, N + 1 padded) buffer fits ``max_bytes``."""
    fit = max(8, (max_bytes // max(1, T * elem_bytes)) // 8 * 8)
    return min(N, fit - 1)


def dense_table_grads(
    x_TD: torch.Tensor,
    dy_TD: torch.Tensor,
    idx_TK: torch.Tensor,
    g_TK: torch.Tensor,
    h_TK: torch.Tensor,
    w_TK: torch.Tensor,
    num_experts: int,
    *,
    dtype: torch.dtype,
    max_bytes: int | None = None,
    distinct_ids: bool = False,
    coef: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dup[e] = sum_{(t,k): idx=e} g x_t``, ``ddown[e] = sum a dy_t`` (``a = w silu(h)``) as
    dense GEMMs -> two (N, D) tensors in ``dtype`` (rows of unused experts are 0).

    ``idx_TK`` int ids in [0, N]; N = "no expert" (dropped); repeats are summed, unless
    ``distinct_ids`` promises there are none (no id < N twice in a token's row: then the
    merge is skipped; with repeats that promise would drop all but one of them). ``g_TK``,
    ``h_TK`` float32 (float64 with float64 rows), ``w_TK`` any float. bf16 rows take the hi/lo
    split (see the module docstring); the G buffer is at most ``max_bytes`` (default
    ``DENSE_MAX_BYTES``; one chunk of 8 experts is the minimum). ``coef`` (default
    ``DENSE_COEF``): "split" or "bf16", how bf16 rows' coefficients enter G. No host
    synchronisation. Raises ValueError for shapes that do not match or an unknown ``coef``.
    """
    coef = DENSE_COEF if coef is None else coef
    if coef not in COEF_MODES:
        raise ValueError(f"coef={coef!r} must be one of {COEF_MODES}")
    num_tokens, width = x_TD.shape
    if dy_TD.shape != x_TD.shape or {g_TK.shape, h_TK.shape, w_TK.shape} != {idx_TK.shape}:
        raise ValueError(
            f"x {tuple(x_TD.shape)}, dy {tuple(dy_TD.shape)}, g/h/w/indices "
            f"{[tuple(t.shape) for t in (g_TK, h_TK, w_TK, idx_TK)]}"
        )
    if idx_TK.shape[0] != num_tokens:
        raise ValueError(f"indices {tuple(idx_TK.shape)} for {num_tokens} tokens")
    device = x_TD.device
    dup_ND = torch.empty(num_experts, width, dtype=dtype, device=device)
    ddown_ND = torch.empty_like(dup_ND)
    if num_tokens == 0 or idx_TK.shape[1] == 0 or num_experts == 0:
        return dup_ND.zero_(), ddown_ND.zero_()
    acc = torch.promote_types(g_TK.dtype, torch.float32)
    a_TK = w_TK.to(acc) * torch.nn.functional.silu(h_TK.to(acc))
    if distinct_ids:  # ids in [0, N]: N is the dummy column already
        col_TK, g_TK = idx_TK.long(), g_TK.to(acc)
    else:
        col_TK, (g_TK, a_TK) = merged_columns(idx_TK, [g_TK.to(acc), a_TK], num_experts)
    cap = DENSE_MAX_BYTES if max_bytes is None else max_bytes
    for rows_TD, coef_TK, out_ND in ((x_TD, g_TK, dup_ND), (dy_TD, a_TK, ddown_ND)):
        split = rows_TD.dtype == torch.bfloat16 and coef == "split"
        rows = rows_TD
        if rows_TD.dtype != torch.bfloat16:
            # float64 GEMM: immune to TF32 / reduced-precision settings, exact products
            value_TK = coef_TK.to(torch.float64)
            rows = rows_TD.to(torch.float64)
        elif not split:  # one bf16 coefficient per pair
            value_TK = coef_TK.to(torch.bfloat16)
        else:  # hi and lo of the coefficient against the rows: one GEMM, fp32 products
            hi_TK = coef_TK.to(torch.bfloat16)
            lo_TK = (coef_TK - hi_TK.to(acc)).to(torch.bfloat16)
            # A pair's hi and lo side by side in one 32-bit word (columns 2c and 2c + 1 of the
            # bf16 buffer): one scatter of words writes and one clears both halves, in the
            # same memory sectors; two 16-bit scatters into two halves of the buffer wrote
            # twice the sectors (measured: docs/benchmarks.md).
            value_TK = torch.stack((hi_TK, lo_TK), dim=-1).view(torch.int32).squeeze(-1)
        parts = 2 if split else 1
        chunk = _chunk_columns(parts * num_tokens, num_experts, rows.element_size(), cap)
        width = (chunk + 1 + 7) // 8 * 8  # the chunk's columns and the dummy, padded
        key, buf_TC = ZERO_BUFFERS.take((num_tokens, parts * width), rows.dtype, device)
        words_TW = buf_TC.view(torch.int32) if split else buf_TC  # (T, width) either way
        for first in range(0, num_experts, chunk):
            last = min(first + chunk, num_experts)
            if chunk >= num_experts:  # one chunk: ids are the columns (N = dummy = chunk)
                local_TK = col_TK
            else:
                local_TK = col_TK - first
                inside = (local_TK >= 0) & (local_TK < last - first)
                local_TK = torch.where(inside, local_TK, chunk)
            words_TW.scatter_(1, local_TK, value_TK)
            prod = _gemm_t(buf_TC, rows)  # (parts * width, D): hi, lo rows interleaved
            if split:
                n = last - first
                out_ND[first:last] = prod[0 : 2 * n : 2] + prod[1 : 2 * n : 2]
            else:
                out_ND[first:last] = prod[: last - first]
            words_TW.scatter_(1, local_TK, 0)  # clear: all zero again for the next GEMM
        ZERO_BUFFERS.give_back(key)
    return dup_ND, ddown_ND
