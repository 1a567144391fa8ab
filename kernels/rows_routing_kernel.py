"""The Triton kernel of ``rows_routing`` (imported only when a call resolves to Triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rows_routing_kernel(
    ids_ptr,  # (G, K) int32 global expert ids, each row ascending
    local_ptr,  # (G, K) int32 out: id - first, or E for another rank's expert
    start_ptr,  # (G,) int32 out: slots below first
    count_ptr,  # (G,) int32 out: slots in [first, first + E)
    sums_ptr,  # (2,) int64, zeroed: += pairs of this rank, += owner ranks of the own rows
    G,
    K,
    first,
    E,
    own_lo,
    own_hi,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    slots = tl.arange(0, BLOCK_K)
    row_ok = rows < G
    ok = row_ok[:, None] & (slots[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + slots[None, :]
    ids = tl.load(ids_ptr + offs, mask=ok, other=0)
    local = ids - first
    mine = ok & (local >= 0) & (local < E)
    tl.store(local_ptr + offs, tl.where(mine, local, E), mask=ok)
    count = tl.sum(mine.to(tl.int32), axis=1)
    tl.store(start_ptr + rows, tl.sum((ok & (ids < first)).to(tl.int32), axis=1), mask=row_ok)
    tl.store(count_ptr + rows, count, mask=row_ok)
    # Ascending ids: a token's owner ranks are its runs of equal id // E; a run starts at slot 0
    # and wherever the owner differs from the previous slot's (read again: an L1 hit).
    later = ok & (slots[None, :] > 0)
    prev = tl.load(ids_ptr + offs - 1, mask=later, other=0)
    starts = ok & ((slots[None, :] == 0) | (later & (prev // E != ids // E)))
    own = (rows >= own_lo) & (rows < own_hi)
    owners = tl.sum(tl.where(own, tl.sum(starts.to(tl.int32), axis=1), 0), axis=0)
    tl.atomic_add(sums_ptr, tl.sum(count, axis=0).to(tl.int64))
    tl.atomic_add(sums_ptr + 1, owners.to(tl.int64))
