"""``dim`` sharding: every rank holds all N expert rows, but only D/P columns of U and V.

The memory-layer / UltraMem dimension partition, adapted to OmniMoE's nonlinearity: silu needs
the FULL score up[e] . x, so the partial scores of the D/P slices are summed before the
activation. One call on rank r (T own tokens, G of the group, Dp = D/P; legend in
``collectives``; every size is known on the host, so nothing waits on it):

    x, ids, w  all-to-all, one packed exchange: x[:, slice q], the (T, K) int32 expert ids and
               the routing weights of my tokens to every rank q -> (G, Dp) x of my slice and
               the (G, K) ids and weights of the group
    h          partial scores on my slice (``experts_parts.pair_dots``), fp32 (G, K),
               all-reduced: every rank has the full h of the group's pairs (in
               ``SCORE_BLOCKS`` row blocks: one block's sum travels while the next block's
               partial scores are computed, and the combine below starts on the first)
    y          y[:, slice] = sum_k w * silu(h) * V[e, slice] (``experts_parts.combine``, the
               gated Triton combine) for all G tokens; all-to-all back, each source assembles
               its (T, D) rows from the P slices

Backward (one autograd node, collectives in a fixed order): dy slices out (all-to-all), partial
da = dy . V[e, slice] all-reduced (the same row blocks: one block's g, dw and dx are computed
while the next block's da travels), g = dL/dh and dw from (da, h, w) in one kernel, dx slices =
sum_k g * U[e, slice] sent back (all-to-all, overlapped with the table gradients dU, dV of the
slice, which never leave the rank); dw of my tokens is my rows of the group's dw.

Overlapped variant (``parallel.ep_overlap``, ``start_dim_tokens`` + ``dim_experts_overlapped``,
``overlap``): the x slices are sent before the router runs and travel while it does (ids and
weights follow in a small all-gather), and y's slices travel back while the caller computes the
shared SwiGLU; backward: dy's slices overlap the shared branch's backward, dx's the router's.
Same values and bytes, one more collective launch forward.

Three collectives each way. Every rank computes all G*K pairs on D/P columns: the same work as
one GPU on its own T*K pairs with all D columns, whatever the routing (no load imbalance).
Scores travel in fp32 (cancellation-prone sums of D/P products). Bytes a rank sends (b
activation bytes, w weight bytes, s = 4 score bytes, equal T, ring all-reduce):
forward 2*(P-1)*T*(D/P)*b + (P-1)*T*K*(4 + w + 2*s); backward 2*(P-1)*T*(D/P)*b + 2*(P-1)*T*K*s.
Nothing depends on N.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed import ProcessGroup

from omnimoe_kernels import experts_parts
from omnimoe_train.parallel.collectives import (
    GroupComm,
    ShardingStats,
    contiguous_wide,
    pack_rows,
    rows_as,
    unpack_rows,
    widest_word,
)
from omnimoe_train.parallel.overlap import PendingExchange, TokensInFlight, start_exchange


class _SwapBlocks(torch.autograd.Function):
    """(A, B, w) -> (B, A, w) contiguous, copied as wide words (``contiguous_wide``); the
    backward swaps the gradient back the same way (autograd's own would copy element-wise)."""

    @staticmethod
    def forward(ctx, t_ABw: torch.Tensor) -> torch.Tensor:
        return contiguous_wide(t_ABw.transpose(0, 1))

    @staticmethod
    def backward(ctx, grad_BAw: torch.Tensor) -> torch.Tensor:
        return contiguous_wide(grad_BAw.transpose(0, 1))


def _to_owners(comm: GroupComm, t_TD: torch.Tensor, width: int) -> torch.Tensor:
    """(T, P*width) -> (P*T, width): block q holds column slice q of my tokens."""
    num_tokens = t_TD.shape[0]
    return _SwapBlocks.apply(t_TD.reshape(num_tokens, comm.size, width)).view(-1, width)


def _from_owners(comm: GroupComm, t_PTw: torch.Tensor) -> torch.Tensor:
    """(P*T, width) slices back from every rank -> (T, P*width) rows."""
    width = t_PTw.shape[1]
    swapped = _SwapBlocks.apply(t_PTw.reshape(comm.size, comm.mine, width))
    return swapped.view(comm.mine, comm.size * width)


# The group's tokens in this many row blocks for the score all-reduces: one block's partial
# scores travel while the next block's are computed, and the backward combines one block's dx
# while the next block's da travels. The all-reduces sit between dependent kernels (silu needs
# the full score), so unsplit they stall the stream (~15 ms of a profiled a80m ep2_dim step).
SCORE_BLOCKS = 2


def _blocks(num_rows: int) -> list[slice]:
    if num_rows == 0:
        return [slice(0, 0)]
    step = -(-num_rows // SCORE_BLOCKS)
    return [slice(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


def _scores_and_combine(
    comm: GroupComm,
    x_GDp: torch.Tensor,
    up_NDp: torch.Tensor,
    down_NDp: torch.Tensor,
    ids_GK: torch.Tensor,
    w_GK: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_GK all-reduced, y_GDp my column slice of every token's output)."""
    num_rows, top_k = ids_GK.shape
    h_GK = x_GDp.new_empty(
        (num_rows, top_k), dtype=experts_parts.score_dtype(x_GDp.dtype, x_GDp.device, backend)
    )
    y_GDp = x_GDp.new_empty((num_rows, up_NDp.shape[1]))
    blocks = _blocks(num_rows)
    sums = [
        comm.all_reduce_async(
            experts_parts.pair_dots(x_GDp[b], up_NDp, ids_GK[b], backend=backend, out=h_GK[b])
        )
        for b in blocks
    ]
    for b, block_sum in zip(blocks, sums):
        experts_parts.combine(
            down_NDp, ids_GK[b], block_sum.wait(), gate_TK=w_GK[b], out_dtype=x_GDp.dtype,
            backend=backend, out=y_GDp[b],
        )  # fmt: skip
    return h_GK, y_GDp


def _score_grads(
    comm: GroupComm,
    dy_GDp: torch.Tensor,
    up_NDp: torch.Tensor,
    down_NDp: torch.Tensor,
    ids_GK: torch.Tensor,
    h_GK: torch.Tensor,
    w_GK: torch.Tensor,
    backend: str,
    *,
    dx_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(g = dL/dh, dw, dx_GDp or None when ``dx_dtype`` is None) of the group's pairs: the
    partial da all-reduced block by block, then g and dw in one kernel and dx's combine."""
    da_GK = torch.empty_like(h_GK)
    blocks = _blocks(ids_GK.shape[0])
    dx_GDp = None if dx_dtype is None else dy_GDp.new_empty(dy_GDp.shape, dtype=dx_dtype)
    sums = [
        comm.all_reduce_async(
            experts_parts.pair_dots(dy_GDp[b], down_NDp, ids_GK[b], backend=backend, out=da_GK[b])
        )
        for b in blocks
    ]
    g_parts, dw_parts = [], []
    for b, block_sum in zip(blocks, sums):
        g_BK, dw_BK = experts_parts.silu_grads(block_sum.wait(), h_GK[b], w_GK[b], backend=backend)
        g_parts.append(g_BK)
        dw_parts.append(dw_BK)
        if dx_GDp is not None:
            experts_parts.combine(
                up_NDp, ids_GK[b], g_BK, out_dtype=dx_dtype, backend=backend, out=dx_GDp[b]
            )
    return torch.cat(g_parts), torch.cat(dw_parts), dx_GDp


class _DimExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, up_NDp, down_NDp, weights_TK, ids_TK, comm: GroupComm, backend: str,
                distinct_ids: bool):  # fmt: skip
        num_tokens, top_k = ids_TK.shape
        width = up_NDp.shape[1]
        # One exchange: block q = (x[:, slice q], my ids, my weights), as bytes, written as
        # the widest words all three widths allow (a strided copy costs per element).
        x_bytes, w_bytes = width * x_TD.element_size(), top_k * weights_TK.element_size()
        send = torch.empty(
            comm.size, num_tokens, x_bytes + 4 * top_k + w_bytes,
            dtype=torch.uint8, device=x_TD.device,
        )  # fmt: skip
        if num_tokens:
            word = widest_word(x_bytes, 4 * top_k, w_bytes)
            words, ids_end = send.view(word), (x_bytes + 4 * top_k) // word.itemsize
            x_slices = rows_as(x_TD, word).view(num_tokens, comm.size, -1)
            words[:, :, : x_bytes // word.itemsize] = x_slices.transpose(0, 1)
            words[:, :, x_bytes // word.itemsize : ids_end] = rows_as(ids_TK.to(torch.int32), word)
            words[:, :, ids_end:] = rows_as(weights_TK, word)
        recv = comm.exchange(send.view(comm.size * num_tokens, send.shape[2]), to_owners=True)
        x_GDp, ids_GK, w_GK = unpack_rows(
            recv, [(x_TD.dtype, (width,)), (torch.int32, (top_k,)), (weights_TK.dtype, (top_k,))]
        )
        h_GK, y_GDp = _scores_and_combine(comm, x_GDp, up_NDp, down_NDp, ids_GK, w_GK, backend)
        y_back = comm.exchange(y_GDp, to_owners=False)

        ctx.save_for_backward(x_GDp, ids_GK, h_GK, w_GK, up_NDp, down_NDp)
        ctx.comm, ctx.backend, ctx.x_dtype = comm, backend, x_TD.dtype
        ctx.distinct_ids = distinct_ids
        return _from_owners(comm, y_back)

    @staticmethod
    def backward(ctx, dy_TD):
        x_GDp, ids_GK, h_GK, w_GK, up_NDp, down_NDp = ctx.saved_tensors
        comm, backend = ctx.comm, ctx.backend
        width = up_NDp.shape[1]
        dy_GDp = comm.exchange(_to_owners(comm, dy_TD.to(ctx.x_dtype), width), to_owners=True)
        g_GK, dw_GK, dx_GDp = _score_grads(
            comm, dy_GDp, up_NDp, down_NDp, ids_GK, h_GK, w_GK, backend, dx_dtype=ctx.x_dtype
        )
        # dx travels while the table gradients are computed.
        dx_back = comm.exchange_async(dx_GDp, to_owners=False)
        dup_NDp, ddown_NDp = experts_parts.table_grads(
            x_GDp, dy_GDp, ids_GK, g_GK, h_GK, w_GK, up_NDp.shape[0],
            dtype=up_NDp.dtype, backend=backend, distinct_ids=ctx.distinct_ids,
        )  # fmt: skip
        dx_TD = _from_owners(comm, dx_back.wait())
        return dx_TD, dup_NDp, ddown_NDp, dw_GK[comm.own_rows], None, None, None, None


class _DimGroupExperts(torch.autograd.Function):
    """The overlapped variant's middle: x slices already exchanged (``x_GDp``), y slices
    returned unsent (``y_GDp``); only ids and weights (one all-gather) and the scores (and
    their gradients: all-reduces) travel inside. Backward: dx_GDp is returned unsent too."""

    @staticmethod
    def forward(ctx, x_GDp, up_NDp, down_NDp, weights_TK, ids_TK, comm: GroupComm, backend: str,
                distinct_ids: bool):  # fmt: skip
        top_k = ids_TK.shape[1]
        routing = pack_rows([ids_TK.to(torch.int32), weights_TK])
        ids_GK, w_GK = unpack_rows(
            comm.gather(routing), [(torch.int32, (top_k,)), (weights_TK.dtype, (top_k,))]
        )
        h_GK, y_GDp = _scores_and_combine(comm, x_GDp, up_NDp, down_NDp, ids_GK, w_GK, backend)
        ctx.save_for_backward(x_GDp, ids_GK, h_GK, w_GK, up_NDp, down_NDp)
        ctx.comm, ctx.backend, ctx.distinct_ids = comm, backend, distinct_ids
        return y_GDp

    @staticmethod
    def backward(ctx, dy_GDp):
        x_GDp, ids_GK, h_GK, w_GK, up_NDp, down_NDp = ctx.saved_tensors
        comm, backend = ctx.comm, ctx.backend
        g_GK, dw_GK, dx_GDp = _score_grads(
            comm, dy_GDp, up_NDp, down_NDp, ids_GK, h_GK, w_GK, backend,
            dx_dtype=x_GDp.dtype if ctx.needs_input_grad[0] else None,
        )  # fmt: skip
        dup_NDp, ddown_NDp = experts_parts.table_grads(
            x_GDp, dy_GDp, ids_GK, g_GK, h_GK, w_GK, up_NDp.shape[0],
            dtype=up_NDp.dtype, backend=backend, distinct_ids=ctx.distinct_ids,
        )  # fmt: skip
        return dx_GDp, dup_NDp, ddown_NDp, dw_GK[comm.own_rows], None, None, None, None


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
    distinct_ids: bool = False,
) -> tuple[torch.Tensor, ShardingStats]:
    """Atomic experts with U and V sharded by hidden columns over ``group``.

    Rank r holds columns [r*D/P, (r+1)*D/P) of both tables (all N rows), passes its own tokens
    and gets back exactly ``atomic_experts`` with the full tables for them. ``group_tokens``: T
    of every rank, if known (else one count exchange). All ranks of the group must call this
    together. ``distinct_ids``: no expert twice in a token's row (the routers promise it; the
    table gradients then skip merging repeats: ``omnimoe_kernels.atomic_experts``). Raises
    ``ValueError`` for shards or routing of the wrong shape.
    """
    comm = GroupComm.create(group, x_TD.shape[0], group_tokens)
    _check_dim_shapes(comm, x_TD, up_local_NDp, down_local_NDp, weights_TK, indices_TK)
    width = up_local_NDp.shape[1]
    y_TD = _DimExperts.apply(
        x_TD, up_local_NDp, down_local_NDp, weights_TK, indices_TK, comm, backend, distinct_ids
    )
    # The backward is one node: it runs all its exchanges iff anything needs a gradient.
    backward = y_TD.requires_grad
    stats = _dim_stats(
        comm, x_TD, weights_TK, width, group_tokens is None, backward, backward, split=False
    )
    return y_TD, stats


def start_dim_tokens(
    x_TD: torch.Tensor, *, group: ProcessGroup | None, group_tokens: list[int] | None = None
) -> TokensInFlight:
    """Start the all-to-all of the tokens' column slices (they do not depend on the routing):
    the overlapped variant's first half (``parallel.ep_overlap``); ``dim_experts_overlapped``
    finishes it. The backward sends dx slices back when it reaches this exchange, and the
    router's backward runs while they travel. Raises ``ValueError`` when P does not divide D."""
    num_tokens, hidden = x_TD.shape
    comm = GroupComm.create(group, num_tokens, group_tokens)
    if hidden % comm.size != 0:
        raise ValueError(f"hidden size {hidden} is not divisible by the EP size {comm.size}")
    tokens = start_exchange(
        _to_owners(comm, x_TD, hidden // comm.size),
        functools.partial(comm.exchange_async, to_owners=True),
        functools.partial(comm.exchange_async, to_owners=False),
    )
    return TokensInFlight("dim", comm, x_TD, tokens, counted=group_tokens is None)


def dim_experts_overlapped(
    early: TokensInFlight,
    up_local_NDp: torch.Tensor,
    down_local_NDp: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
    *,
    backend: str = "auto",
    distinct_ids: bool = False,
) -> tuple[PendingExchange, ShardingStats]:
    """``sharded_atomic_experts_dim`` in two halves, the exchanges overlapped: the x slices
    were sent by ``start_dim_tokens``; this all-gathers ids and weights, computes the scores
    (all-reduced) and my slice of every output, and starts sending the slices back, whose
    ``finish()`` gives y_TD. Work issued before ``finish()`` (the shared SwiGLU) overlaps it,
    and its backward overlaps dy's slices. Same values as the one-call op; same bytes (the
    packed first exchange is split in two). Raises ``ValueError`` like it."""
    comm, x_TD = early.comm, early.x_TD
    _check_dim_shapes(comm, x_TD, up_local_NDp, down_local_NDp, weights_TK, indices_TK)
    y_GDp = _DimGroupExperts.apply(
        early.tokens.finish(), up_local_NDp, down_local_NDp, weights_TK, indices_TK, comm,
        backend, distinct_ids,
    )  # fmt: skip
    y_TD = start_exchange(
        y_GDp,
        functools.partial(comm.exchange_async, to_owners=False),
        functools.partial(comm.exchange_async, to_owners=True),
    )
    y_TD.post = functools.partial(_from_owners, comm)
    width = up_local_NDp.shape[1]
    backward = y_GDp.requires_grad
    stats = _dim_stats(
        comm, x_TD, weights_TK, width, early.counted, backward, backward and x_TD.requires_grad,
        split=True,
    )  # fmt: skip
    return y_TD, stats


def _check_dim_shapes(
    comm: GroupComm,
    x_TD: torch.Tensor,
    up_local_NDp: torch.Tensor,
    down_local_NDp: torch.Tensor,
    weights_TK: torch.Tensor,
    indices_TK: torch.Tensor,
) -> None:
    num_tokens, hidden = x_TD.shape
    width = up_local_NDp.shape[1]
    if width * comm.size != hidden or down_local_NDp.shape != up_local_NDp.shape:
        raise ValueError(
            f"table shards {tuple(up_local_NDp.shape)}, {tuple(down_local_NDp.shape)} must be "
            f"(N, D/P) with D={hidden}, P={comm.size}"
        )
    if weights_TK.shape != indices_TK.shape or indices_TK.shape[0] != num_tokens:
        raise ValueError(f"weights {tuple(weights_TK.shape)} / indices {tuple(indices_TK.shape)}")


def _dim_stats(
    comm: GroupComm,
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    width: int,
    counted: bool,
    has_backward: bool,
    sends_dx: bool,
    *,
    split: bool,
) -> ShardingStats:
    """``split``: x slices sent apart from ids and weights (the overlapped variant, same
    bytes); ``sends_dx``: the backward sends dx slices back (the one-node op always does)."""
    top_k = weights_TK.shape[1]
    score = 4 if x_TD.dtype != torch.float64 else 8  # fp32 (fp64 for fp64 inputs)
    slice_row = width * x_TD.element_size()
    routing_row = top_k * (4 + weights_TK.element_size())
    forward = {"counts": comm.count_bytes(counted)}
    if split:
        forward["x"] = comm.gather_bytes(slice_row)
        forward["ids_weights"] = comm.gather_bytes(routing_row)
    else:
        forward["x_ids_weights"] = comm.gather_bytes(slice_row + routing_row)
    forward["scores"] = comm.all_reduce_bytes(score * top_k)
    forward["y"] = comm.scatter_bytes(slice_row)
    backward = 0.0
    if has_backward:
        backward = comm.gather_bytes(slice_row) + comm.all_reduce_bytes(score * top_k)
    if sends_dx:
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
