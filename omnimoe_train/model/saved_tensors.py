"""What a forward keeps for its backward: every tensor packed by autograd, with the stage of the
layer that saved it, deduplicated by storage (``benchmarks/activation_memory.py`` and the
saved-bytes tests).

Shape suffixes: T tokens, D hidden. A tensor is attributed to the innermost Python frame that
``STAGE_RULES`` names at the moment autograd packs it (``torch.autograd.graph.
saved_tensors_hooks``), and to the autograd node slots that hold it (a walk of the graph from
the output: builtin nodes expose ``_saved_<name>``, custom functions ``saved_tensors``).
Tensors sharing a storage count once, with the storage's bytes (what the saved view keeps
alive); parameters, buffers and the forward's input are listed but not counted (they are alive
whatever the layer saves).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import torch
from torch import nn

# (file fragment, function-name prefix or "", stage): the first rule matching a frame, searched
# from the op outward, names the stage.
STAGE_RULES = (
    ("router_gates.py", "", "router gates"),
    ("model/router.py", "gate_log_probs", "router gates"),
    ("model/router.py", "selected_weights", "routing weights"),
    ("router_topk.py", "", "top-K"),
    ("kernels/reference.py", "cartesian_topk", "top-K"),
    ("experts_autograd.py", "", "experts"),
    ("kernels/reference.py", "atomic_experts", "experts"),
    ("expert_stats.py", "", "statistics"),
    ("megatron/core", "", "SwiGLU"),
)


@dataclass
class SavedTensor:
    """One tensor packed for the backward. ``nbytes``: its storage's bytes; ``counted`` is False
    for parameters and buffers, the forward's input and storages listed before."""

    stage: str
    slots: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    counted: bool
    note: str


def stage_of(frame: FrameType | None) -> str:
    """The stage (``STAGE_RULES``) of the innermost frame from ``frame`` outward that a rule
    names; "other" if none does."""
    while frame is not None:
        path, fn = frame.f_code.co_filename.replace(os.sep, "/"), frame.f_code.co_name
        for fragment, prefix, stage in STAGE_RULES:
            if fragment in path and fn.startswith(prefix):
                return stage
        frame = frame.f_back
    return "other"


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def graph_slots(root: torch.autograd.graph.Node | None) -> dict[tuple, list[str]]:
    """(storage pointer, offset, shape, dtype) -> ["Node.slot", ...] of every saved tensor
    reachable from ``root``."""
    slots: dict[tuple, list[str]] = {}
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found = [(a, getattr(node, a, None)) for a in dir(node) if a.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):
            found += [(f"saved[{i}]", t) for i, t in enumerate(node.saved_tensors)]
        for name, t in found:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                slots.setdefault(_key(t), []).append(f"{type(node).__name__}.{name}")
        todo += [fn for fn, _ in node.next_functions]
    return slots


def saved_for_backward(
    forward: Callable[[], torch.Tensor], module: nn.Module, inputs: list[torch.Tensor]
) -> tuple[torch.Tensor, list[SavedTensor]]:
    """Run ``forward()`` (which returns one tensor) and list what autograd saved for its
    backward, in packing order. ``module``'s parameters and buffers and ``inputs`` are not
    counted. Returns (the output, the list)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in module.buffers()}
    given = {t.untyped_storage().data_ptr() for t in inputs}
    raw: list[tuple[torch.Tensor, str]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        raw.append((t, stage_of(sys._getframe(1))))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    slots = graph_slots(out.grad_fn)
    rows, seen = [], set()
    for t, stage in raw:
        ptr = t.untyped_storage().data_ptr()
        note = ""
        if ptr in params:
            note = "parameter"
        elif ptr in given:
            note = "input"
        elif ptr in seen:
            note = "same storage as above"
        seen.add(ptr)
        rows.append(
            SavedTensor(
                stage=stage,
                slots=", ".join(slots.get(_key(t), ["?"])),
                shape=tuple(t.shape),
                dtype=str(t.dtype).removeprefix("torch."),
                nbytes=t.untyped_storage().nbytes(),
                counted=not note,
                note=note,
            )
        )
    return out, rows


def counted_bytes(rows: list[SavedTensor], stages: tuple[str, ...] | None = None) -> int:
    """Bytes of the counted tensors of ``rows`` (those of ``stages`` only, if given)."""
    return sum(r.nbytes for r in rows if r.counted and (stages is None or r.stage in stages))
