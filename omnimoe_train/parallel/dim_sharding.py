"""``dim`` sharding: every rank holds all N expert rows, but only D/P columns of U and V.

The memory-layer / UltraMem dimension partition, adapted to OmniMoE's nonlinearity: silu needs
the FULL score up[e] . x, so the partial scores of the D/P slices are summed before the
activation. One call on rank r (T own tokens, G of the group, Dp = D/P; legend in
``collectives``; every size is known on the host, so nothing waits on it):

    x, ids, w  all-to-all, one packed exchange: x[:, slice q], the (T, K) int32 expert ids and
               the routing weights of my tokens to every rank q -> (G, Dp) x of my slice and
               the (G, K) ids and weights of the group
    h          partial scores on my slice (``experts_parts.pair_dots``), fp32 (G, K),
               all-reduced: every rank has the full h of the group's pairs
    y          y[:, slice] = sum_k w * silu(h) * V[e, slice] (``experts_parts.combine``, the
               gated Triton combine) for all G tokens; all-to-all back, each source assembles
               its (T, D) rows from the P slices

Backward (one autograd node, collectives in a fixed order): dy slices out (all-to-all), partial
da = dy . V[e, slice] all-reduced, g = dL/dh and dw from (da, h, w) in one kernel, dx slices =
sum_k g * U[e, slice] sent back (all-to-all, overlapped with the table gradients dU, dV of the
slice, which never leave the rank); dw of my tokens is my rows of the group's dw.

Three collectives each way. Every rank computes all G*K pairs on D/P columns: the same work as
one GPU on its own T*K pairs with all D columns, whatever the routing (no load imbalance).
Scores travel in fp32 (cancellation-prone sums of D/P products). Bytes a rank sends (b
activation bytes, w weight bytes, s = 4 score bytes, equal T, ring all-reduce):
forward 2*(P-1)*T*(D/P)*b + (P-1)*T*K*(4 + w + 2*s); backward 2*(P-1)*T*(D/P)*b + 2*(P-1)*T*K*s.
Nothing depends on N.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from omnimoe_kernels import experts_parts
from omnimoe_train.parallel.collectives import GroupComm, ShardingStats, unpack_rows


def _to_owners(comm: GroupComm, t_TD: torch.Tensor, width: int) -> torch.Tensor:
    """(T, P*width) -> (P*T, width): block q holds column slice q of my tokens."""
    num_tokens = t_TD.shape[0]
    return t_TD.reshape(num_tokens, comm.size, width).transpose(0, 1).reshape(-1, width)


def _from_owners(comm: GroupComm, t_PTw: torch.Tensor) -> torch.Tensor:
    """(P*T, width) slices back from every rank -> (T, P*width) rows."""
    width = t_PTw.shape[1]
    return (
        t_PTw.view(comm.size, comm.mine, width)
        .transpose(0, 1)
        .reshape(comm.mine, comm.size * width)
    )


class _DimExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, up_NDp, down_NDp, weights_TK, ids_TK, comm: GroupComm, backend: str):
        num_tokens, top_k = ids_TK.shape
        width = up_NDp.shape[1]
        acc = torch.promote_types(x_TD.dtype, torch.float32)
        # One exchange: block q = (x[:, slice q], my ids, my weights), as bytes.
        x_bytes, w_bytes = width * x_TD.element_size(), top_k * weights_TK.element_size()
        send = torch.empty(
            comm.size, num_tokens, x_bytes + 4 * top_k + w_bytes,
            dtype=torch.uint8, device=x_TD.device,
        )  # fmt: skip
        if num_tokens:
            x_slices = x_TD.contiguous().view(num_tokens, comm.size, width).view(torch.uint8)
            send[:, :, :x_bytes] = x_slices.transpose(0, 1)
            send[:, :, x_bytes : x_bytes + 4 * top_k] = ids_TK.to(torch.int32).view(torch.uint8)
            send[:, :, x_bytes + 4 * top_k :] = weights_TK.contiguous().view(torch.uint8)
        recv, _ = comm.exchange(send.view(comm.size * num_tokens, send.shape[2]), to_owners=True)
        x_GDp, ids_GK, w_GK = unpack_rows(
            recv, [(x_TD.dtype, (width,)), (torch.int32, (top_k,)), (weights_TK.dtype, (top_k,))]
        )

        h_GK = comm.all_reduce(
            experts_parts.pair_dots(x_GDp, up_NDp, ids_GK, backend=backend).to(acc)
        )
        y_GDp = experts_parts.combine(
            down_NDp, ids_GK, h_GK, gate_TK=w_GK, out_dtype=x_TD.dtype, backend=backend
        )
        y_back, _ = comm.exchange(y_GDp, to_owners=False)

        ctx.save_for_backward(x_GDp, ids_GK, h_GK, w_GK, up_NDp, down_NDp)
        ctx.comm, ctx.backend, ctx.x_dtype = comm, backend, x_TD.dtype
        return _from_owners(comm, y_back)

    @staticmethod
    def backward(ctx, dy_TD):
        x_GDp, ids_GK, h_GK, w_GK, up_NDp, down_NDp = ctx.saved_tensors
        comm, backend = ctx.comm, ctx.backend
        width = up_NDp.shape[1]
        dy_GDp, _ = comm.exchange(_to_owners(comm, dy_TD.to(ctx.x_dtype), width), to_owners=True)
        da_GK = comm.all_reduce(
            experts_parts.pair_dots(dy_GDp, down_NDp, ids_GK, backend=backend).to(h_GK.dtype)
        )
        g_GK, dw_GK = experts_parts.silu_grads(da_GK, h_GK, w_GK, backend=backend)
        dx_GDp = experts_parts.combine(up_NDp, ids_GK, g_GK, out_dtype=ctx.x_dtype, backend=backend)
        # dx travels while the table gradients are computed.
        dx_back, work = comm.exchange(dx_GDp, to_owners=False, async_op=True)
        dup_NDp, ddown_NDp = experts_parts.table_grads(
            x_GDp, dy_GDp, ids_GK, g_GK, h_GK, w_GK, up_NDp.shape[0],
            dtype=up_NDp.dtype, backend=backend,
        )  # fmt: skip
        work.wait()
        first = sum(comm.tokens[: comm.rank])
        dweights_TK = dw_GK[first : first + comm.mine]
        return _from_owners(comm, dx_back), dup_NDp, ddown_NDp, dweights_TK, None, None, None


def sharded_atomic_experts_dim(
    x_TD: torch.Tensor,
    up_local_NDp: torch.Tensor,
    down_local_NDp: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
    *,
    group: ProcessGroup | None,
    group_tokens: list[int] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, ShardingStats]:
    """Atomic experts with U and V sharded by hidden columns over ``group``.

    Rank r holds columns [r*D/P, (r+1)*D/P) of both tables (all N rows), passes its own tokens
    and gets back exactly ``atomic_experts`` with the full tables for them. ``group_tokens``: T
    of every rank, if known (else one count exchange). All ranks of the group must call this
    together. Raises ``ValueError`` for shards or routing of the wrong shape.
    """
    num_tokens, hidden = x_TD.shape
    comm = GroupComm.create(group, num_tokens, group_tokens)
    num_experts, width = up_local_NDp.shape
    if width * comm.size != hidden or down_local_NDp.shape != up_local_NDp.shape:
        raise ValueError(
            f"table shards {tuple(up_local_NDp.shape)}, {tuple(down_local_NDp.shape)} must be "
            f"(N, D/P) with D={hidden}, P={comm.size}"
        )
    if weights_TK.shape != indices_TK.shape or indices_TK.shape[0] != num_tokens:
        raise ValueError(f"weights {tuple(weights_TK.shape)} / indices {tuple(indices_TK.shape)}")
    y_TD = _DimExperts.apply(
        x_TD, up_local_NDp, down_local_NDp, weights_TK, indices_TK, comm, backend
    )
    # The backward is one node: it runs all its exchanges iff anything needs a gradient.
    backward = y_TD.requires_grad
    return y_TD, _dim_stats(comm, x_TD, weights_TK, width, group_tokens is None, backward)


def _dim_stats(
    comm: GroupComm,
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    width: int,
    counted: bool,
    has_backward: bool,
) -> ShardingStats:
    top_k = weights_TK.shape[1]
    score = 4 if x_TD.dtype != torch.float64 else 8  # fp32 (fp64 for fp64 inputs)
    slice_row = width * x_TD.element_size()
    forward = {
        "counts": comm.count_bytes(counted),
        "x_ids_weights": comm.gather_bytes(slice_row + top_k * (4 + weights_TK.element_size())),
        "scores": comm.all_reduce_bytes(score * top_k),
        "y": comm.scatter_bytes(slice_row),
    }
    backward = 0.0
    if has_backward:
        backward = comm.gather_bytes(slice_row) + comm.all_reduce_bytes(score * top_k)
        backward += comm.scatter_bytes(slice_row)
    pairs = sum(comm.tokens) * top_k  # every rank computes every pair of the group
    device = x_TD.device
    return ShardingStats(
        mode="dim",
        forward_bytes=sum(forward.values()),
        backward_bytes=backward,
        tokens=x_TD.shape[0],
        local_pairs=_const(pairs, device),
        owner_ranks=_const(comm.size * x_TD.shape[0], device),
        forward_bytes_by_exchange=forward,
    )


def _const(value: int, device: torch.device) -> torch.Tensor:
    # A host int as a device scalar without a blocking copy (``full`` is a fill kernel).
    return torch.full((), value, dtype=torch.int64, device=device)
