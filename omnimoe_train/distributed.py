"""Process groups, device and precision: everything about *where* the model runs.

Works the same under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set), under SLURM via the
launchers in ``launch/``, and as a plain single process (a loopback rendezvous on a free port).
"""

from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from omnimoe_train.config import RootConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Environment variables init_runtime set itself (no launcher gave them); shutdown_runtime
# removes them with the process group.
_ADDED_ENV: set[str] = set()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none (a
    single-process tool such as ``omnimoe-ckpt``)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_rank0(value: object) -> object:
    """Rank 0's ``value`` on every rank (a picklable object; collective); ``value`` itself when
    there is no process group."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def first_failure(reason: str | None) -> tuple[int, str] | None:
    """Collective: ``(rank, reason)`` of the lowest rank whose ``reason`` is not None (its
    one-line account of a failure), the same on every rank; None when no rank failed.

    The ranks agree on a failure this way instead of raising on the failing rank alone (the
    others would wait for it in their next collective) and the line every rank raises names
    the real cause, not "failed on another rank". Without a process group: ``reason`` as
    rank 0's."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None if reason is None else (0, reason)
    reasons: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next(((r, why) for r, why in enumerate(reasons) if why is not None), None)


def barrier() -> None:
    """``dist.barrier()`` over the default group; nothing when there is none."""
    if dist.is_initialized():
        dist.barrier()


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def resolve_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def high_priority_groups(device: torch.device, ep: int) -> list[str]:
    """megatron-core process groups whose NCCL stream gets high priority: the expert-parallel
    group's under EP on GPUs. Its exchanges sit between dependent kernels (``dim``'s partial
    scores) or run beside the compute they overlap, which would otherwise hold the SMs they
    wait for; measured with ``TORCH_NCCL_HIGH_PRIORITY=1`` (every group): ``ep2_dim`` +2%
    tokens/s, data parallel unchanged (docs/benchmarks.md, fourteenth session)."""
    return ["ep"] if device.type == "cuda" and ep > 1 else []


def init_runtime(cfg: RootConfig) -> Runtime:
    """Create the process groups (torch + megatron) and seed every RNG.

    The layout is validated first (the CLI already did; library callers get the same one-line
    ``ConfigError``), so a bad layout never creates a process group. A torch process group that
    already exists (kept by ``shutdown_runtime(keep_process_group=True)`` for the next job of a
    ``-m`` sweep) is reused; megatron's groups are always built for this config's layout.
    """
    from omnimoe_train.validation import validate

    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    if device.type == "cpu":
        from omnimoe_train.megatron_cpu import apply_cpu_patches

        apply_cpu_patches()
    else:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", None)):
            if key not in os.environ:
                os.environ[key] = value or str(_free_port())
                _ADDED_ENV.add(key)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            timeout=timedelta(minutes=10),
        )
        atexit.register(_destroy_process_group)
    from megatron.core import parallel_state, tensor_parallel

    p = cfg.parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vpp,
            expert_model_parallel_size=p.ep,
            # Tables are sharded over EP only; an expert's row/column block is never TP-split.
            expert_tensor_parallel_size=1,
            high_priority_stream_groups=high_priority_groups(device, p.ep),
        )
    seed = cfg.trainer.seed
    # Same seed on every rank for replicated weights; megatron's tracker offsets the TP streams.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Runtime(
        device=device,
        bf16=resolve_bf16(cfg.trainer.precision, device),
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )


def shutdown_runtime(*, keep_process_group: bool = False) -> None:
    """Destroy megatron's parallel state and, unless ``keep_process_group``, the torch group.

    ``run`` keeps the torch group: a ``-m`` sweep runs its jobs one after another in the same
    processes, and creating the default group a second time on torchrun's rendezvous store
    hangs. The kept group is destroyed at interpreter exit.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if not keep_process_group:
        _destroy_process_group()
        # The rendezvous variables init_runtime made up for a one-process world go too: a
        # process that starts jobs afterwards (a sweep launcher, torchrun) must not hand them a
        # port that belonged to this group.
        for key in _ADDED_ENV:
            os.environ.pop(key, None)
        _ADDED_ENV.clear()


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
