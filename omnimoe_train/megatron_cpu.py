"""Run megatron-core on machines without a GPU.

megatron-core assumes CUDA in a handful of places: it asks ``torch.cuda.current_device()`` for
the device of new tensors, keeps its RNG-tracker states through ``torch.cuda`` RNG calls, builds
the causal mask and its optimizer's scalars with a literal ``device="cuda"``, moves tensors with
``.cuda()``, creates CUDA streams/events, compares ``tensor.type()`` with
``"torch.cuda.FloatTensor"``, and its MoE token dispatcher makes host lists only of CUDA tensors. Everything else (its layers, DDP, optimizers, schedules) is
device-agnostic once those answer for the CPU.

:func:`apply_cpu_patches` redirects exactly those calls to the CPU: a few ``torch.cuda`` functions
are replaced, and a torch-function mode maps ``device="cuda"``/``.cuda()`` to the CPU and reports
CPU tensors' ``type()`` under their CUDA name. It is applied only when no GPU is present
(``torch.cuda.is_available()`` is false), is idempotent, and is the only place in the project
that patches megatron-core.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_applied = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CudaToCpuMode(TorchFunctionMode):
    """Answers megatron's requests for CUDA tensors with CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


class _NullEvent:
    """Stands in for ``torch.cuda.Event``: everything on the CPU is already synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullStream(_NullEvent):
    """Stands in for ``torch.cuda.Stream``."""

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> _NullEvent:
        return _NullEvent()


def _patch_moe_dispatcher() -> None:
    """MoE alltoall dispatcher (GShard / DeepSeekMoE baselines under expert parallelism).

    It turns its per-rank split sizes into host sequences with ``maybe_move_tensor_to_cpu(t,
    as_numpy=True)``, which converts only CUDA tensors; on the CPU the tensors would reach
    ``all_to_all_single``, which takes sequences. Here CPU tensors become numpy arrays too.
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def _to_host(
        tensor: Any, as_numpy: bool = False, record_stream: bool = False
    ) -> Any:  # the same signature as megatron's
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = _to_host
    token_dispatcher.maybe_move_tensor_to_cpu = _to_host


def apply_cpu_patches() -> bool:
    """Make megatron-core usable on the CPU. Returns True if patches are (now) active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True

    cuda = torch.cuda
    # Device of new tensors: megatron passes this straight to ``device=``.
    cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    # RNG: megatron's tracker swaps "CUDA" generator states in and out; on a CPU-only machine
    # every random op draws from the CPU generator, so that is the one to swap.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)  # type: ignore[assignment]
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)  # type: ignore[assignment]
    cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    cuda.Event = _NullEvent  # type: ignore[assignment,misc]
    cuda.Stream = _NullStream  # type: ignore[assignment,misc]
    cuda.current_stream = lambda device=None: _NullStream()  # type: ignore[assignment]
    cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]
    cuda.synchronize = lambda device=None: None  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mrandom

    def _get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def _set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    _patch_moe_dispatcher()
    # The tracker warns when the CPU stream moves inside a fork; here that is the forked stream.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)
    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state
    # Entered for the life of the process: a CPU-only process has no CUDA tensors to protect.
    _CudaToCpuMode().__enter__()
    _applied = True
    return True
