"""Run a test body on several gloo ranks in spawned processes (OLMo-core style).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, initialises a gloo
process group on a free localhost port in each, calls ``fn(*args)`` and tears the group down.
``backend="nccl"`` runs rank r on GPU r instead (``LOCAL_RANK`` set, as torchrun does).
A failure on any rank fails the caller with that rank's traceback (torch.multiprocessing.spawn
re-raises it), and a hung collective fails after ``timeout_s`` instead of blocking the suite.
``fn`` must be a module-level function so that the spawned interpreters can import it.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def find_free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; ranks bind it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    backend: str,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    # Two cores are shared by all ranks: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    device = None
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device,
    )
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    backend: str = "gloo",
) -> None:
    """Run ``fn(*args)`` on ``world_size`` ranks (gloo on CPU, or nccl one GPU per rank);
    raise if any rank raises."""
    mp.spawn(
        _worker,
        args=(world_size, find_free_port(), timeout_s, fn, args, backend),
        nprocs=world_size,
        join=True,
    )
