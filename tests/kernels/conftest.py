"""Kernel tests run the Triton kernels themselves: on a GPU, or on the CPU through Triton's
interpreter, so CI (no GPU) tests the very code that runs on the GPU."""

from __future__ import annotations

import os

import pytest
import torch

ON_CPU = not torch.cuda.is_available()
if ON_CPU:
    # Must be set before the kernel modules are imported: @triton.jit picks the interpreter then.
    os.environ["TRITON_INTERPRET"] = "1"
    import omnimoe_kernels.triton_ops  # noqa: F401


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    # backend="auto" sends CPU tensors to Triton only while the variable is set.
    if ON_CPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
