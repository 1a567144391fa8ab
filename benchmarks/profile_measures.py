"""What ``profile_expert_parallel.py`` measures a layer step with: the bytes a rank hands to
``torch.distributed`` (``WireBytes``, checked against the cost model's prediction), the CUDA
kernels' categories, and the GPU's busy time from the profiler's events.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

CATEGORIES = (  # first match wins; names of CUDA kernels as the profiler lists them
    ("nccl", ("nccl",)),
    ("routing", ("_select", "_emit", "softmax", "batch_norm", "log_softmax")),
    ("expert kernels", ("_pair_scores", "_combine_rows", "_pair_block_grad", "_zero_rows")),
    ("sort/search", ("sort", "radix", "searchsorted", "Sort")),
    ("gemm (gates, SwiGLU)", ("gemm", "Gemm", "cutlass", "sm90", "nvjet", "cublas")),
    ("copies/fills", ("copy", "Copy", "fill", "Fill", "cat", "memcpy", "Memcpy", "memset")),
)


class WireBytes:
    """Bytes this rank sends through ``torch.distributed`` collectives while active: measured
    from the tensors of each call (the self chunk of a collective stays on the device), not
    from the cost model's formulas, which this checks."""

    def __init__(self) -> None:
        self.sent = 0.0
        self._saved: dict[str, Callable] = {}

    def _wrap(self, name: str, count: Callable[..., float]) -> None:
        original = getattr(dist, name)
        self._saved[name] = original

        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.sent += count(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    def __enter__(self) -> WireBytes:
        def size(group) -> int:  # noqa: ANN001
            return dist.get_world_size(group)

        def a2a(out, inp, output_split_sizes=None, input_split_sizes=None, group=None, **_):  # noqa: ANN001, ANN202
            row = inp[0].numel() * inp.element_size() if inp.dim() else 0
            if input_split_sizes is None:
                return inp.numel() * inp.element_size() * (size(group) - 1) / size(group)
            mine = input_split_sizes[dist.get_rank(group)]
            return (sum(input_split_sizes) - mine) * row

        def gather(out, inp, group=None, **_):  # noqa: ANN001, ANN202
            return inp.numel() * inp.element_size() * (size(group) - 1)

        def scatter(out, inp, group=None, **_):  # noqa: ANN001, ANN202
            return inp.numel() * inp.element_size() * (size(group) - 1) / size(group)

        def reduce(t, op=None, group=None, **_):  # noqa: ANN001, ANN202
            return 2 * t.numel() * t.element_size() * (size(group) - 1) / size(group)

        self._wrap("all_to_all_single", a2a)
        self._wrap("all_gather_into_tensor", gather)
        self._wrap("reduce_scatter_tensor", scatter)
        self._wrap("all_reduce", reduce)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def categorize(name: str) -> str:
    for category, keys in CATEGORIES:
        if any(k in name for k in keys):
            return category
    return "other elementwise"


def gpu_busy_ms(events) -> float:  # noqa: ANN001
    """Milliseconds in which at least one kernel or copy ran (the union of their intervals,
    any stream), from a profiler's events: a layer step whose wall time is well above it is
    waiting on the host (launch-bound) or on another rank."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    busy, current = 0.0, None
    for start, end in spans:
        if current is None or start > current[1]:
            if current is not None:
                busy += current[1] - current[0]
            current = [start, end]
        else:
            current[1] = max(current[1], end)
    if current is not None:
        busy += current[1] - current[0]
    return busy / 1e3
