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


@pytest.fixture(autouse=True)
def _kernel_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    # Building a model sets these process-wide knobs from its config (model.expert_grad_*);
    # the kernel tests state the kernels' own defaults, whatever ran earlier in the process.
    from omnimoe_kernels import experts_dense_grad, experts_grad_blocks

    monkeypatch.setattr(experts_dense_grad, "FORCE_GRAD_PATH", None)
    monkeypatch.setattr(experts_dense_grad, "DENSE_COEF", "split")
    monkeypatch.setattr(experts_grad_blocks, "SEGMENT_PAIRS", 0)
