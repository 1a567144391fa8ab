"""Row collectives of the expert-parallel group, their autograd, and the byte accounting.

Shape legend used across ``omnimoe_train.parallel``: T tokens on this rank, D hidden size,
N experts, n = sqrt(N) router half, K top-k, P ranks of the expert-parallel group, E = N/P experts
owned by one rank (rows mode), Dp = D/P columns held by one rank (dim mode), G tokens of the
whole group (sum of T over its ranks), in rank order.

Every exchange has sizes known on the host before it starts: ``GroupComm.tokens`` lists T of
every rank. In training all ranks of an EP group hold equal micro-batches, so the caller passes
``[T] * P`` and no exchange ever waits on the host; only when the counts are unknown (tests with
uneven ranks) does ``GroupComm.create`` exchange them once (one host sync). Equal counts use
NCCL's native ``all_gather_into_tensor`` / ``reduce_scatter_tensor``; uneven ones the same
exchange as one ``all_to_all_single`` with split sizes (what gloo and NCCL both support), moving
the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


class InFlight:
    """A collective's output, possibly still being written: ``wait()`` returns it (once).

    Issued with ``async_op=True`` on NCCL the collective runs on NCCL's stream and ``wait()``
    makes the current stream wait for it (no host sync), so work launched in between overlaps
    it; on gloo ``wait()`` blocks until the background thread is done. ``keep`` holds the
    tensors the collective reads until then (nothing may free or reuse them earlier);
    ``then`` finishes the result after the wait (the sum of an uneven scatter-sum).
    With ``async_op=False`` the work handle is None and ``wait()`` only applies ``then``.
    """

    def __init__(
        self,
        out: torch.Tensor,
        work: dist.Work | None,
        *,
        keep: tuple[torch.Tensor, ...] = (),
        then: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.out: torch.Tensor | None = out
        self.work, self.keep, self.then = work, keep, then

    def wait(self) -> torch.Tensor:
        if self.out is None:
            raise RuntimeError("InFlight.wait() called twice")
        if self.work is not None:
            self.work.wait()
        out, then = self.out, self.then
        self.out, self.work, self.keep, self.then = None, None, (), None
        return out if then is None else then(out)


@dataclass(frozen=True)
class GroupComm:
    """The EP ``group`` and every rank's token count (host ints: no exchange waits on them)."""

    group: ProcessGroup | None
    rank: int
    tokens: tuple[int, ...]

    @classmethod
    def create(
        cls, group: ProcessGroup | None, num_tokens: int, tokens: list[int] | None = None
    ) -> GroupComm:
        """``tokens`` None: learn every rank's count with one exchange (the one host sync)."""
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if tokens is None:
            device = _comm_device(group)
            mine = torch.tensor([num_tokens], dtype=torch.int64, device=device)
            every = torch.empty(size, dtype=torch.int64, device=device)
            dist.all_gather_into_tensor(every, mine, group=group)
            tokens = every.tolist()
        if len(tokens) != size or tokens[rank] != num_tokens:
            raise ValueError(f"tokens per rank {tokens} do not match rank {rank}'s {num_tokens}")
        return cls(group, rank, tuple(tokens))

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def mine(self) -> int:
        return self.tokens[self.rank]

    @property
    def own_rows(self) -> slice:
        """My tokens' rows among the group's G (rank order)."""
        first = sum(self.tokens[: self.rank])
        return slice(first, first + self.mine)

    @property
    def equal(self) -> bool:
        return len(set(self.tokens)) == 1

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(T, ...) of every rank -> (G, ...) in rank order."""
        return self._gather(t, async_op=False).wait()

    def gather_async(self, t: torch.Tensor) -> InFlight:
        """``gather`` issued with ``async_op=True``: ``wait()`` on the result returns it."""
        return self._gather(t, async_op=True)

    def _gather(self, t: torch.Tensor, *, async_op: bool) -> InFlight:
        t = t.contiguous()
        out = t.new_empty((sum(self.tokens), *t.shape[1:]))
        if self.equal:
            work = dist.all_gather_into_tensor(out, t, group=self.group, async_op=async_op)
            return InFlight(out, work, keep=(t,))
        send = t.repeat(self.size, *([1] * (t.dim() - 1)))
        work = dist.all_to_all_single(
            out, send, list(self.tokens), [self.mine] * self.size, group=self.group,
            async_op=async_op,
        )  # fmt: skip
        return InFlight(out, work, keep=(send,))

    def scatter_sum(self, t: torch.Tensor) -> torch.Tensor:
        """(G, ...) on every rank -> (T, ...): the sum over ranks of the rows of my tokens."""
        return self._scatter_sum(t, async_op=False).wait()

    def scatter_sum_async(self, t: torch.Tensor) -> InFlight:
        """``scatter_sum`` issued with ``async_op=True``: ``wait()`` on the result returns it."""
        return self._scatter_sum(t, async_op=True)

    def _scatter_sum(self, t: torch.Tensor, *, async_op: bool) -> InFlight:
        t = t.contiguous()
        if self.equal:
            out = t.new_empty((self.mine, *t.shape[1:]))
            work = dist.reduce_scatter_tensor(out, t, group=self.group, async_op=async_op)
            return InFlight(out, work, keep=(t,))
        parts = t.new_empty((self.mine * self.size, *t.shape[1:]))
        work = dist.all_to_all_single(
            parts, t, [self.mine] * self.size, list(self.tokens), group=self.group,
            async_op=async_op,
        )  # fmt: skip
        size, mine = self.size, self.mine
        return InFlight(
            parts, work, keep=(t,), then=lambda p: p.view(size, mine, *p.shape[1:]).sum(0)
        )

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """(G, ...) partial sums on every rank -> their sum, in place, on every rank."""
        return self.all_reduce_async(t.contiguous(), async_op=False).wait()

    def all_reduce_async(self, t: torch.Tensor, *, async_op: bool = True) -> InFlight:
        """``all_reduce`` issued with ``async_op=True`` (in place: ``t`` must be contiguous, a
        row block of a larger buffer is): ``wait()`` on the result returns ``t`` summed."""
        if not t.is_contiguous():
            raise ValueError("all_reduce_async sums in place: pass a contiguous tensor")
        work = dist.all_reduce(t, group=self.group, async_op=async_op)
        return InFlight(t, work if async_op else None)

    def exchange(self, t: torch.Tensor, *, to_owners: bool) -> torch.Tensor:
        """All-to-all of per-rank blocks. ``to_owners``: ``t`` is (P*T, ...), block q (my T
        rows) goes to rank q, and (G, ...) comes back; else ``t`` is (G, ...), the block of
        rank q's tokens goes back to q, and (P*T, ...) comes back."""
        return self._exchange(t, to_owners=to_owners, async_op=False).wait()

    def exchange_async(self, t: torch.Tensor, *, to_owners: bool) -> InFlight:
        """``exchange`` issued with ``async_op=True``: ``wait()`` on the result returns it."""
        return self._exchange(t, to_owners=to_owners, async_op=True)

    def _exchange(self, t: torch.Tensor, *, to_owners: bool, async_op: bool) -> InFlight:
        t = t.contiguous()
        mine = [self.mine] * self.size
        out_splits, in_splits = (
            (list(self.tokens), mine) if to_owners else (mine, list(self.tokens))
        )
        out = t.new_empty((sum(out_splits), *t.shape[1:]))
        if self.equal:  # equal blocks: no split lists (the form CUDA-graph capture is run with)
            out_splits = in_splits = None
        work = dist.all_to_all_single(
            out, t, out_splits, in_splits, group=self.group, async_op=async_op
        )
        return InFlight(out, work, keep=(t,))

    # -- bytes this rank puts on the wire (chunks to itself never leave the device) -----------
    def gather_bytes(self, bytes_per_row: int) -> int:
        return (self.size - 1) * self.mine * bytes_per_row

    def scatter_bytes(self, bytes_per_row: int) -> int:
        return (sum(self.tokens) - self.mine) * bytes_per_row

    def all_reduce_bytes(self, bytes_per_row: int) -> float:
        """A ring all-reduce of (G, row): each rank sends 2 (P-1)/P of it (NCCL's ring; the sum
        over ranks, 2 (P-1) G row, is what the tests compare)."""
        return 2 * (self.size - 1) * sum(self.tokens) * bytes_per_row / self.size

    def count_bytes(self, exchanged: bool) -> int:
        """The token-count exchange of ``create`` (8 bytes to each peer), if it ran."""
        return 8 * (self.size - 1) if exchanged else 0


def _comm_device(group: ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pack_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """(T, ...) tensors of any dtypes -> one (T, bytes) uint8 tensor: one collective, not many."""
    num_tokens = parts[0].shape[0]
    if num_tokens == 0:  # dtype views need a unit last stride, which empty tensors may lack
        width = sum(_row_numel(p) * p.element_size() for p in parts)
        return torch.empty(0, width, dtype=torch.uint8, device=parts[0].device)
    flat = [p.contiguous().view(num_tokens, _row_numel(p)).view(torch.uint8) for p in parts]
    return torch.cat(flat, dim=1)


def _row_numel(t: torch.Tensor) -> int:
    numel = 1
    for size in t.shape[1:]:
        numel *= size
    return numel


def widest_word(*spans: int) -> torch.dtype:
    """The widest integer dtype (8, 4, 2 or 1 bytes) whose size divides every byte span."""
    for word in (torch.int64, torch.int32, torch.int16):
        if all(span % word.itemsize == 0 for span in spans):
            return word
    return torch.uint8


def contiguous_wide(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()``, copied as the widest integer words (8, 4 or 2 bytes) that every
    stride, the address and the last dimension's bytes are multiples of.

    Why: a strided copy (the column-slice transposes of ``dim`` sharding, byte columns cut out
    of a packed exchange) runs PyTorch's generic elementwise copy, whose cost is per element:
    the same bytes as 8-byte words are 4x fewer elements for bf16 and 8x for uint8. Same
    bytes, same result; ``t.contiguous()`` when the last dimension is not unit-stride or no
    wider word fits.
    """
    if t.is_contiguous() or t.dim() == 0 or t.stride(-1) != 1 or t.shape[-1] == 0:
        return t.contiguous()
    size = t.element_size()
    # The address for the copy's alignment; the storage offset because the dtype view checks
    # it (they differ when the storage itself does not start on a word: ``frombuffer``).
    word = widest_word(
        t.shape[-1] * size, t.data_ptr(), t.storage_offset() * size,
        *(st * size for st in t.stride()[:-1]),
    )  # fmt: skip
    if word.itemsize <= size:
        return t.contiguous()
    return t.view(word).contiguous().view(t.dtype)


def rows_as(t_TX: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(T, X) -> its rows' bytes viewed as ``dtype`` (T, X bytes / ``dtype`` size; that size
    must divide a row's bytes). Copied first only when the layout forbids the dtype view: a
    last stride other than 1, or a storage offset or row stride off ``dtype``'s size. A lone
    row counts as contiguous whatever its strides, so ``contiguous()`` alone does not realign
    it (a group of one token whose packed parts start off their dtype's boundary)."""
    t_TX = t_TX.contiguous()
    size, itemsize = t_TX.element_size(), dtype.itemsize
    if (
        t_TX.stride(-1) != 1
        or (t_TX.storage_offset() * size) % itemsize
        or (t_TX.stride(0) * size) % itemsize
    ):
        t_TX = t_TX.clone(memory_format=torch.contiguous_format)
    return t_TX.view(torch.uint8).view(dtype)


def unpack_rows(
    packed: torch.Tensor, like: list[tuple[torch.dtype, tuple[int, ...]]]
) -> list[torch.Tensor]:
    """Inverse of ``pack_rows``: ``like`` lists (dtype, per-row shape) of each part."""
    out, start = [], 0
    rows = packed.shape[0]
    for dtype, shape in like:
        numel = 1
        for size in shape:
            numel *= size
        width = numel * torch.empty((), dtype=dtype).element_size()
        if rows == 0:
            out.append(torch.empty(0, *shape, dtype=dtype, device=packed.device))
        else:
            chunk = rows_as(contiguous_wide(packed[:, start : start + width]), dtype)
            out.append(chunk.view(rows, *shape))
        start += width
    return out


def row_bytes(t: torch.Tensor) -> int:
    """Bytes of one dim-0 row of ``t``."""
    per_row = t.element_size()
    for size in t.shape[1:]:
        per_row *= size
    return per_row


class GatherRows(torch.autograd.Function):
    """Every rank's rows of several tensors, gathered in one collective (packed as bytes).

    Backward: the gradient rows of my tokens, summed over ranks (``scatter_sum``), for every
    floating input that needs a gradient, in a fixed order (one autograd node: the ranks issue
    the same collectives in the same order).
    """

    @staticmethod
    def forward(ctx, comm: GroupComm, *parts: torch.Tensor):
        ctx.comm = comm
        ctx.set_materialize_grads(False)
        like = [(p.dtype, tuple(p.shape[1:])) for p in parts]
        gathered = unpack_rows(comm.gather(pack_rows(list(parts))), like)
        for part, out in zip(parts, gathered):
            if not part.is_floating_point():
                ctx.mark_non_differentiable(out)
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        needs = ctx.needs_input_grad[1:]
        return None, *(
            ctx.comm.scatter_sum(g) if need and g is not None else None
            for g, need in zip(grads, needs)
        )


class ScatterSumRows(torch.autograd.Function):
    """``GroupComm.scatter_sum`` with autograd: the backward gathers the gradient rows."""

    @staticmethod
    def forward(ctx, comm: GroupComm, t: torch.Tensor) -> torch.Tensor:
        ctx.comm = comm
        return comm.scatter_sum(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.comm.gather(grad)


@dataclass
class ShardingStats:
    """Communication and work of one sharded atomic-experts call, as seen from this rank.

    Bytes count only chunks sent to other ranks. ``backward_bytes`` is known at forward time
    (the backward's exchanges have fixed sizes), so it is exact as long as backward runs. Byte
    values are host ints derived from shapes; ``local_pairs`` (pairs this rank computed) and
    ``owner_ranks`` (sum over tokens of the ranks owning at least one of the token's experts)
    are device tensors, summed without a host sync and read when metrics are logged.
    """

    mode: str
    forward_bytes: float
    backward_bytes: float
    tokens: int
    local_pairs: torch.Tensor
    owner_ranks: torch.Tensor
    forward_bytes_by_exchange: dict[str, int] = field(default_factory=dict)
