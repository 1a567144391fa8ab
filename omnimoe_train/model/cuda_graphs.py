"""CUDA graphs of every transformer layer's MLP (``trainer.cuda_graphs=mlp``).

Why: at a80m's micro-batch (16 x 1024 tokens) an OmniMoE layer launches ~110 kernels forward
+ backward, ~215 with the expert-parallel exchanges, and under expert parallelism every
collective makes both ranks wait for the slower host: a rows layer step measured ~3.6 ms more
host time than a local one for ~1.25 ms more GPU work on an H200
(``benchmarks/profile_expert_parallel.py``). A CUDA graph replays the whole forward (and
backward) as one launch: the host no longer paces the GPU, and the collectives inside the
graph start when the GPU reaches them.

How: ``torch.cuda.make_graphed_callables`` (the library's capture of a module's forward and
backward, with its own autograd function and static buffers), applied to all MLPs of a model
chunk in one call, so their graphs share one memory pool in execution order (forward 1..L,
backward L..1: exactly the order of a step without pipeline parallelism, micro-batch after
micro-batch). megatron-core's ``CudaGraphManager`` graphs whole layers but needs Transformer
Engine's RNG tracker or megatron's graph-safe one; the MLP alone needs neither (no dropout).

Two things the capture needs from the rest of the engine, both measured on an H200 (torch 2.11;
``benchmarks/diag_cuda_graphs.py`` reproduces them):
  * megatron's DDP holds every parameter's ``AccumulateGrad`` node (its gradient hooks hang on
    them), and a node remembers the stream it was made on. Made on the legacy default stream,
    the capture's backward has to wait on that stream, which invalidates the capture
    (``cudaErrorStreamCaptureInvalidated``; PyTorch warns about the stream mismatch). So the
    engine builds the DDP wrapper under :func:`graph_safe_stream`, as PyTorch's CUDA-graph notes
    prescribe for DDP ("construct DDP in a side-stream context");
  * the capture runs in ``thread_local`` mode: in ``global`` mode any other thread's unsafe
    CUDA call during the capture (the data loader's pinned-memory allocations, the NCCL
    watchdog) invalidates it.

What is not a kernel is replayed by hand, per call, outside the graph:
  * the router's BatchNorm statistics go to ``GateNorm.pending`` (the engine applies them at
    the end of the step): captured as extra graph outputs, cloned into the list per replay;
  * the expert-parallel dispatch counters (``DispatchCounters``): the host-side byte counts of
    the captured call are constant; its two device counters come back as graph outputs.
In-place device updates (``ExpertStats`` counters) are part of the graph. The buffers the
capture's warm-up moved are put back afterwards, so a graphed run trains like an eager one
(the same kernels on the same values; ``tests/train/test_cuda_graphs.py``, GPU).

Eager fallbacks: evaluation (``eval()`` or no grad), another input shape, a padding mask.
The rules (``validation/engine.py``): CUDA, megatron engine, ``model.mlp`` omnimoe or dense,
no pipeline or tensor parallelism. With ``trainer.compile=layers`` the rest of each layer is
compiled and the MLP call is a graph break that replays its graph (``_GraphedForward``).
Expert parallelism in either table sharding is captured with its NCCL exchanges; with
``parallel.ep_overlap`` the exchanges run on NCCL's stream, forked from the capture stream and
joined back where the layer waits for them, so in the replayed graph they run beside the
router and the shared SwiGLU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from omnimoe_train.model.router import GateNorm


class _Recorder:
    """Stands in for ``ExpertParallel.counters`` during capture: keeps the call's stats."""

    def __init__(self) -> None:
        self.stats: Any = None

    def add(self, stats: Any) -> None:
        self.stats = stats


class _MLPCore(nn.Module):
    """One MLP's training forward as make_graphed_callables wants it: tensors in, tensors out.

    Outputs: y [S, B, D], then each GateNorm's recorded statistics (2, n), then (dispatch
    only) the call's ``local_pairs`` and ``owner_ranks`` device counters.
    """

    def __init__(self, mlp: nn.Module, forward: Callable) -> None:
        super().__init__()
        self.mlp, self._forward = mlp, forward
        self.norms = [m for m in mlp.modules() if isinstance(m, GateNorm)]
        self.dispatch = getattr(mlp, "expert_parallel", None)
        self.template: Any = None  # the dispatch's stats of the captured call

    def forward(self, hidden_SBD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pending = [n.pending for n in self.norms]
        for norm in self.norms:
            norm.pending = []
        counters = None
        if self.dispatch is not None:
            counters, self.dispatch.counters = self.dispatch.counters, _Recorder()
        try:
            y_SBD, _ = self._forward(hidden_SBD)
            stats = [t for n in self.norms for t in n.pending]
            if len(stats) != len(self.norms):
                raise RuntimeError("a graphed router did not record one statistic per norm")
            extra: list[torch.Tensor] = []
            if self.dispatch is not None:
                self.template = self.dispatch.counters.stats
                extra = [self.template.local_pairs, self.template.owner_ranks]
        finally:
            for norm, saved in zip(self.norms, pending, strict=True):
                norm.pending = saved
            if counters is not None:
                self.dispatch.counters = counters
        return (y_SBD, *stats, *extra)


class _GraphedForward:
    """The replacement ``forward`` of one MLP: the graph in training, eager otherwise."""

    def __init__(self, mlp: nn.Module, eager: Callable, group: _GraphGroup) -> None:
        self.mlp, self.eager, self.group = mlp, eager, group
        self.core = _MLPCore(mlp, eager)
        self.graphed: Callable | None = None

    # A graph break under ``trainer.compile=layers``: dynamo compiles the rest of the layer
    # (norms, attention, residuals) and leaves this call, a replay of the captured MLP, to
    # run as it is (tracing into it would trace the capture and the replay's Python).
    @torch.compiler.disable
    def __call__(self, hidden_SBD: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        padding = kwargs.get("padding_mask", args[0] if args else None)
        if not (self.mlp.training and torch.is_grad_enabled()) or padding is not None:
            return self.eager(hidden_SBD, *args, **kwargs)
        if self.group.shape is None:  # the first training call of the chunk: capture them all
            self.group.capture(hidden_SBD.shape, hidden_SBD.dtype)
        if hidden_SBD.shape != self.group.shape or self.graphed is None:
            return self.eager(hidden_SBD, *args, **kwargs)
        y_SBD, *rest = self.graphed(hidden_SBD)
        for norm in self.core.norms:
            stats = rest.pop(0).clone()  # the graph overwrites it at the next replay
            if norm.pending is not None:
                norm.pending.append(stats)
            else:
                norm.record(stats)
        if self.core.dispatch is not None:
            local_pairs, owner_ranks = (t.clone() for t in rest)
            self.core.dispatch.counters.add(
                dataclasses.replace(
                    self.core.template, local_pairs=local_pairs, owner_ranks=owner_ranks
                )
            )
        return y_SBD, None


class _GraphGroup:
    """The MLPs of one model chunk, captured together (one memory pool, execution order) at
    the first training call, from that call's input shape and dtype."""

    def __init__(self, model: nn.Module, mlps: list[nn.Module]) -> None:
        self.model, self.shape = model, None
        self.wrappers = [_GraphedForward(mlp, mlp.forward, self) for mlp in mlps]

    def capture(self, shape: torch.Size, dtype: torch.dtype) -> None:
        self.shape = shape
        device = torch.device("cuda", torch.cuda.current_device())
        buffers = {name: buf.clone() for name, buf in self.model.named_buffers()}
        generator = torch.Generator(device=device).manual_seed(0)
        samples = tuple(
            (torch.randn(shape, dtype=dtype, device=device, generator=generator)
             .requires_grad_(),)
            for _ in self.wrappers
        )  # fmt: skip
        graphed = _make_graphed_callables(tuple(w.core for w in self.wrappers), samples)
        with torch.no_grad():  # the warm-up moved statistics and counters: put them back
            for name, buf in self.model.named_buffers():
                buf.copy_(buffers[name])
        for wrapper, fn in zip(self.wrappers, graphed, strict=True):
            wrapper.graphed = fn

    def release(self) -> None:
        """Drop the graphs and give the MLPs their eager ``forward`` back."""
        for wrapper in self.wrappers:
            wrapper.graphed = None
            if "forward" in vars(wrapper.mlp):
                del wrapper.mlp.forward
        self.wrappers = []


#: Every model chunk's graphs, until ``release_graphs``.
_LIVE: list[_GraphGroup] = []


def release_graphs() -> None:
    """Destroy every captured graph and free its memory pool; the MLPs run eagerly again.

    Call before the process group goes: a graph that captured NCCL kernels (expert
    parallelism's exchanges) and outlives its communicator makes ``destroy_process_group``
    hang (measured: both ranks of an ``ep2_rows`` run stuck there after a finished run; the
    graphs live in reference cycles, model <-> wrapper, that only the garbage collector breaks).
    """
    if not _LIVE:
        return
    # After a CUDA error (already on its way out: the one to report) the sync raises again.
    with contextlib.suppress(RuntimeError):
        torch.cuda.synchronize()
    for group in _LIVE:
        group.release()
    _LIVE.clear()
    gc.collect()
    torch.cuda.empty_cache()


def _make_graphed_callables(cores: tuple[nn.Module, ...], samples: tuple) -> tuple:
    """``torch.cuda.make_graphed_callables`` capturing in ``thread_local`` mode.

    Why: in the default ``global`` mode any other thread's unsafe CUDA call during the capture
    (the data loader's pinned-memory allocations, the NCCL watchdog's event queries)
    invalidates it; megatron-core's own graphs capture ``thread_local`` for the same reason.
    Newer torch takes
    the mode as an argument; older torch (2.11) only through its ``graph`` context manager,
    whose default is switched for the duration of the call.
    """
    kwargs: dict[str, Any] = {"num_warmup_iters": 3, "allow_unused_input": True}
    make = torch.cuda.make_graphed_callables
    if "capture_error_mode" in inspect.signature(make).parameters:
        return make(cores, samples, capture_error_mode="thread_local", **kwargs)
    graphs, original = torch.cuda.graphs, torch.cuda.graphs.graph

    class _ThreadLocalGraph(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **options: Any) -> None:
            options.setdefault("capture_error_mode", "thread_local")
            super().__init__(*args, **options)

    graphs.graph = torch.cuda.graph = _ThreadLocalGraph
    try:
        return make(cores, samples, **kwargs)
    finally:
        graphs.graph = torch.cuda.graph = original


@contextlib.contextmanager
def graph_safe_stream(enabled: bool) -> Iterator[None]:
    """Run the body (the DDP wrapping) on a fresh side stream when ``enabled`` and CUDA is
    available, so the ``AccumulateGrad`` nodes DDP keeps are not tied to the legacy default
    stream (see the module docstring); the current stream waits for it afterwards."""
    if not (enabled and torch.cuda.is_available()):
        yield
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


def graph_mlps(model: nn.Module) -> int:
    """Route the training calls of every transformer layer's ``mlp`` in ``model`` (one model
    chunk on a CUDA device; call after DDP wrapping, parameters final) through CUDA graphs,
    captured at the first training call from its input [S, B, D]. Returns the number of MLPs.

    Every rank of an expert-parallel group captures at the same point (its first training
    micro-batch), as the capture's warm-up runs the exchanges. The model's buffers (router
    BatchNorm statistics, expert usage counters) are restored after the warm-up. Raises
    RuntimeError if CUDA is missing.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("trainer.cuda_graphs needs a CUDA device")
    decoder = next((m.decoder for m in model.modules() if hasattr(m, "decoder")), None)
    mlps = [layer.mlp for layer in getattr(decoder, "layers", [])]
    if not mlps:
        return 0
    group = _GraphGroup(model, mlps)
    for mlp, wrapper in zip(mlps, group.wrappers, strict=True):
        mlp.forward = wrapper
    _LIVE.append(group)
    return len(mlps)
