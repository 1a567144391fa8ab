"""``atomic_experts(usage_N=...)``: each expert's pair count, added by the Triton backward off
its expert sort (or by the reference's forward), equals a scatter of the ids."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import cpu_triton, gpu

import omnimoe_kernels
import omnimoe_kernels.experts_autograd as experts_autograd
import omnimoe_kernels.usage_counts as usage_counts


def _ids(T: int, N: int, K: int, skip_fraction: float, seed: int) -> torch.Tensor:
    """(T, K) ids in [0, N), a ``skip_fraction`` of them replaced by the "no expert" id N."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N, (T, K), generator=gen)
    idx[torch.rand(T, K, generator=gen) < skip_fraction] = N
    return idx


def _scattered(idx: torch.Tensor, N: int) -> torch.Tensor:
    real = idx[idx < N]
    return torch.zeros(N, dtype=torch.float64).index_add_(
        0, real, torch.ones(real.numel()).double()
    )


def _call(idx, N, D, device, *, backend="triton", usage_N, **options):  # noqa: ANN001, ANN202
    gen = torch.Generator().manual_seed(1)
    T, K = idx.shape
    x, up, down = (torch.randn(r, D, generator=gen) for r in (T, N, N))
    w = torch.rand(T, K, generator=gen)
    leaves = [t.to(device).requires_grad_() for t in (x, up, down, w)]
    y = omnimoe_kernels.atomic_experts(
        *leaves, idx.to(device), backend=backend, usage_N=usage_N, **options
    )
    return y


CASES = [  # T, N, K, skip_fraction, options
    (13, 40, 5, 0.0, {"valid_ids": True}),
    (13, 40, 5, 0.3, {}),
    (9, 6, 4, 1.0, {}),
    (21, 12, 3, 0.2, {"grad_path": "dense"}),
    (21, 12, 3, 0.2, {"grad_path": "pairs", "sort_forward": True}),
    (7, (1 << 16) + 3, 2, 0.2, {"grad_path": "dense"}),  # 32-bit sort keys
]


@cpu_triton
@pytest.mark.parametrize(("T", "N", "K", "skip_fraction", "options"), CASES)
def test_backward_adds_each_experts_pair_count_cpu(T, N, K, skip_fraction, options) -> None:
    idx = _ids(T, N, K, skip_fraction, seed=T + N)
    usage_N = torch.full((N,), 2.0, dtype=torch.float64)  # counts add to what is there
    y = _call(idx, N, 4, "cpu", usage_N=usage_N, **options)
    assert torch.equal(usage_N, torch.full((N,), 2.0, dtype=torch.float64))  # forward: nothing
    y.sum().backward()
    assert torch.equal(usage_N, _scattered(idx, N) + 2.0)


def test_reference_backend_adds_them_in_its_forward() -> None:
    N = 10
    idx = _ids(8, N, 3, 0.25, seed=3)
    usage_N = torch.zeros(N, dtype=torch.float64)
    _call(idx, N, 4, "cpu", backend="torch", usage_N=usage_N)
    assert torch.equal(usage_N, _scattered(idx, N))


@cpu_triton
def test_counts_come_from_the_backwards_sort_cpu(monkeypatch) -> None:
    """No extra scatter: the counts are read off the sort the backward runs for its kernels."""
    sorts = []
    order = experts_autograd.expert_order
    monkeypatch.setattr(experts_autograd, "expert_order", lambda *a: sorts.append(1) or order(*a))
    usage_N = torch.zeros(16, dtype=torch.float64)
    _call(_ids(5, 16, 3, 0.0, seed=5), 16, 4, "cpu", usage_N=usage_N).sum().backward()
    assert len(sorts) == 1 and usage_N.sum().item() == 15


@gpu[0]
@gpu[1]
@pytest.mark.parametrize("valid_ids", [False, True])
def test_backward_adds_each_experts_pair_count_gpu(valid_ids) -> None:
    T, N, K = 4096, 76 * 76, 64
    idx = _ids(T, N, K, 0.0 if valid_ids else 0.1, seed=7)
    usage_N = torch.zeros(N, dtype=torch.float64, device="cuda")
    _call(idx, N, 128, "cuda", usage_N=usage_N, valid_ids=valid_ids).sum().backward()
    assert torch.equal(usage_N.cpu(), _scattered(idx, N))


@cpu_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
@pytest.mark.parametrize(("P", "N", "block"), [(0, 5, 16), (1, 5, 16), (37, 5, 16), (64, 3, 16)])
def test_runs_across_program_blocks_cpu(monkeypatch, dtype, P, N, block) -> None:
    """Runs that cross the programs' blocks, start at 0, end at P - 1, a single pair, none,
    experts that do not occur, and "no expert" ids at the end."""
    monkeypatch.setattr(usage_counts, "BLOCK", block)
    gen = torch.Generator().manual_seed(P)
    e_P = torch.randint(0, N + 1, (P,), generator=gen).sort().values.to(torch.int32)
    usage_N = torch.ones(N, dtype=dtype)
    usage_counts.add_pair_counts(usage_N, e_P)
    want = torch.ones(N, dtype=dtype) + torch.bincount(e_P[e_P < N].long(), minlength=N).to(dtype)
    assert torch.equal(usage_N, want)


@pytest.mark.parametrize(
    ("usage", "ids", "match"),
    [
        (torch.zeros(4), torch.zeros(3, dtype=torch.int32), "float64 or int64"),
        (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.int32), "vector"),
        (torch.zeros(4, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), "int32"),
        (torch.zeros(8, dtype=torch.float64)[::2], torch.zeros(3, dtype=torch.int32), "contig"),
    ],
)
def test_add_pair_counts_refuses_what_it_cannot_count(usage, ids, match) -> None:
    with pytest.raises(ValueError, match=match):
        usage_counts.add_pair_counts(usage, ids)
