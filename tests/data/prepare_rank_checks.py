"""Bodies of ``test_prepare_ranks.py``: two gloo ranks (``run_distributed``) through
``omnimoe_train.data.prepare_data``, rank 0's preparation replaced by a slow or a stoppable one."""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from omnimoe_data.corpus import PreparationStopped
from omnimoe_train import data, prepare_board
from omnimoe_train.config import DataConfig


def slow_preparation_then_a_stop_from_rank_1(dataset: str, delay_s: float) -> None:
    """First rank 0 prepares for ``delay_s`` (longer than the process group's timeout): every
    rank gets ``dataset``. Then rank 1 asks to stop while rank 0 prepares: both stop, rank 1
    reading rank 0's outcome only after rank 0 could have exited (which ended the store)."""
    rank = dist.get_rank()
    d = DataConfig(seq_len=4)  # no data.dir: rank 0 prepares (its preparation is replaced)

    def slow(cfg: DataConfig, should_stop: object = None) -> Path:
        time.sleep(delay_s)
        return Path(dataset)

    data._ensure_prepared = slow
    assert data.prepare_data(d, rank=rank).locations == [dataset]

    def until_stopped(cfg: DataConfig, should_stop: object = None) -> Path:
        deadline = time.monotonic() + 60
        while not should_stop():  # type: ignore[operator]
            assert time.monotonic() < deadline, "rank 1's stop request did not reach rank 0"
            time.sleep(0.05)
        raise PreparationStopped("stopped")

    data._ensure_prepared = until_stopped
    if rank == 1:
        prepare_board.POLL_S = 3.0  # rank 0 has stopped and returned long before it reads
    try:
        data.prepare_data(d, rank=rank, stop_requested=lambda: rank == 1)
    except PreparationStopped:
        return
    raise AssertionError(f"rank {rank} did not stop")
