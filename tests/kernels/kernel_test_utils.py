"""Shared helpers for the kernel tests (device selection, error metric)."""

from __future__ import annotations

import os

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
