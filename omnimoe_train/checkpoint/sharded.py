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
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
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

# Reshardable over TP, PP, EP, DP; tensor keys independent of megatron's optimizer chaining.
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}

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


_writer_errors = _WriterErrors()
_writer_log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
_writer_log.addHandler(_writer_errors)
_writer_log.propagate = False


def _chained(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """Every local model chunk's sharded state dict (keys are global; chunk names are not)."""
    return {
        f"chunk{i}": chunk.module.sharded_state_dict(metadata=dict(SHARDING_METADATA))
        for i, chunk in enumerate(chunks)
    }


def optimizer_updates(optimizer: Any) -> int:
    """Adam's step count: the number of updates applied (skipped steps excluded)."""
    for opt in _chained(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            if "step" in group:
                return int(group["step"])
        for state in inner.state.values():
            if "step" in state:
                return int(state["step"])
    return 0


def set_optimizer_updates(optimizer: Any, updates: int) -> None:
    """Give every parameter its own step tensor (torch Adam) and every group the count."""
    for opt in _chained(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            if "step" in group:
                group["step"] = updates
        for state in inner.state.values():
            if "exp_avg" in state:
                state["step"] = torch.tensor(float(updates), dtype=torch.float32)


def ensure_optimizer_state(optimizer: Any) -> None:
    """Create Adam's state (zero moments, step 0) where no update has run yet.

    megatron's distributed optimizer reads every parameter's ``step`` when describing its
    state (without TransformerEngine/apex), which a fresh torch Adam does not have yet.
    """
    for opt in _chained(optimizer):
        inner = getattr(opt, "optimizer", None)
        init = getattr(opt, "init_state_fn", None)
        if inner is None or init is None or len(inner.state) > 0:
            continue
        init(inner, opt.config)
        for state in inner.state.values():
            if "exp_avg" in state and "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)


def _complete_state_copies(optimizer: Any) -> None:
    """Let megatron 0.19's distributed optimizer load a ``fully_reshardable`` state into torch
    Adam (no TransformerEngine/apex): its per-parameter copy visits every tensor of the live
    Adam state, ``step`` included, and of the main param, but the checkpoint's tensors never
    hold ``step`` (megatron keeps it out) and a plain-fp32 checkpoint has no main params. The
    missing entries are filled with the live tensors themselves (a no-op copy); the step count
    and main params are set right after the load."""
    for opt in _chained(optimizer):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None or getattr(setter, "_completes_missing", False):
            continue

        def complete(model_param: Any, tensors: dict, _opt: Any = opt, _set: Any = setter) -> None:
            group, order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group]["params"][order]
            live = {k: v for k, v in _opt.optimizer.state[main_param].items() if torch.is_tensor(v)}
            _set(model_param, {"param": main_param, **live, **tensors})

        complete._completes_missing = True  # type: ignore[attr-defined]
        opt._set_main_param_and_optimizer_states = complete


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
        "optimizer": engine.optimizer.sharded_state_dict(
            model_sd, metadata=dict(SHARDING_METADATA)
        ),
        "scheduler": engine.scheduler.state_dict(),
        "engine": {"optimizer_updates": optimizer_updates(engine.optimizer)},
        "client": client_state,
        "rank_local": _rank_local_object(rank_local_state()),
    }
    # megatron's writer reports results through a multiprocessing manager queue, by default
    # started with "spawn" (a fresh interpreter importing __main__: seconds per process).
    # Creating it once with "fork" first is its own public knob; the server touches no torch.
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
            raise OSError(_writer_errors.messages[0]) from None
        raise
    if request is None:
        return None
    queue = AsyncCallsQueue(persistent=False)
    queue.schedule_async_request(request)
    return _AsyncWrite(queue)


# Main (fp32) parameter copies: the plain bf16 optimizer and the distributed optimizer name them
# differently; a plain fp32 optimizer has none (its main params are the model weights).
_MAIN_PARAM = ("optimizer.state.fp32_param.", "optimizer.state.param.")


def _fill(target: Any, loaded: Any) -> None:
    """Put the loaded tensors at the places of the ShardedBase leaves of ``target``."""
    for key, value in loaded.items():
        if isinstance(target[key], ShardedBase):
            target[key] = value
        else:
            _fill(target[key], value)


def _drop_missing_main_params(request: dict[str, Any], stored: set[str]) -> bool:
    """Drop main-param requests a checkpoint lacks (one written by the plain fp32 optimizer,
    whose main params are the model weights). True if any was dropped."""
    dropped = False

    def walk(node: Any) -> None:
        nonlocal dropped
        for key in list(node):
            value = node[key]
            if isinstance(value, ShardedBase):
                if value.key.startswith(_MAIN_PARAM) and value.key not in stored:
                    del node[key]
                    dropped = True
            elif isinstance(value, dict):
                walk(value)

    walk(request)
    return dropped


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
        opt_sd = engine.optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=dict(SHARDING_METADATA)
        )
        # The tensors only, under a key of their own: the checkpoint's plain optimizer state
        # (rank 0's param groups for its layout) must not be merged into this rank's.
        tensors, _ = extract_matching_values(
            opt_sd, lambda v: isinstance(v, ShardedBase), return_lists_as_dicts=True
        )
        stored = {v.key for v in load_sharded_metadata(str(directory)).values()}
        fill_main_params = _drop_missing_main_params(tensors, stored)
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
    _resolve_unloaded(opt_sd, updates)
    if fill_main_params:  # main params := the loaded weights, before the state load uses them
        engine.optimizer.reload_model_params()
    _complete_state_copies(engine.optimizer)
    engine.optimizer.load_state_dict(opt_sd)
    if fill_main_params:  # ... and after it, which may have reset them from its own copy
        engine.optimizer.reload_model_params()
    set_optimizer_updates(engine.optimizer, updates)
    engine.scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        restore_rank_local(loaded["rank_local"])
    client["_rank_local_restored"] = same_layout
    return client


def _resolve_unloaded(node: Any, updates: int) -> None:
    """Turn the rest of a filled sharded optimizer state into a plain one.

    Local-only objects (megatron's param-id lists) are unwrapped; each Adam state gets its own
    ``step`` (megatron leaves it out of the tensors). Tensors not requested because the
    checkpoint lacks them can only be main-param copies: dropped where they are dict entries
    (the distributed optimizer then keeps its live main param), kept as the live tensor in
    lists (the bf16 optimizer's), and refreshed from the loaded weights by the caller.
    """
    if isinstance(node, dict) and "exp_avg" in node and "step" not in node:
        node["step"] = torch.tensor(float(updates), dtype=torch.float32)
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in list(items):
        if isinstance(value, LocalNonpersistentObject):
            node[key] = value.unwrap()
        elif isinstance(value, ShardedBase):
            if not value.key.startswith(_MAIN_PARAM):
                raise KeyError(f"checkpoint has no tensor for {value.key}")
            if isinstance(node, dict):
                del node[key]
            else:
                node[key] = value.data
        elif isinstance(value, (dict, list)):
            _resolve_unloaded(value, updates)
