"""Pure-PyTorch reference implementations of the OmniMoE ops.

These are the semantics every fast implementation is tested against, and the path the model
takes on CPU. Shape suffixes: T tokens, D hidden, N experts, n = sqrt(N) (router half), K top-k.

Neither function synchronises with the host: every shape is known from the inputs' shapes,
so the layer stays capturable in a CUDA graph even on this path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rank_values(x_Tn: torch.Tensor, value_dtype: torch.dtype) -> torch.Tensor:
    """The values router scores rank by, in ``value_dtype`` (float32, or float64): NaN as -inf,
    +inf as the largest finite value, anything else itself.

    This makes the ranking a total order for any input: no pair sum of ranking values is NaN
    (+inf and -inf never meet), so every backend selects K distinct, valid ids. A NaN score
    therefore ranks with -inf, below every finite score (ties by the lowest id, as always).
    """
    v_Tn = x_Tn.detach().to(value_dtype)
    v_Tn = torch.where(v_Tn.isnan(), float("-inf"), v_Tn)
    return v_Tn.clamp(max=torch.finfo(value_dtype).max)


def cartesian_topk_reference(
    rows_Tn: torch.Tensor, cols_Tn: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of all ``rows[i] + cols[j]`` sums; expert id ``i * n + j``.

    The order, for any input (NaN and infinities included; both backends implement it):
    1. every value ranks by its ranking value (``rank_values``: NaN as -inf, +inf as the largest
       finite value of the value type: float32, or float64 when an input is float64);
    2. the candidates of each half are its top min(k, n) ranking values, lower index first among
       equal ones (a stable descending sort);
    3. of the candidate pairs, the k with the largest float64 sums of ranking values are kept,
       ties broken by the lowest expert id.
    The k ids are distinct and in [0, n*n), returned in ascending order (the canonical order
    every backend shares; the layer is invariant to it). Scores are the sums of the inputs
    themselves, formed in float64 and cast to the input dtype through float32 (NaN where an
    input is NaN: a broken router stays visible in the loss).

    Steps 2-3 are the exact top-k of all n*n sums with lowest-id ties whenever the sums are
    exact (a pair outside the candidate grid has k candidate pairs sharing its row or column
    that beat it). Where sums of different values are equal (an infinite half, or float64
    rounding of far-apart values), ties fall to the lowest id within the candidate grid.
    """
    n = rows_Tn.shape[-1]
    if cols_Tn.shape != rows_Tn.shape:
        raise ValueError(f"rows {tuple(rows_Tn.shape)} and cols {tuple(cols_Tn.shape)} differ")
    if not 1 <= k <= n * n:
        raise ValueError(f"k={k} must be in [1, n*n={n * n}]")
    is64 = torch.float64 in (rows_Tn.dtype, cols_Tn.dtype)
    value_dtype = torch.float64 if is64 else torch.float32
    rank_rows_Tn = rank_values(rows_Tn, value_dtype)
    rank_cols_Tn = rank_values(cols_Tn, value_dtype)
    kc = min(k, n)
    # Stable descending sort keeps lower indices first among equal values.
    row_idx_Tc = torch.sort(rank_rows_Tn, dim=-1, descending=True, stable=True).indices[:, :kc]
    col_idx_Tc = torch.sort(rank_cols_Tn, dim=-1, descending=True, stable=True).indices[:, :kc]
    # Re-sort candidates by index so the flattened grid is in ascending expert-id order; a
    # stable sort of the sums then breaks ties by the lowest expert id.
    row_idx_Tc = row_idx_Tc.sort(dim=-1).values
    col_idx_Tc = col_idx_Tc.sort(dim=-1).values
    rows64_Tc = rank_rows_Tn.double().gather(-1, row_idx_Tc)
    cols64_Tc = rank_cols_Tn.double().gather(-1, col_idx_Tc)
    grid_TC = (rows64_Tc[:, :, None] + cols64_Tc[:, None, :]).flatten(1)
    order_TK = torch.sort(grid_TC, dim=-1, descending=True, stable=True).indices[:, :k]
    ids_TC = (row_idx_Tc[:, :, None] * n + col_idx_Tc[:, None, :]).flatten(1)
    ids_TK = ids_TC.gather(-1, order_TK).sort(dim=-1).values
    sums_TK = rows_Tn.double().gather(-1, ids_TK // n) + cols_Tn.double().gather(-1, ids_TK % n)
    scores_TK = sums_TK.float().to(rows_Tn.dtype)
    return scores_TK, ids_TK


def atomic_experts_reference(
    x_TD: torch.Tensor,
    up_ND: torch.Tensor,
    down_ND: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
) -> torch.Tensor:
    """``y_t = sum_k w_tk * silu(up[e_tk] . x_t) * down[e_tk]``, executed expert-sorted.

    The (token, expert) pairs are sorted by expert id, so pairs of one expert are contiguous
    (the expert-centric schedule of the paper); results are scattered back with index_add.
    An id equal to N means "no expert": that pair adds nothing and gets zero gradients.
    Computes in fp32 for bf16/fp16/fp32 inputs and in fp64 for fp64 inputs (test references).
    """
    T, D = x_TD.shape
    K = indices_TK.shape[-1]
    out_dtype = x_TD.dtype
    acc = torch.promote_types(out_dtype, torch.float32)
    e_P = indices_TK.reshape(-1)
    P = e_P.numel()
    # Sorting the unique keys e*P + p equals a stable sort by expert, and is ~10x faster on CPU.
    order_P = torch.argsort(e_P * P + torch.arange(P, device=e_P.device))
    e_sorted_P = e_P.index_select(0, order_P)
    tok_P = order_P // K
    # "No expert" pairs (id N) read row N - 1 and are zeroed by their mask: no host sync.
    real_P = (e_sorted_P < up_ND.shape[0]).to(acc)
    e_sorted_P = e_sorted_P.clamp(max=max(up_ND.shape[0] - 1, 0))
    # index_select (not fancy indexing): its backward is an index_add, not a slow index_put.
    x_PD = x_TD.to(acc).index_select(0, tok_P)
    h_P = (x_PD * up_ND.to(acc).index_select(0, e_sorted_P)).sum(-1)
    a_P = F.silu(h_P) * weights_TK.to(acc).reshape(-1).index_select(0, order_P) * real_P
    y_TD = torch.zeros(T, D, dtype=acc, device=x_TD.device)
    y_TD = y_TD.index_add(0, tok_P, a_P[:, None] * down_ND.to(acc).index_select(0, e_sorted_P))
    return y_TD.to(out_dtype)


def atomic_experts_gather(
    x_TD: torch.Tensor,
    up_ND: torch.Tensor,
    down_ND: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
) -> torch.Tensor:
    """Token-centric execution of the same sum: each token gathers its own K expert rows.

    ``y_t = sum_k w_tk * silu(up[e_tk] . x_t) * down[e_tk]``, computed as PEER's reference code
    does: the gathered rows ``up[e]``, ``down[e]`` are materialised as ``[T, K, D]`` tensors, so an
    expert chosen by many tokens is read once per token (the paper's Table 3 "token-centric"
    ablation; also the PyTorch baseline of ``benchmarks/bench_kernels.py``). Same precision rules
    as :func:`atomic_experts_reference`. Memory: 2 * T * K * D values kept for the backward.
    """
    out_dtype = x_TD.dtype
    acc = torch.promote_types(out_dtype, torch.float32)
    # F.embedding's backward is a dense index_add into the table (no [T, K, N] intermediate).
    up_TKD = F.embedding(indices_TK, up_ND).to(acc)
    down_TKD = F.embedding(indices_TK, down_ND).to(acc)
    h_TK = torch.einsum("td,tkd->tk", x_TD.to(acc), up_TKD)
    a_TK = F.silu(h_TK) * weights_TK.to(acc)
    return torch.einsum("tk,tkd->td", a_TK, down_TKD).to(out_dtype)


def gate_log_probs_reference(
    x_TD: torch.Tensor,
    gates: list[torch.Tensor],
    stats: str | tuple[torch.Tensor, torch.Tensor] | None,
    eps: float = 1e-5,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """The router gate scores as plain PyTorch ops (autograd differentiates them), in the
    gates' dtype promoted to at least fp32: ``log_softmax(norm(x @ W_g^T))`` per gate g.

    ``stats``: "batch" (BatchNorm with the batch mean and biased variance over the T tokens,
    ``torch.var_mean(unbiased=False)``), ``(running_mean_H, running_var_H)`` (H = G*n) or None.
    Returns ([logp_Tn] per gate, entropy_T = -sum exp(logp) logp over every gate (no
    gradient), stats_2H = (mean, unbiased variance) for batch statistics else None).
    """
    dtype = torch.promote_types(gates[0].dtype, torch.float32)
    z_TH = x_TD.to(dtype) @ torch.cat([g.to(dtype) for g in gates]).t()
    batch_stats = None
    if stats == "batch":
        var_H, mean_H = torch.var_mean(z_TH, dim=0, unbiased=False)
        tokens = z_TH.shape[0]
        batch_stats = torch.stack([mean_H, var_H * tokens / max(tokens - 1, 1)]).detach()
        z_TH = (z_TH - mean_H) / torch.sqrt(var_H + eps)
    elif stats is not None:
        z_TH = (z_TH - stats[0].to(dtype)) / torch.sqrt(stats[1].to(dtype) + eps)
    logp = [F.log_softmax(z_Tn, dim=-1) for z_Tn in z_TH.chunk(len(gates), dim=1)]
    with torch.no_grad():
        entropy_T = sum(-(lp.exp() * lp).sum(-1) for lp in logp)
    return logp, entropy_T, batch_stats
