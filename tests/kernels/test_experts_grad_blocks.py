"""The work map of the weight gradients' "experts" schedule (``experts_grad_blocks.work_map``):
every block's pairs covered once, by segments of at most S pairs where it is split, within
the grid and scratch the host sized without seeing the routing."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from omnimoe_kernels.experts_grad_blocks import BLOCK_EXPERTS, _round_bf16, work_map


def _offsets(counts_N: torch.Tensor, no_expert: int) -> tuple[torch.Tensor, int]:
    """Run starts (N + 1,) of experts with these pair counts, and P (with ``no_expert`` pairs
    of id N after the real ones, as the expert order puts them)."""
    off_N1 = torch.zeros(counts_N.numel() + 1, dtype=torch.int64)
    off_N1[1:] = torch.cumsum(counts_N, 0)
    return off_N1, int(off_N1[-1]) + no_expert


@pytest.mark.parametrize("segment", [0, 1, 7, 16, 64])
@pytest.mark.parametrize("seed", range(6))
def test_segments_cover_each_block_once(segment: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    N = int(torch.randint(1, 90, (1,), generator=gen))
    counts_N = torch.randint(0, 6, (N,), generator=gen)
    counts_N[torch.randint(0, N, (1,), generator=gen)] += int(
        torch.randint(0, 400, (1,), generator=gen)
    )
    off_N1, P = _offsets(counts_N, no_expert=int(torch.randint(0, 30, (1,), generator=gen)))
    blk_U, seg_U, nseg_B, slot_B, slots = work_map(off_N1, P, segment)
    nb = -(-N // BLOCK_EXPERTS)
    assert nseg_B.numel() == nb and int(nseg_B.min()) >= 1
    assert blk_U.numel() == nb + (-(-P // segment) if segment else 0)  # the host's grid
    live = blk_U < nb
    assert int(live.sum()) == int(nseg_B.sum())  # every segment has one work item, no more
    used = []
    for b in range(nb):
        first, last = b * BLOCK_EXPERTS, min(N, (b + 1) * BLOCK_EXPERTS)
        pairs = int(off_N1[last] - off_N1[first])
        segs = sorted(seg_U[live & (blk_U == b)].tolist())
        assert segs == list(range(int(nseg_B[b])))
        if segment and pairs > segment:
            # segments of S pairs from the block's first pair: together exactly its pairs
            assert int(nseg_B[b]) == -(-pairs // segment)
            used.extend(range(int(slot_B[b]), int(slot_B[b] + nseg_B[b])))
        else:
            assert int(nseg_B[b]) == 1
    assert sorted(used) == list(range(len(used))) and len(used) <= slots  # disjoint, in scratch


def test_no_split_is_one_item_per_block() -> None:
    off_N1, P = _offsets(torch.tensor([3000, 0, 5] + [1] * 30), no_expert=0)
    blk_U, seg_U, nseg_B, _, slots = work_map(off_N1, P, 0)
    assert blk_U.tolist() == list(range(3)) and seg_U.tolist() == [0, 0, 0] and slots == 0
    assert nseg_B.tolist() == [1, 1, 1]


@triton.jit
def _apply_round_bf16(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, _round_bf16(tl.load(v_ptr + offs, mask=ok)), mask=ok)


def _rounded_by_kernel(v: torch.Tensor) -> torch.Tensor:
    """``_round_bf16`` applied to float32 ``v`` (the prep kernel's rounding), on v's device."""
    out = torch.empty_like(v)
    _apply_round_bf16[(1,)](v, out, v.numel(), BLOCK=triton.next_power_of_2(v.numel()))
    return out


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1", reason="set TRITON_INTERPRET=1")),
        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs CUDA")]),
    ],
)  # fmt: skip
def test_round_bf16_is_round_to_nearest_even(device: str) -> None:
    """The bf16-coefficient mode's rounding equals torch's float32 -> bf16 cast (nearest, ties
    to even), also at ties, at the largest finite values (-> inf) and for NaN / inf."""
    ties = torch.tensor(
        [0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF, 0x00018000], dtype=torch.int64
    )
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40])
    gen = torch.Generator().manual_seed(0)
    v = torch.cat(
        [ties.to(torch.int32).view(torch.float32), special, torch.randn(500, generator=gen)]
    )
    got = _rounded_by_kernel(v.to(device)).cpu()
    want = v.bfloat16().float()
    same = (got == want) | (got.isnan() & want.isnan())
    assert bool(same.all()), (v[~same], got[~same], want[~same])
