"""Atomic-expert layer in Triton: ``y_t = sum_k w_tk * silu(up[e_tk] . x_t) * down[e_tk]``.

Legend: T tokens, D hidden, N experts, K experts per token, P = T * K (token, expert) pairs.
An expert id equal to N means "no expert": the pair is skipped and contributes 0 to y and to
every gradient (``experts_pairs``); the expert-parallel ``rows`` layout uses it for the pairs of
experts owned by another rank.

Schedule (no host synchronisation anywhere: every size comes from input shapes, so forward and
backward can be captured in a CUDA graph):

forward
    1. sort the P expert ids (``expert_order``: ``torch.sort``, stable, on device) -> expert
       order; skipped when both tables fit in L2 (``L2_TABLE_BYTES``);
    2. ``pair_scores``: h = up_e . x_t per pair, walked in expert order (each expert row read
       once per block of its pairs), or in token order without the sort;
    3. ``combine_rows``: y_t = sum_k w * silu(h) * down_e, a K-way reduction held in registers
       (over each token's range of slots only, given ``pair_ranges``; so is step 2 below).
backward
    0. the expert order, if the forward did not sort;
    (with ``usage_N``: each expert's pair count, read off the sorted ids in one pass, ``usage_counts``)
    1. ``pair_scores`` (backward): da = down_e . dy_t in expert order, then dw and g = dL/dh;
    2. ``combine_rows``: dx_t = sum_k g_tk * up_e;
    3. the weight gradients dup_e = sum g x_t, ddown_e = sum a dy_t, by one of two paths
       (``experts_dense_grad.choose_grad_path``, per call from the shapes, or forced by
       ``grad_path``): ``expert_grads`` (pairs: segmented over the expert runs) or
       ``dense_table_grads`` (dense: two GEMMs with a scattered (T, N) coefficient matrix,
       cheaper at small N). Both accumulate in fp32 in a fixed order without float atomics
       (bitwise repeatable), so ``deterministic`` costs nothing.
"""

from __future__ import annotations

import torch

from omnimoe_kernels.experts_dense_grad import choose_grad_path, dense_table_grads
from omnimoe_kernels.experts_grad import expert_grads
from omnimoe_kernels.experts_pairs import PairRanges, combine_rows, pair_scores
from omnimoe_kernels.limits import EXPERTS_MAX_HIDDEN, EXPERTS_MAX_NUM, EXPERTS_MAX_PAIRS
from omnimoe_kernels.usage_counts import add_pair_counts


def expert_order(
    indices_TK: torch.Tensor, N: int, valid_ids: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(key_P sorted expert keys, order_P int64 flat positions in that order, base): expert
    id = key + base. Keys are 16-bit (ids shifted by base = -2^15 into int16's range: half the
    radix passes) when the ids take at most 2^16 values: ids 0..N (N included: the "no expert"
    id), or 0..N-1 when ``valid_ids`` promises there is no id N (so N = 65,536 fits too: at
    (16384, 1024, 65536, 16) the sort took 0.053 instead of 0.073 ms on an H200); else int32
    with base 0. Left in that form for the forward, which only needs them inside
    ``pair_scores`` (each conversion is another kernel launch)."""
    e_P = indices_TK.reshape(-1)
    if (N if valid_ids else N + 1) <= 1 << 16:
        key_P, order_P = torch.sort((e_P - (1 << 15)).to(torch.int16), stable=True)
        return key_P, order_P, 1 << 15
    key_P, order_P = torch.sort(e_P.to(torch.int32), stable=True)
    return key_P, order_P, 0


# Up to this many bytes of up + down together, the forward gathers their rows in token order
# (no sort): the H100 has 50 MB of L2 (measured: see docs/benchmarks.md).
L2_TABLE_BYTES = 24 << 20


class AtomicExperts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x_TD: torch.Tensor,
        up_ND: torch.Tensor,
        down_ND: torch.Tensor,
        weights_TK: torch.Tensor,
        indices_TK: torch.Tensor,
        deterministic: bool,
        grad_path: str,  # "dense" | "pairs", resolved by the caller
        distinct_ids: bool = False,
        pair_ranges: PairRanges | None = None,
        sort_forward: bool = False,
        valid_ids: bool = False,
        usage_N: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x_TD, up_ND, down_ND = x_TD.contiguous(), up_ND.contiguous(), down_ND.contiguous()
        weights_TK, indices_TK = weights_TK.contiguous(), indices_TK.contiguous()
        T, K = indices_TK.shape
        h_TK = torch.empty(T, K, dtype=torch.float32, device=x_TD.device)
        order = ()
        if 2 * up_ND.numel() * up_ND.element_size() <= L2_TABLE_BYTES and not sort_forward:
            # Both tables stay in L2: gathering their rows in token order costs no more than
            # walking them once per expert, and the forward skips the sort (the backward sorts).
            # Not when most pairs are "no expert" (rows EP: a rank owns 1/P of them): sorted,
            # they come last and their blocks read nothing, where in token order they are
            # spread over the blocks of real pairs; the backward reuses the sort.
            pair_scores(x_TD, up_ND, indices_TK.reshape(-1), None, K, h_TK)
        else:
            key_P, order_P, ctx.base = expert_order(indices_TK, up_ND.shape[0], valid_ids)
            pair_scores(x_TD, up_ND, key_P, order_P, K, h_TK, base=ctx.base)
            order = (key_P, order_P)
        y_TD = torch.empty_like(x_TD)
        ranges = () if pair_ranges is None else tuple(t.contiguous() for t in pair_ranges)
        combine_rows(down_ND, indices_TK, h_TK, y_TD, w_TK=weights_TK, ranges=ranges or None)
        ctx.save_for_backward(x_TD, up_ND, down_ND, weights_TK, indices_TK, h_TK, *ranges, *order)
        ctx.deterministic, ctx.grad_path = deterministic, grad_path
        ctx.distinct_ids, ctx.has_ranges = distinct_ids, pair_ranges is not None
        ctx.valid_ids, ctx.usage_N = valid_ids, usage_N
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD: torch.Tensor):
        x_TD, up_ND, down_ND, w_TK, idx_TK, h_TK, *rest = ctx.saved_tensors
        ranges, order = (tuple(rest[:3]), rest[3:]) if ctx.has_ranges else (None, rest)
        dense = ctx.grad_path == "dense"
        if not order:  # the forward walked token order
            key_P, order_P, ctx.base = expert_order(idx_TK, up_ND.shape[0], ctx.valid_ids)
        else:
            key_P, order_P = order
        e_P = key_P.to(torch.int32) + ctx.base  # expert ids, as the gradient kernels index
        if ctx.usage_N is not None:
            add_pair_counts(ctx.usage_N, e_P)
        dy_TD = dy_TD.contiguous()
        K = idx_TK.shape[1]
        dw_TK = torch.empty_like(h_TK)
        g_TK = torch.empty_like(h_TK)
        pair_scores(dy_TD, down_ND, e_P, order_P, K, h_TK, w_P=w_TK, dw_P=dw_TK, g_P=g_TK)
        dx_TD = torch.empty_like(x_TD)
        combine_rows(up_ND, idx_TK, g_TK, dx_TD, ranges=ranges)
        if dense:
            # The sort's outputs are the pair kernel's; dropped here, they are not held through
            # the GEMMs' (2T, N) buffer (at a80m 14 MB less at the backward's peak).
            del key_P, order_P, e_P, order
            dup_ND, ddown_ND = dense_table_grads(
                x_TD,
                dy_TD,
                idx_TK,
                g_TK,
                h_TK,
                w_TK,
                up_ND.shape[0],
                dtype=up_ND.dtype,
                distinct_ids=ctx.distinct_ids,
            )
        else:
            dup_ND = torch.empty_like(up_ND)
            ddown_ND = torch.empty_like(down_ND)
            expert_grads(
                x_TD, dy_TD, order_P, e_P, h_TK, w_TK, g_TK, dup_ND, ddown_ND, K,
                deterministic=ctx.deterministic,
            )  # fmt: skip
        # None for the non-tensor inputs: idx, deterministic, grad_path, distinct_ids, ranges,
        # sort_forward, valid_ids, usage_N.
        return dx_TD, dup_ND, ddown_ND, dw_TK.to(w_TK.dtype), *(None,) * 8


def atomic_experts_triton(
    x_TD: torch.Tensor,
    up_ND: torch.Tensor,
    down_ND: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
    *,
    deterministic: bool = False,
    grad_path: str = "auto",
    distinct_ids: bool = False,
    pair_ranges: PairRanges | None = None,
    sort_forward: bool = False,
    valid_ids: bool = False,
    usage_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton atomic experts with autograd (fp32 accumulation; output in x's dtype).

    ``grad_path``: "auto" | "dense" | "pairs", the weight-gradient path
    (``experts_dense_grad.choose_grad_path``; resolved in the forward, from the shapes).
    ``distinct_ids``: no id < N twice in a token's row (``experts_dense_grad.dense_table_grads``).
    ``pair_ranges``: (start_T, count_T, order_T), the slots of each token that can hold an id
    < N; both combines (y, dx) read only those (``experts_pairs.combine_rows``). Checked by
    ``omnimoe_kernels.atomic_experts``.
    ``sort_forward``: the forward walks the pairs in expert order even when the tables fit in
    L2 (see ``AtomicExperts``), for pair lists that are mostly "no expert".
    ``valid_ids``: the caller promises every id is < N (no "no expert" pair), so the expert
    sort takes 16-bit keys up to N = 65,536 (``expert_order``); an id N would then be read as
    expert 0.
    ``usage_N``: an (N,) counter (float64 for ``ExpertStats``); the backward adds each expert's
    number of pairs (ids < N) to it, from the expert sort it runs anyway (a call without a
    backward adds nothing).

    Contract (``omnimoe_kernels.atomic_experts``): ``indices_TK`` int32/int64 ids in [0, N],
    repeats allowed; the id N means "no expert" (the pair is skipped: it adds nothing and its
    gradients are 0). Shapes, dtypes and the size limits of ``limits`` are checked here (no
    host sync); the id range is not (that would be one), and an id outside it reads outside
    the tables: ``cartesian_topk`` emits only valid ids, for every input.

    Raises:
        ValueError: shapes that do not match, non-integer ids, N above ``EXPERTS_MAX_NUM``, D
            above ``EXPERTS_MAX_HIDDEN``, T * K above ``EXPERTS_MAX_PAIRS``, an unknown
            ``grad_path``.
    """
    if x_TD.dim() != 2 or up_ND.shape != down_ND.shape or up_ND.shape[1] != x_TD.shape[1]:
        raise ValueError(
            f"x {tuple(x_TD.shape)}, up {tuple(up_ND.shape)}, down {tuple(down_ND.shape)}"
        )
    if weights_TK.shape != indices_TK.shape or indices_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"weights {tuple(weights_TK.shape)} / indices {tuple(indices_TK.shape)}")
    if indices_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64 expert ids (got {indices_TK.dtype})")
    if up_ND.shape[0] > EXPERTS_MAX_NUM:
        raise ValueError(f"N={up_ND.shape[0]} experts: at most {EXPERTS_MAX_NUM}")
    if up_ND.shape[1] > EXPERTS_MAX_HIDDEN:
        raise ValueError(f"D={up_ND.shape[1]} columns: at most {EXPERTS_MAX_HIDDEN}")
    if indices_TK.numel() > EXPERTS_MAX_PAIRS:
        raise ValueError(f"T * K = {indices_TK.numel()} pairs: at most {EXPERTS_MAX_PAIRS}")
    T, D = x_TD.shape
    if T and not (D and indices_TK.shape[1]):
        # No column or no pair per token: every output is zero, and the kernels' tiles would be
        # empty (Triton refuses zero-width ranges). The reference gives the zeros, with autograd.
        from omnimoe_kernels.reference import atomic_experts_reference

        return atomic_experts_reference(x_TD, up_ND, down_ND, weights_TK, indices_TK)
    path = choose_grad_path(
        grad_path, T, up_ND.shape[0], D, indices_TK.shape[1], x_TD.dtype, x_TD.device
    )
    return AtomicExperts.apply(
        x_TD, up_ND, down_ND, weights_TK, indices_TK, deterministic, path, distinct_ids,
        pair_ranges, sort_forward, valid_ids, usage_N,
    )  # fmt: skip
