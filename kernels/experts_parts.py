"""The atomic-expert layer in parts, for tables split by hidden columns over ranks.

``atomic_experts`` needs the full score ``h = up[e] . x`` before silu, so a rank holding only the
columns ``c`` of U and V (the expert-parallel ``dim`` layout) runs the layer as three local ops
with collectives in between (``omnimoe_train.parallel.dim_sharding``):

    pair_dots(x[:, c], up[:, c], idx)             -> partial h (summed over ranks)
    combine(down[:, c], idx, h, gate=w)            -> y[:, c]    (coefficient w * silu(h))
    pair_dots(dy[:, c], down[:, c], idx)           -> partial da (backward, summed over ranks)
    silu_grads(da, h, w)                           -> g = dL/dh, dw
    combine(up[:, c], idx, g)                      -> dx[:, c]
    table_grads(x[:, c], dy[:, c], idx, g, h, w)   -> dup[:, c], ddown[:, c]

Legend: T tokens, D columns (of the slice), N experts, K experts per token. Each op has a Triton
version (the kernels of ``experts_pairs`` / ``experts_grad``, no host sync) and a PyTorch one
(CPU, tests); ``backend`` picks as in ``omnimoe_kernels``. Scores, coefficients and table
gradients accumulate in float32 (float64 for float64 inputs on the PyTorch path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnimoe_kernels import resolve_backend
from omnimoe_kernels.experts_dense_grad import choose_grad_path, dense_table_grads

# PyTorch path: gathered (pair, D) rows materialised at once (bounds its working memory).
_PAIR_ELEMENTS_PER_CHUNK = 1 << 22


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _token_chunks(num_tokens: int, top_k: int, width: int) -> list[tuple[int, int]]:
    step = max(1, _PAIR_ELEMENTS_PER_CHUNK // max(1, top_k * width))
    return [(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


def _check(rows_TD: torch.Tensor, table_ND: torch.Tensor, idx_TK: torch.Tensor) -> None:
    if rows_TD.dim() != 2 or table_ND.dim() != 2 or rows_TD.shape[1] != table_ND.shape[1]:
        raise ValueError(f"rows {tuple(rows_TD.shape)} and table {tuple(table_ND.shape)}")
    if idx_TK.dim() != 2 or idx_TK.shape[0] != rows_TD.shape[0]:
        raise ValueError(f"indices {tuple(idx_TK.shape)} for {rows_TD.shape[0]} tokens")


def _out_buffer(
    out: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``out`` checked (contiguous, the given shape and dtype), or a new buffer."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"out {tuple(out.shape)} {out.dtype} must be a contiguous {shape} {dtype} tensor"
        )
    return out


def score_dtype(
    rows_dtype: torch.dtype, device: torch.device, backend: str = "auto"
) -> torch.dtype:
    """The dtype ``pair_dots`` returns for rows of ``rows_dtype`` (what an ``out`` must be):
    float32 on the Triton path, the float32-or-wider accumulation type on the PyTorch one."""
    if resolve_backend(backend, device) == "triton":
        return torch.float32
    return _acc_dtype(rows_dtype)


def pair_dots(
    rows_TD: torch.Tensor,
    table_ND: torch.Tensor,
    idx_TK: torch.Tensor,
    *,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``h[t, k] = rows[t] . table[idx[t, k]]`` -> (T, K) float32 (float64 for float64 input),
    written into ``out`` when given (e.g. a row block of a larger buffer: contiguous, that
    shape and dtype, else ``ValueError``)."""
    _check(rows_TD, table_ND, idx_TK)
    num_tokens, top_k = idx_TK.shape
    if resolve_backend(backend, rows_TD.device) == "triton":
        from omnimoe_kernels.experts_autograd import L2_TABLE_BYTES, expert_order
        from omnimoe_kernels.experts_pairs import pair_scores

        rows_TD, table_ND, idx_TK = rows_TD.contiguous(), table_ND.contiguous(), idx_TK.contiguous()
        h_TK = _out_buffer(out, (num_tokens, top_k), torch.float32, rows_TD.device)
        if table_ND.numel() * table_ND.element_size() <= L2_TABLE_BYTES // 2:
            pair_scores(rows_TD, table_ND, idx_TK.reshape(-1), None, top_k, h_TK)
        else:  # expert order: each table row read once per block of its pairs
            key_P, order_P, base = expert_order(idx_TK, table_ND.shape[0])
            pair_scores(rows_TD, table_ND, key_P, order_P, top_k, h_TK, base=base)
        return h_TK
    acc = _acc_dtype(rows_TD.dtype)
    h_TK = _out_buffer(out, (num_tokens, top_k), acc, rows_TD.device)
    for start, end in _token_chunks(num_tokens, top_k, table_ND.shape[1]):
        rows_CKD = table_ND[idx_TK[start:end]].to(acc)
        h_TK[start:end] = torch.einsum("ckd,cd->ck", rows_CKD, rows_TD[start:end].to(acc))
    return h_TK


def combine(
    table_ND: torch.Tensor,
    idx_TK: torch.Tensor,
    coef_TK: torch.Tensor,
    *,
    gate_TK: torch.Tensor | None = None,
    out_dtype: torch.dtype,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = sum_k c[t, k] * table[idx[t, k]]`` -> (T, D) in ``out_dtype``, with
    ``c = gate * silu(coef)`` when ``gate_TK`` is given (the layer's forward), else ``coef``;
    written into ``out`` when given (contiguous, that shape and dtype, else ``ValueError``)."""
    if coef_TK.shape != idx_TK.shape or (gate_TK is not None and gate_TK.shape != idx_TK.shape):
        raise ValueError(f"coefficients {tuple(coef_TK.shape)} / indices {tuple(idx_TK.shape)}")
    num_tokens, width = idx_TK.shape[0], table_ND.shape[1]
    out_TD = _out_buffer(out, (num_tokens, width), out_dtype, table_ND.device)
    if resolve_backend(backend, table_ND.device) == "triton":
        from omnimoe_kernels.experts_pairs import combine_rows

        gate = gate_TK.contiguous() if gate_TK is not None else None
        combine_rows(
            table_ND.contiguous(), idx_TK.contiguous(), coef_TK.contiguous(), out_TD, w_TK=gate
        )
        return out_TD
    acc = _acc_dtype(coef_TK.dtype)
    if num_tokens == 0:
        return out_TD
    coef_TK = coef_TK.to(acc)
    if gate_TK is not None:
        coef_TK = gate_TK.to(acc) * F.silu(coef_TK)
    sums_TD = F.embedding_bag(idx_TK, table_ND.to(acc), per_sample_weights=coef_TK, mode="sum")
    return out_TD.copy_(sums_TD)


def silu_grads(
    da_TK: torch.Tensor, h_TK: torch.Tensor, w_TK: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients through ``a = w * silu(h)`` given ``da = dL/da``: ``g = dL/dh`` (dtype of
    ``da``) and ``dw = dL/dw`` (dtype of ``w``), in one pass (one launch on the Triton path)."""
    if da_TK.shape != h_TK.shape or w_TK.shape != h_TK.shape:
        raise ValueError(f"da {tuple(da_TK.shape)}, h {tuple(h_TK.shape)}, w {tuple(w_TK.shape)}")
    if resolve_backend(backend, da_TK.device) == "triton" and da_TK.dtype == torch.float32:
        from omnimoe_kernels.experts_pairs import silu_grads as silu_grads_triton

        return silu_grads_triton(da_TK, h_TK, w_TK)
    sig_TK = torch.sigmoid(h_TK)
    dw_TK = (da_TK * h_TK * sig_TK).to(w_TK.dtype)
    return da_TK * w_TK.to(da_TK.dtype) * sig_TK * (1 + h_TK * (1 - sig_TK)), dw_TK


def table_grads(
    x_TD: torch.Tensor,
    dy_TD: torch.Tensor,
    idx_TK: torch.Tensor,
    g_TK: torch.Tensor,
    h_TK: torch.Tensor,
    w_TK: torch.Tensor,
    num_experts: int,
    *,
    dtype: torch.dtype,
    backend: str = "auto",
    grad_path: str = "auto",
    distinct_ids: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dup[e] = sum_{(t,k): idx=e} g x_t``, ``ddown[e] = sum a dy_t`` with ``a = w silu(h)``
    -> two (N, D) in ``dtype`` (every row written; experts with no pair get 0). Triton backend:
    ``grad_path`` "pairs" (expert-sorted segmented kernel, ``experts_grad``), "dense" (GEMMs,
    ``experts_dense_grad``) or "auto" (``choose_grad_path`` from the shapes); both fixed-order.
    ``distinct_ids``: no id < N twice in a token's row (the dense path skips merging repeats).
    Raises ValueError for shapes that do not match or an unknown ``grad_path``."""
    shapes = {tuple(t.shape) for t in (g_TK, h_TK, w_TK, idx_TK)}
    if dy_TD.shape != x_TD.shape or len(shapes) != 1:
        raise ValueError(
            f"x {tuple(x_TD.shape)}, dy {tuple(dy_TD.shape)}, g/h/w/indices {sorted(shapes)}"
        )
    num_tokens, width = x_TD.shape
    path = choose_grad_path(
        grad_path, num_tokens, num_experts, width, idx_TK.shape[1], x_TD.dtype, x_TD.device
    )
    triton_backend = resolve_backend(backend, x_TD.device) == "triton"
    if triton_backend and path == "dense":
        return dense_table_grads(
            x_TD, dy_TD, idx_TK, g_TK, h_TK, w_TK, num_experts, dtype=dtype,
            distinct_ids=distinct_ids,
        )  # fmt: skip
    if triton_backend:
        from omnimoe_kernels.experts_autograd import expert_order
        from omnimoe_kernels.experts_grad import expert_grads

        key_P, order_P, base = expert_order(idx_TK.contiguous(), num_experts)
        e_P = key_P.to(torch.int32) + base
        dup_ND = torch.empty(num_experts, width, dtype=dtype, device=x_TD.device)
        ddown_ND = torch.empty_like(dup_ND)
        expert_grads(
            x_TD.contiguous(), dy_TD.contiguous(), order_P, e_P, h_TK.contiguous(),
            w_TK.contiguous(), g_TK.contiguous(), dup_ND, ddown_ND, idx_TK.shape[1],
            deterministic=True,
        )  # fmt: skip
        return dup_ND, ddown_ND
    acc = _acc_dtype(x_TD.dtype)
    dup_ND = torch.zeros(num_experts, width, dtype=acc, device=x_TD.device)
    ddown_ND = torch.zeros_like(dup_ND)
    top_k = idx_TK.shape[1]
    a_TK = w_TK.to(acc) * F.silu(h_TK.to(acc))
    for start, end in _token_chunks(x_TD.shape[0], top_k, width):
        ids = idx_TK[start:end].flatten()
        x_CD, dy_CD = x_TD[start:end].to(acc), dy_TD[start:end].to(acc)
        dup_ND.index_add_(0, ids, (g_TK[start:end, :, None].to(acc) * x_CD[:, None]).flatten(0, 1))
        ddown_ND.index_add_(
            0, ids, (a_TK[start:end, :, None].to(acc) * dy_CD[:, None]).flatten(0, 1)
        )
    return dup_ND.to(dtype), ddown_ND.to(dtype)
