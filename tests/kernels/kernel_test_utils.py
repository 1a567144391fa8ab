"""Shared helpers for the kernel tests (device selection, error metric, router inputs with
NaN / +-inf and the documented router order written out)."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# CPU cases run the Triton kernels through the interpreter; without it there is nothing to test.
cpu_triton = pytest.mark.skipif(
    not INTERPRET, reason="set TRITON_INTERPRET=1 to run the Triton kernels on CPU"
)
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN in out gives NaN, which fails every bound)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def nonfinite_router_inputs(n: int, dtype: torch.dtype, seed: int) -> tuple:
    """(rows, cols) of 8 tokens of log-probabilities with NaN / +-inf planted: 0 a whole rows
    half NaN, 1 a single NaN, 2 a whole cols half NaN and one +inf row, 3 one +inf row and one
    -inf column (their sum is NaN), 4 rows all +inf and cols all -inf (every sum NaN), 5 both
    halves NaN, 6 a quarter each of NaN, +inf and -inf in both halves, 7 rows all -inf."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(8, n, generator=gen, dtype=torch.float64).log_softmax(-1)
    cols = torch.randn(8, n, generator=gen, dtype=torch.float64).log_softmax(-1)
    nan, inf = float("nan"), float("inf")
    pick = torch.randint(0, n, (4,), generator=gen)
    rows[0] = nan
    rows[1, pick[0]] = nan
    cols[2] = nan
    rows[2, pick[1]] = inf
    rows[3, pick[2]] = inf
    cols[3, pick[3]] = -inf
    rows[4], cols[4] = inf, -inf
    rows[5], cols[5] = nan, nan
    for half in (rows, cols):
        u = torch.rand(n, generator=gen)
        half[6] = torch.where(u < 0.25, nan, half[6])
        half[6] = torch.where((u >= 0.25) & (u < 0.5), inf, half[6])
        half[6] = torch.where((u >= 0.5) & (u < 0.75), -inf, half[6])
    rows[7] = -inf
    return rows.to(dtype), cols.to(dtype)


def documented_topk_ids(rows: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor:
    """The documented order (``reference.cartesian_topk_reference``), written out with numpy:
    ranking values (NaN as -inf, +inf as the largest finite value of float32, or of float64
    for float64 inputs); the top min(k, n) of each half by (value desc, index asc); of their
    pairs the k best by (float64 sum desc, id asc); the k ids per token in ascending order."""
    value_dtype = torch.float64 if torch.float64 in (rows.dtype, cols.dtype) else torch.float32
    big = torch.finfo(value_dtype).max

    def rank(x: torch.Tensor) -> np.ndarray:
        v = x.detach().cpu().to(value_dtype).double().numpy()
        return np.minimum(np.where(np.isnan(v), -np.inf, v), big)

    r, c = rank(rows), rank(cols)
    n = r.shape[1]
    kc = min(k, n)
    index = np.arange(n)
    out = []
    for t in range(r.shape[0]):
        ri = np.lexsort((index, -r[t]))[:kc]  # the last key sorts first: value desc, index asc
        ci = np.lexsort((index, -c[t]))[:kc]
        ids = (ri[:, None] * n + ci[None, :]).reshape(-1)
        with np.errstate(over="ignore"):  # float64 max + max = inf, as on the device
            sums = (r[t][ri][:, None] + c[t][ci][None, :]).reshape(-1)
        out.append(np.sort(ids[np.lexsort((ids, -sums))[:k]]))
    return torch.from_numpy(np.array(out, dtype=np.int64).reshape(r.shape[0], k))


@contextlib.contextmanager
def triton_launches() -> Iterator[Counter[str]]:
    """Count the Triton kernel launches inside the block, by kernel name.

    A kernel test that compares a backend="triton" call with the PyTorch reference proves
    nothing if the call quietly ran the reference (a dispatch that falls back on CPU, an
    ``auto`` that resolves to "torch"): asserting launches here rules that out. Patches the
    launcher of both the JIT kernels (GPU) and the interpreted ones (``TRITON_INTERPRET=1``)
    at the class, so every kernel object counts, wherever it was created.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    counts: Counter[str] = Counter()
    saved = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}

    def counting(original: Callable[..., Any]) -> Callable[..., Any]:
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not kwargs.get("warmup", False):  # warm-up compiles; it launches nothing
                counts[getattr(self.fn, "__name__", repr(self.fn))] += 1
            return original(self, *args, **kwargs)

        return run

    for cls, original in saved.items():
        cls.run = counting(original)
    try:
        yield counts
    finally:
        for cls, original in saved.items():
            cls.run = original


def assert_launched(counts: Counter[str], *prefixes: str) -> None:
    """Some kernel launched, and for each prefix a kernel whose name starts with it."""
    assert counts, "no Triton kernel launched: the call ran the PyTorch reference"
    for prefix in prefixes:
        assert any(name.startswith(prefix) for name in counts), (prefix, dict(counts))
