"""Rank-side bodies of the ``rows`` pair-range tests: with ascending ids the rows op hands the
kernels each token's run of this rank's slots (``omnimoe_kernels.rows_routing``), and the values
stay those of the single-process op.

Every call the op makes to ``omnimoe_kernels.atomic_experts`` is recorded and its ranges checked
against what they mean, independently of how they were computed: inside a token's range every
local id is < E (this rank's), outside it every one is E ("no expert"), so the range holds all
of the token's pairs on this rank and nothing else; the order is a permutation sorted by count, longest first.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist

import omnimoe_kernels
from omnimoe_train.parallel import rows_dispatch
from omnimoe_train.parallel.expert_parallel import ExpertParallel

from .sharding_checks import Case, _build, _table_shards, check_case


class _Recorder:
    """Stands in for ``omnimoe_kernels`` inside ``rows_dispatch``: runs the real op and keeps
    (local ids, pair_ranges, E) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, tuple | None, int]] = []

    def atomic_experts(self, x, up, down, weights, ids, **kwargs):  # noqa: ANN001, ANN201
        self.calls.append((ids.clone(), kwargs.get("pair_ranges"), up.shape[0]))
        return omnimoe_kernels.atomic_experts(x, up, down, weights, ids, **kwargs)

    def check(self, ascending: bool) -> None:
        assert self.calls, "the rows op made no atomic_experts call"
        for ids_GK, ranges, experts in self.calls:
            if not ascending:
                assert ranges is None
                continue
            assert ranges is not None, "ascending ids but no pair ranges"
            _check_ranges(ids_GK, ranges, experts)
        self.calls.clear()


def _check_ranges(ids_GK: torch.Tensor, ranges: tuple, experts: int) -> None:
    start_G, count_G, order_G = ranges
    tokens, top_k = ids_GK.shape
    assert all(t.dtype == torch.int32 and t.shape == (tokens,) for t in ranges)
    slot_K = torch.arange(top_k)
    inside_GK = (slot_K >= start_G[:, None].long()) & (slot_K < (start_G + count_G)[:, None].long())
    assert bool((start_G >= 0).all() and (start_G + count_G <= top_k).all())
    assert bool((ids_GK[inside_GK] < experts).all()), "a range holds another rank's pair"
    assert bool((ids_GK[~inside_GK] == experts).all()), "a pair of this rank outside its range"
    assert torch.equal(order_G.sort().values, torch.arange(tokens, dtype=torch.int32))
    counts = count_G[order_G.long()]
    assert bool((counts[1:] <= counts[:-1]).all()), "tiles not in descending count order"


def _expert_parallel_step(case: Case, overlap: bool, ascending: bool) -> list[torch.Tensor]:
    """One forward + backward through ``ExpertParallel`` (the layer's entry): y, dx, dweights,
    dU, dV of this rank. Equal token counts per rank (the layer's setting)."""
    rank = dist.get_rank()
    full = _build(case, torch.float32)
    full["indices"] = full["indices"].sort(1).values
    tokens = case.tokens_per_rank[rank]
    mine = slice(rank * tokens, (rank + 1) * tokens)
    x = full["x"][mine].clone().requires_grad_()
    weights = full["weights"][mine].clone().requires_grad_()
    up, down = _table_shards(full, case, "rows")
    ep = ExpertParallel(
        "rows", None, num_experts=case.num_experts, backend="triton", overlap=overlap
    )
    early = ep.start(x)
    y = ep(
        x, up, down, weights, full["indices"][mine], record=False, early=early,
        distinct_ids=True, ascending_ids=ascending,
    )  # fmt: skip
    if overlap:
        y = y.finish()
    (y * full["cotangent"][mine]).sum().backward()
    return [y.detach(), x.grad, weights.grad, up.grad, down.grad]


def check_rows_pair_ranges(cases: list[Case], equal_cases: list[Case]) -> None:
    """``cases``: the rows op with ascending ids against the single-process op (Triton kernels,
    through the interpreter), its ranges checked. ``equal_cases`` (equal tokens per rank):
    ``ExpertParallel`` with and without the overlap, ascending ids or not, the same values."""
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are first imported
    recorder = _Recorder()
    rows_dispatch.omnimoe_kernels = SimpleNamespace(atomic_experts=recorder.atomic_experts)
    try:
        for case in cases:
            check_case(case, "rows", known_tokens=True, backend="triton", ascending_ids=True)
            recorder.check(ascending=True)
        for case in equal_cases:
            plain = _expert_parallel_step(case, overlap=False, ascending=False)
            recorder.check(ascending=False)
            for overlap in (False, True):
                ranged = _expert_parallel_step(case, overlap=overlap, ascending=True)
                recorder.check(ascending=True)
                names = ("y", "dx", "dweights", "dU", "dV")
                for name, a, b in zip(names, ranged, plain, strict=True):
                    scale = b.abs().max().clamp_min(1e-12)
                    assert ((a - b).abs().max() / scale).item() <= 1e-5, (case, overlap, name)
    finally:
        rows_dispatch.omnimoe_kernels = omnimoe_kernels
