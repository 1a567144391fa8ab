"""``python -m omnimoe_train.health``: check the nodes of a job before training on them.

Run under torchrun on every node (``launch/slurm.sbatch`` does with ``OMNIMOE_HEALTH_CHECK=1``).
Each rank checks that it has a GPU when the node was given GPUs (``SLURM_GPUS_ON_NODE``, or
``--expect-gpus``), then every rank takes part in an all-reduce over the whole job (NCCL on GPUs,
gloo on CPU) whose result must be the sum of all ranks: it proves every node reaches every other.
On GPUs a second, 256 MiB all-reduce is timed and reported as bus bandwidth (the NCCL-tests
definition, ``2 (n-1)/n * bytes / time``). Rank 0 prints one line; a failing rank prints a line
naming its host and the check, and the job exits 1 (``EXIT_UNHEALTHY``).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

EXIT_UNHEALTHY = 1
BANDWIDTH_BYTES = 256 * 2**20


class Unhealthy(RuntimeError):
    pass


def _expected_gpus(flag: int | None) -> int:
    if flag is not None:
        return flag
    value = os.environ.get("SLURM_GPUS_ON_NODE", "0")
    return int(value) if value.isdigit() else 0


def check_devices(local_rank: int, local_world_size: int, expected_gpus: int) -> torch.device:
    """The device this rank uses (CPU when no GPU is expected and none is visible).

    Raises:
        Unhealthy: GPUs are expected and fewer than ``max(expected_gpus, local_world_size)`` are
            visible, or the rank's device cannot run a kernel.
    """
    if expected_gpus <= 0:
        return (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    needed = max(expected_gpus, local_world_size)
    if visible < needed:
        raise Unhealthy(f"{visible} CUDA device(s) visible, {needed} expected")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    torch.ones(1, device=device).sum().item()  # a kernel runs: the device is usable
    return device


def check_all_reduce(device: torch.device) -> float | None:
    """All-reduce of every rank's id (must sum to n(n-1)/2); on GPUs also the bus bandwidth.

    Returns:
        Bus bandwidth in GB/s on CUDA, None on CPU.

    Raises:
        Unhealthy: the all-reduce gave a wrong sum.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    value = torch.tensor([float(rank)], device=device)
    dist.all_reduce(value)
    expected = world * (world - 1) / 2
    if value.item() != expected:
        raise Unhealthy(f"all-reduce over {world} ranks gave {value.item()}, expected {expected}")
    if device.type != "cuda":
        return None
    buf = torch.ones(BANDWIDTH_BYTES // 4, device=device)
    dist.all_reduce(buf)  # warm-up: NCCL sets up its channels on the first large collective
    torch.cuda.synchronize()
    start = time.perf_counter()
    iters = 5
    for _ in range(iters):
        dist.all_reduce(buf)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    return 2 * (world - 1) / world * BANDWIDTH_BYTES / seconds / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnimoe_train.health", description=__doc__)
    parser.add_argument("--expect-gpus", type=int, default=None, help="GPUs each node must show")
    args = parser.parse_args(argv)
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        device = check_devices(local_rank, local_world, _expected_gpus(args.expect_gpus))
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=2)
        )
        bandwidth = check_all_reduce(device)
    except (Unhealthy, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"health: FAILED on {host} (rank {rank}): {first}", file=sys.stderr, flush=True)
        return EXIT_UNHEALTHY
    if rank == 0:
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
        speed = f", all-reduce bus bandwidth {bandwidth:.1f} GB/s" if bandwidth else ""
        print(
            f"health: ok: {dist.get_world_size()} ranks on {nodes} node(s), {device.type}{speed}",
            flush=True,
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
