"""The DeepSpeed engine's checkpoint: DeepSpeed's own files, plus what DeepSpeed does not keep.

Inside one checkpoint folder (the engine-independent rules -- atomic publish, checksums,
retention, resume and fallback -- belong to the checkpoint manager, which calls :func:`save`
and :func:`load` on a folder):

* ``deepspeed/``: ``engine.save_checkpoint(folder, tag="deepspeed")`` -- the module state
  (``mp_rank_00_model_states.pt``, with the loop's ``client`` state and our WSD scheduler in
  it) and one ZeRO optimizer partition per data-parallel rank (``zero_pp_rank_*``); under
  ZeRO-3 also one parameter partition per rank.
* ``zero_to_fp32.py``: DeepSpeed's recovery script (it copies it; :func:`consolidate` calls the
  same code in-process).
* ``rank_<5 digits>.pt``: each rank's RNG states, the record the megatron engine keeps too
  (``checkpoint.sharded.rank_local_state``; DeepSpeed saves rank 0's module state only, which
  holds the router BatchNorm statistics, the same on every rank). Restored when the layout
  (data-parallel size, ZeRO stage) is unchanged.

Another data-parallel size or ZeRO stage (1-3) on resume: the checkpoint is converted with
DeepSpeed's ``ds_to_universal`` into a universal checkpoint (one fp32 file per parameter and
optimizer moment) in a scratch folder under the run's checkpoint folder (``.convert.tmp``, never
beside the source, which may be another run's or read-only), loaded with ``load_universal``,
and removed. The conversion runs on rank 0; its failure reaches every rank as the same
``CheckpointLoadError`` (one line, exit 2), not as a hang of the ranks waiting for it.
A change between stages 1-2 and 3 rewrites it into the loading stage's form
(``deepspeed_universal``). What DeepSpeed's universal load leaves out is done here: the
module's buffers (the router BatchNorm statistics) are loaded from the saved module state (the
universal load restores parameters only, which left them at their initial values), and the
param groups' hyper-parameters come from this run's config, as under the megatron engine (the
ZeRO-3 universal load copied the first group's into every group: weight decay for the norms).
ZeRO-0 keeps everything whole in one file, which loads as it is at any data-parallel size;
between ZeRO-0 and a ZeRO stage there is no conversion (``checkpoint.compat`` refuses it).
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnimoe_train.checkpoint.compat import zero0_precision_rule
from omnimoe_train.checkpoint.files import CheckpointCorrupt, read_meta, sha256_file
from omnimoe_train.checkpoint.manager import first_line
from omnimoe_train.checkpoint.session import CheckpointLoadError
from omnimoe_train.checkpoint.sharded import rank_local_state, restore_rank_local
from omnimoe_train.distributed import (
    barrier,
    broadcast_from_rank0,
    first_failure,
    rank_and_world,
)
from omnimoe_train.engine.deepspeed_universal import TAG, rank0_model_states, to_universal

EXTRA_STATE = "_extra_state"


def drop_empty_extra_state(model: nn.Module) -> None:
    """Leave megatron's empty ``_extra_state`` entries out of the module state dict.

    megatron's linear layers report an ``_extra_state`` (None without TransformerEngine) for
    TransformerEngine checkpoint compatibility; DeepSpeed's universal-checkpoint converter
    takes every entry of the module state for a tensor. The entries are dropped when the state
    is saved and put back (None) when it is loaded, so strict loading still holds.
    """

    def drop(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
        if state.get(prefix + EXTRA_STATE, 0) is None:
            del state[prefix + EXTRA_STATE]

    def restore(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        state.setdefault(prefix + EXTRA_STATE, None)

    for module in model.modules():
        if type(module).get_extra_state is not nn.Module.get_extra_state:
            module.register_state_dict_post_hook(drop)
            module.register_load_state_dict_pre_hook(restore)


def universal_info() -> dict[str, Any]:
    """The client state DeepSpeed's universal-checkpoint converter requires (no TP patterns:
    every parameter is whole in every rank's model)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {
        UNIVERSAL_CHECKPOINT_INFO: {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE
        }
    }


def save(engine: Any, directory: Path, client_state: dict[str, Any]) -> None:
    """Collective: DeepSpeed's files, the scheduler, ``client_state`` and this rank's state."""
    rank, _ = rank_and_world()
    state = {
        "client": client_state,
        "scheduler": engine.scheduler.state_dict(),
        "layout": engine.layout(),
        **universal_info(),
    }
    engine.engine.save_checkpoint(str(directory), tag=TAG, client_state=state, save_latest=False)
    # The megatron engine's per-rank state (checkpoint.sharded), in a file of its own here.
    torch.save(rank_local_state(), directory / f"rank_{rank:05d}.pt")
    barrier()


def saved_layout(directory: Path) -> dict[str, Any]:
    """The engine layout a checkpoint was written with (from rank 0's DeepSpeed file)."""
    state = torch.load(rank0_model_states(directory), map_location="cpu", weights_only=False)
    layout = dict(state["layout"])
    # Recorded since DeepSpeed's files of one precision would not load in the other (another
    # name, other contents); for an older checkpoint, from the DeepSpeed config it was saved with.
    layout.setdefault("bf16", bool((state.get("ds_config") or {}).get("bf16", {}).get("enabled")))
    return layout


def tensor_sizes(directory: Path, buffer_suffixes: tuple[str, ...]) -> dict[str, int]:
    """Model parameters and buffer values of a DeepSpeed checkpoint, as ``omnimoe-ckpt
    inspect`` reports them (``checkpoint.cli.tensor_sizes`` for the megatron engine).

    From rank 0's module-state file, memory-mapped: under ZeRO 1-3 DeepSpeed records every
    parameter's full shape in ``param_shapes`` (ZeRO-3's module state holds empty placeholders);
    under ZeRO-0 the module state holds the whole parameters. Buffers (``buffer_names``) whose
    names end with ``buffer_suffixes`` are counted apart. The ZeRO optimizer partitions are not
    read. Raises ``FileNotFoundError`` when the folder holds no DeepSpeed module state."""
    state = torch.load(
        rank0_model_states(directory), map_location="cpu", weights_only=False, mmap=True
    )
    module: dict[str, Any] = state["module"]
    buffers = set(state.get("buffer_names") or ())
    if state.get("param_shapes"):
        shapes = [shape for group in state["param_shapes"] for shape in group.values()]
        shapes += list((state.get("frozen_param_shapes") or {}).values())
    else:
        shapes = [
            value.shape
            for name, value in module.items()
            if name not in buffers and torch.is_tensor(value) and not name.endswith(EXTRA_STATE)
        ]
    buffer_values = sum(module[name].numel() for name in buffers if name.endswith(buffer_suffixes))
    return {
        "model_parameters": sum(torch.Size(shape).numel() for shape in shapes),
        "model_tensors": len(shapes),
        "model_buffer_values": buffer_values,
    }


def _restore_buffers(module: nn.Module, directory: Path) -> None:
    """Copy the saved module state's buffers (DeepSpeed's ``buffer_names``: the router
    BatchNorm statistics) into ``module``; ZeRO does not partition buffers, so every stage's
    rank-0 file holds them whole."""
    state = torch.load(
        rank0_model_states(directory), map_location="cpu", weights_only=False, mmap=True
    )
    saved = state["module"]
    wanted = set(state.get("buffer_names") or ())
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in wanted and name in saved:
                buffer.copy_(saved[name])


def load(
    engine: Any, directory: Path, *, model_only: bool = False, scratch: Path | None = None
) -> dict[str, Any]:
    """Collective: restore the engine from ``directory``; returns the saved client state.

    Same layout (data-parallel size and ZeRO stage): DeepSpeed's files load as they are, and
    every rank's RNG and router statistics are restored. Otherwise through a universal
    checkpoint written into ``scratch`` (see the module docstring; a folder every rank reads,
    made and removed here); the rank-local state then starts fresh, which
    ``client["_rank_local_restored"] = False`` reports. Raises ``CheckpointLoadError`` on every
    rank when the conversion fails (or no ``scratch`` was given for one), and when a file one
    rank reads is unreadable or DeepSpeed's load fails on one rank: the ranks agree on the
    first failing rank's line (``distributed.first_failure``) before and after DeepSpeed's
    load, so none is left waiting for another in a collective.
    """
    rank, _ = rank_and_world()
    saved: dict[str, Any] = {}
    problem: str | None = None
    try:  # every rank reads these files itself; a view of them may fail on one rank only
        saved = saved_layout(directory)
        if saved == engine.layout() and not model_only:
            problem = _unreadable(directory, _own_files(engine.engine, directory, rank))
    except Exception as exc:  # noqa: BLE001 - torch.load raises anything on a bad file
        problem = first_line(exc)
    _raise_agreed(directory, problem)
    now = engine.layout()
    same_layout = saved == now
    # ZeRO-0's one file holds the whole model and optimizer state: it loads as it is, in the
    # precision it was written in (``checkpoint.compat`` refuses another, from meta.json).
    as_saved = same_layout or saved["zero_stage"] == now["zero_stage"] == 0
    if as_saved and saved["bf16"] != now["bf16"]:
        raise ValueError(zero0_precision_rule(directory, saved["bf16"], now["bf16"]))
    ds = engine.engine
    source = directory
    converting = not as_saved and not model_only
    if converting:
        if scratch is None:
            raise CheckpointLoadError(
                f"{directory}: written at another layout; converting it needs a scratch folder "
                "every rank reads (the run's checkpoint folder)"
            )
        error = _convert_on_rank0(ds, directory, scratch) if rank == 0 else None
        error = broadcast_from_rank0(error)  # every rank learns of a failure, none waits on
        if error is not None:
            raise CheckpointLoadError(str(error))
        source = scratch
    else:
        scratch = None
    client: dict[str, Any] = {}
    try:
        client = _load_into(engine, directory, source, scratch, model_only, same_layout)
    except Exception as exc:  # noqa: BLE001 - DeepSpeed's loader raises anything
        problem = first_line(exc)
    finally:
        ds._config.load_universal_checkpoint = False
    # The agreement is also the barrier before the scratch folder goes: every rank has loaded.
    try:
        _raise_agreed(directory, problem)
    finally:
        if scratch is not None and rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    return client


def _own_files(ds: Any, directory: Path, rank: int) -> list[str]:
    """The files of ``directory`` that rank ``rank`` alone reads at the saved layout, relative
    and named as the DeepSpeed engine ``ds`` names them (present or not): its module state
    under ZeRO-3 (one per rank; otherwise rank 0's, which every rank has just read whole,
    ``saved_layout``), its ZeRO optimizer partition, its rank-local state."""
    names = []
    if ds.zero_optimization_partition_weights():
        names.append(ds._get_ckpt_name(str(directory), TAG))
    if ds.zero_optimization():
        names.append(ds._get_zero_ckpt_name(str(directory), TAG))
    mine = [Path(name).relative_to(directory).as_posix() for name in names]
    return [*mine, f"rank_{rank:05d}.pt"]


def _unreadable(directory: Path, names: list[str]) -> str | None:
    """Why one of ``names`` (files of ``directory`` that this rank alone reads) cannot be read
    here, or None. Each is read whole: with ``meta.json``'s size and SHA-256 where it lists
    them (a published checkpoint), else only opened and read. The checkpoint's own check
    (``files.find_problem``) hashed each file on one rank; this is the reading rank's view
    of it, checked before DeepSpeed's load, which under ZeRO-3 runs collectives between its
    reads: a rank failing inside it left the others in a collective of their own."""
    try:
        listed = read_meta(directory)["files"]
    except CheckpointCorrupt:  # a folder engine.save_checkpoint wrote, not published
        listed = {}
    for name in names:
        path = directory / name
        entry = listed.get(name, {})
        try:
            size = path.stat().st_size
            if entry and size != entry["bytes"]:
                return f"{name} has {size} bytes, meta.json lists {entry['bytes']}"
            if entry:
                digest = sha256_file(path)
            else:
                with path.open("rb") as f:
                    f.read(1 << 16)
        except OSError as exc:
            return f"{name} is unreadable ({exc.strerror or exc})"
        if entry and digest != entry["sha256"]:
            return f"{name} is corrupt (SHA-256 mismatch)"
    return None


def _raise_agreed(directory: Path, problem: str | None) -> None:
    """Collective: raise ``CheckpointLoadError`` on every rank if any rank has a ``problem``,
    naming the first such rank and its line."""
    failed = first_failure(problem)
    if failed is not None:
        rank, why = failed
        raise CheckpointLoadError(f"{directory}: could not be loaded on rank {rank}: {why}")


def _load_into(
    engine: Any,
    directory: Path,
    source: Path,
    scratch: Path | None,
    model_only: bool,
    same_layout: bool,
) -> dict[str, Any]:
    """DeepSpeed's load of ``source`` (``scratch`` when it holds a universal checkpoint of
    ``directory``), then what DeepSpeed does not keep; returns the client state. Raises on
    this rank alone: the caller makes the ranks agree."""
    ds = engine.engine
    # This run's hyper-parameters per group (the scheduler then sets lr and weight decay).
    hyper = [
        {k: v for k, v in g.items() if k != "params"} for g in engine.client_optimizer.param_groups
    ]
    # DeepSpeed reads ``checkpoint.load_universal`` at load time, from its parsed config.
    ds._config.load_universal_checkpoint = scratch is not None
    _, state = ds.load_checkpoint(
        str(source),
        tag=TAG,
        load_optimizer_states=not model_only,
        load_lr_scheduler_states=False,
        load_module_only=model_only,
    )
    if state is None:
        raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint in {TAG}/")
    client = dict(state["client"])
    if scratch is not None:
        _restore_buffers(ds.module, directory)
    if not model_only:
        for group, kept in zip(engine.client_optimizer.param_groups, hyper, strict=True):
            group.update(kept)
        engine.scheduler.load_state_dict(state["scheduler"])
        if same_layout:
            rank, _ = rank_and_world()
            local = torch.load(directory / f"rank_{rank:05d}.pt", weights_only=False)
            restore_rank_local(local)
    client["_rank_local_restored"] = same_layout and not model_only
    return client


def _convert_on_rank0(ds: Any, directory: Path, scratch: Path) -> str | None:
    """Rank 0: write the universal checkpoint of ``directory`` into ``scratch`` for the
    DeepSpeed engine ``ds``; the error as one line (the scratch removed), or None."""
    try:
        shutil.rmtree(scratch, ignore_errors=True)  # left by a killed run
        scratch.mkdir(parents=True)
        shapes = {
            n: getattr(p, "ds_shape", p.shape)
            for n, p in ds.module.named_parameters()
            if p.requires_grad
        }
        stage3 = bool(ds.zero_optimization_partition_weights())
        to_universal(directory, scratch, stage3=stage3, shapes=shapes)
    except Exception as exc:  # noqa: BLE001 - DeepSpeed's converter raises anything
        shutil.rmtree(scratch, ignore_errors=True)
        return (
            f"{directory}: could not convert it for this layout (DeepSpeed's universal "
            f"checkpoint, in {scratch}): {first_line(exc)}"
        )
    return None


def consolidate(directory: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights (and buffers) of a DeepSpeed checkpoint folder, on the CPU.

    ZeRO 1-3: DeepSpeed's ``zero_to_fp32`` merges the optimizer's fp32 partitions. ZeRO-0 has
    no partitions: its module state holds every weight.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any((directory / TAG).glob("*optim_states.pt")) and saved_layout(directory)["zero_stage"]:
        quiet = io.StringIO()  # its progress bar and summary lines
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
    else:
        states = torch.load(rank0_model_states(directory), map_location="cpu", weights_only=False)
        module = states["module"]
        state = {k: v for k, v in module.items() if isinstance(v, torch.Tensor)}
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
