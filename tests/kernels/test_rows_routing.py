"""``rows_routing``: the Triton pass over the gathered ids against the PyTorch reference, and
both against the definitions written out per token."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import cpu_triton, gpu

from omnimoe_kernels.rows_routing import rows_routing

CASES = [  # G tokens, K, E experts per rank, P ranks, this rank, its own rows
    (10, 3, 4, 2, 0, slice(0, 5)),
    (10, 3, 4, 2, 1, slice(5, 10)),
    (33, 16, 8, 4, 2, slice(16, 24)),  # rows and slots off the block sizes
    (7, 1, 1, 5, 3, slice(3, 4)),
    (70, 64, 36, 2, 1, slice(35, 70)),  # several programs of rows
    (0, 4, 8, 2, 0, slice(0, 0)),  # no tokens
]


def _ascending_ids(G: int, K: int, N: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(G)]) if G else None
    if ids is None:
        return torch.empty(0, K, dtype=torch.int32)
    return ids.sort(1).values.to(torch.int32)


def _by_definition(ids_GK, first, E, own):
    local, start, count, pairs, owners = [], [], [], 0, 0
    for g, row in enumerate(ids_GK.tolist()):
        local.append([i - first if first <= i < first + E else E for i in row])
        start.append(sum(i < first for i in row))
        count.append(sum(first <= i < first + E for i in row))
        pairs += count[-1]
        if own.start <= g < own.stop:
            owners += len({i // E for i in row})
    return local, start, count, pairs, owners


def _check(case, device: str, backend: str) -> None:
    G, K, E, P, rank, own = case
    ids = _ascending_ids(G, K, E * P, seed=G * 7 + rank).to(device)
    out = rows_routing(ids, rank * E, E, own, P, ascending=True, backend=backend)
    local, start, count, pairs, owners = _by_definition(ids.cpu(), rank * E, E, own)
    assert out.local_GK.dtype == out.start_G.dtype == out.count_G.dtype == torch.int32
    assert out.local_GK.cpu().tolist() == local
    assert out.start_G.cpu().tolist() == start and out.count_G.cpu().tolist() == count
    assert int(out.pairs) == pairs and int(out.owners) == owners


@pytest.mark.parametrize("case", CASES)
def test_rows_routing_torch(case) -> None:
    _check(case, "cpu", "torch")


@cpu_triton
@pytest.mark.parametrize("case", CASES)
def test_rows_routing_triton_cpu(case) -> None:
    _check(case, "cpu", "triton")


@gpu[0]
@gpu[1]
@pytest.mark.parametrize("case", [*CASES, (32768, 64, 2888, 2, 1, slice(16384, 32768))])
def test_rows_routing_gpu(case) -> None:
    _check(case, "cuda", "auto")


def test_rows_routing_any_order_has_no_ranges() -> None:
    """Ids in any order: local ids and counters still right, no ranges (the torch path)."""
    ids = _ascending_ids(9, 4, 12, seed=3).flip(1).contiguous()
    out = rows_routing(ids, 6, 6, slice(0, 9), 2, ascending=False, backend="triton")
    local, _, _, pairs, owners = _by_definition(ids, 6, 6, slice(0, 9))
    assert out.start_G is None and out.count_G is None
    assert out.local_GK.tolist() == local and int(out.pairs) == pairs and int(out.owners) == owners


@pytest.mark.parametrize(
    ("ids", "first", "experts", "match"),
    [
        (torch.zeros(2, 3, dtype=torch.int64), 0, 2, "int32"),
        (torch.zeros(6, dtype=torch.int32), 0, 2, r"\(G, K\)"),
        (torch.zeros(2, 3, dtype=torch.int32), 0, 0, "empty"),
    ],
)
def test_rows_routing_rejects(ids, first, experts, match) -> None:
    with pytest.raises(ValueError, match=match):
        rows_routing(ids, first, experts, slice(0, 2), 2, ascending=True)
