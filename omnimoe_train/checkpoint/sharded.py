"""The megatron-core engine's checkpoint: one ``dist_checkpointing`` sharded state dict.

What is saved, and how it reshards:

* ``model``: each chunk's ``sharded_state_dict()`` (megatron's TP/PP-aware ``ShardedTensor``s
  with global layer offsets; the OmniMoE expert tables describe their own EP shard, see
  ``OmniMoEMLP.sharded_state_dict``; router BatchNorm statistics are buffers, replicated).
  Keys are global, so any layout can read any other layout's checkpoint.
* ``optimizer``: megatron's ``optimizer.sharded_state_dict`` in a fully reshardable form (plain
  optimizer: Adam moments sharded like their parameters; distributed optimizer:
  ``fully_reshardable``, where each data-parallel group gathers its shards into the same
  per-parameter tensors on its first rank when saving, and every rank slices its range out of
  them when loading; megatron 0.19 no longer supports the flat-range format), with
  no ``chained_N.`` prefix so the tensor keys do not depend on how megatron splits the params
  into dense and expert optimizers.
* ``scheduler`` and ``client`` (the loop's state: step, tokens, data position, bad-step
  window...): plain objects, written once by rank 0.
* ``rank_local``: one ``ShardedObject`` per rank with its RNG states (torch, CUDA, megatron's
  tracker), restored only on the same layout; elsewhere the run keeps its fresh seed (one
  warning line). (The router BatchNorm statistics are equal on every replica, see
  ``model.router.apply_running_stats``, so the replicated copy in ``model`` is every rank's.)

On load the optimizer's tensors come from the checkpoint and its plain state (param groups,
hyper-parameters) from the current config, so a checkpoint loads whatever the optimizer's split
into groups or chains is now; the Adam step count is carried separately (``optimizer_updates``).

The optimizer's description and the megatron-core 0.19 workarounds around it (mixed bf16/fp32
parameters, the distributed optimizer on torch Adam, main params a plain-fp32 checkpoint does
not have) are in ``optimizer_state``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedBase,
    ShardedObject,
)
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
    load_sharded_metadata,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)

from omnimoe_train.checkpoint.files import read_meta
from omnimoe_train.checkpoint.optimizer_state import (
    SHARDING_METADATA,
    complete_state_copies,
    drop_missing_main_params,
    ensure_optimizer_state,
    optimizer_sharded_state_dict,
    optimizer_updates,
    resolve_unloaded,
    set_optimizer_updates,
)

# megatron logs a deprecation for its own async writer on every first save; we choose it on
# purpose (the alternative needs nvidia-resiliency-ext).
logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").setLevel(logging.ERROR)


class _WriterErrors(logging.Handler):
    """megatron's file writer logs a failed write's cause ("[Errno 28] No space left on
    device") and then raises an exception that names only its type; keep the logged cause
    for the one-line error instead of printing it as a log line."""

    PREFIX = re.compile(r"^Local worker \d+ encountered an error: ")

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(self.PREFIX.sub("", record.getMessage()))


def _logged_os_error(message: str) -> OSError:
    """The writer's logged cause as an ``OSError`` that keeps its errno where the message shows
    one ("[Errno 28] No space left on device"): the errno tells a full disk apart."""
    found = re.match(r"\[Errno (\d+)\] (.*)", message)
    return OSError(int(found[1]), found[2]) if found else OSError(message)


_writer_errors = _WriterErrors()
_writer_log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
_writer_log.addHandler(_writer_errors)
_writer_log.propagate = False


# -- helper processes die with the training process ---------------------------------------------
# megatron's "mcore" writer (the one in megatron-core; its alternative needs
# nvidia-resiliency-ext) forks two kinds of helpers: the multiprocessing manager that serves its
# write-results queue (one per process, alive until the process exits) and, for async saves, one
# worker per save. Neither watches its parent: after a kill -9 of the trainer the manager lived on
# as an orphan holding the trainer's memory, and it ignores SIGTERM because it inherits our stop
# handler (``signals.StopRequest``; it must, or a SLURM SIGTERM to every process would kill the
# helper the final save needs). So every child forked while we start a helper asks the kernel to
# SIGKILL it when its parent dies (prctl PR_SET_PDEATHSIG, Linux; elsewhere nothing is done).
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Resolved in the parent: the child only calls it (no dynamic loading after a fork).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_arming_pid: int | None = None  # set while this process forks a helper


def _bind_to_parent_in_child() -> None:
    parent = _arming_pid
    if parent is None or _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


os.register_at_fork(after_in_child=_bind_to_parent_in_child)


@contextlib.contextmanager
def helpers_die_with_this_process() -> Iterator[None]:
    """Children forked inside this block are SIGKILLed when this process dies (Linux)."""
    global _arming_pid
    _arming_pid = os.getpid()
    try:
        yield
    finally:
        _arming_pid = None


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """Every local model chunk's sharded state dict (keys are global; chunk names are not)."""
    return {
        f"chunk{i}": chunk.module.sharded_state_dict(metadata=dict(SHARDING_METADATA))
        for i, chunk in enumerate(chunks)
    }


def rank_local_state() -> dict[str, Any]:
    return {
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def restore_rank_local(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng_cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker"])


def _rank_local_object(data: Any) -> ShardedObject:
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rank_local", data, (world,), (rank,), replica_id=0)


def _dp_group() -> Any:
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _ignore_client_differences(common: dict[str, Any]) -> dict[str, Any]:
    # The loader's state names its data-parallel rank until the data pipeline's position becomes
    # dp-independent; rank 0's copy is the one saved, so differences are expected.
    return {k: v for k, v in common.items() if k != "client"}


class _AsyncWrite:
    """A megatron async save in flight: ``done`` finalises it on every rank (collective)."""

    def __init__(self, queue: AsyncCallsQueue) -> None:
        self.queue = queue

    def done(self, blocking: bool) -> bool:
        self.queue.maybe_finalize_async_calls(blocking=blocking)
        return self.queue.get_num_unfinalized_calls() == 0


def save(engine: Any, directory: Path, client_state: dict[str, Any], *, async_save: bool):  # noqa: ANN201
    """Write the engine's state (+ ``client_state``) into ``directory``; collective.

    Returns None when written, or an object with ``done(blocking)`` when ``async_save``.
    """
    ensure_optimizer_state(engine.optimizer)
    model_sd = model_sharded_state_dict(engine.model)
    state = {
        "model": model_sd,
        "optimizer": optimizer_sharded_state_dict(engine.optimizer, model_sd),
        "scheduler": engine.scheduler.state_dict(),
        "engine": {"optimizer_updates": optimizer_updates(engine.optimizer)},
        "client": client_state,
        "rank_local": _rank_local_object(rank_local_state()),
    }
    # megatron's writer reports results through a multiprocessing manager queue, by default
    # started with "spawn" (a fresh interpreter importing __main__: seconds per process).
    # Creating it once with "fork" first is its own public knob; the server touches no torch.
    with helpers_die_with_this_process():
        get_write_results_queue("fork")
    # Each data-parallel replica writes a share of the replicated tensors (megatron's wrapper).
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _dp_group())
    _writer_errors.messages.clear()
    try:
        request = dist_checkpointing.save(
            state,
            str(directory),
            sharded_strategy=strategy,
            async_sharded_save=async_save,
            preprocess_common_before_consistancy_check=_ignore_client_differences,
            async_strategy="mcore",
        )
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        if _writer_errors.messages and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise _logged_os_error(_writer_errors.messages[0]) from None
        raise
    if request is None:
        return None
    queue = AsyncCallsQueue(persistent=False)
    with helpers_die_with_this_process():  # forks the worker that writes the files
        queue.schedule_async_request(request)
    return _AsyncWrite(queue)


def _fill(target: Any, loaded: Any) -> None:
    """Put the loaded tensors at the places of the ShardedBase leaves of ``target``."""
    for key, value in loaded.items():
        if isinstance(target[key], ShardedBase):
            target[key] = value
        else:
            _fill(target[key], value)


def load(engine: Any, directory: Path, *, model_only: bool = False) -> dict[str, Any]:
    """Load a checkpoint of any layout into the engine; returns the saved ``client`` state.

    Restores the RNG states only when the checkpoint's layout equals the engine's
    (``engine.layout()``); says so in ``client["_rank_local_restored"]``.
    """
    meta = read_meta(directory)
    same_layout = meta.get("layout") == engine.layout()
    model_sd = model_sharded_state_dict(engine.model)
    request: dict[str, Any] = {"model": model_sd}
    opt_sd: dict[str, Any] | None = None
    fill_main_params = False
    if not model_only:
        ensure_optimizer_state(engine.optimizer)
        opt_sd = optimizer_sharded_state_dict(engine.optimizer, model_sd, is_loading=True)
        # The tensors only, under a key of their own: the checkpoint's plain optimizer state
        # (rank 0's param groups for its layout) must not be merged into this rank's.
        tensors, _ = extract_matching_values(
            opt_sd, lambda v: isinstance(v, ShardedBase), return_lists_as_dicts=True
        )
        stored = {v.key for v in load_sharded_metadata(str(directory)).values()}
        fill_main_params = drop_missing_main_params(tensors, stored)
        request["optimizer_tensors"] = tensors
        if same_layout:
            request["rank_local"] = _rank_local_object(None)
    strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(), _dp_group())
    loaded = dist_checkpointing.load(request, str(directory), sharded_strategy=strategy)
    for i, chunk in enumerate(engine.model):
        chunk.module.load_state_dict(loaded["model"][f"chunk{i}"])
    client = dict(loaded.get("client", {}))
    if model_only:
        return client
    assert opt_sd is not None
    updates = loaded["engine"]["optimizer_updates"]
    _fill(opt_sd, loaded["optimizer_tensors"])
    resolve_unloaded(opt_sd, updates)
    if fill_main_params:  # main params := the loaded weights, before the state load uses them
        engine.optimizer.reload_model_params()
    complete_state_copies(engine.optimizer)
    engine.optimizer.load_state_dict(opt_sd)
    if fill_main_params:  # ... and after it, which may have reset them from its own copy
        engine.optimizer.reload_model_params()
    set_optimizer_updates(engine.optimizer, updates)
    engine.scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        restore_rank_local(loaded["rank_local"])
    client["_rank_local_restored"] = same_layout
    return client
