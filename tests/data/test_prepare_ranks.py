"""Rank 0 prepares, the other ranks wait for it (``omnimoe_train.prepare_board``): for longer
than the process group's timeout, and a stop request of a waiting rank reaches rank 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnimoe_train import prepare_board
from omnimoe_train.prepare_board import PrepareBoard, RankZeroSilent
from tests.parallel.distributed import run_distributed

from .helpers import make_token_dataset
from .prepare_rank_checks import slow_preparation_then_a_stop_from_rank_1


def test_ranks_wait_past_the_group_timeout_and_pass_a_stop_to_rank_0(tmp_path: Path) -> None:
    """The waiting ranks sat in a broadcast, which fails after the process group's timeout
    (10 minutes in a run; 2 s here): a preparation longer than that failed every other rank
    (gloo: a timed-out receive). And a stop signal to a waiting rank stayed with it. Rank 0
    waits until the others have read its outcome: it may exit at once, and where it hosts the
    store (not under torchrun), a rank still polling lost it (``DistNetworkError``)."""
    dataset = make_token_dataset(tmp_path / "ds", [6, 6])
    run_distributed(slow_preparation_then_a_stop_from_rank_1, 2, str(dataset), 4.0, timeout_s=2)


class _Store:
    """The store calls the board makes, in memory."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def check(self, keys: list[str]) -> bool:
        return all(k in self.values for k in keys)

    def add(self, key: str, amount: int) -> int:
        value = int(self.values.get(key, b"0")) + amount
        self.values[key] = str(value).encode()
        return value

    def set(self, key: str, value: str) -> None:
        self.values[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.values[key]


def test_a_silent_rank_0_is_an_error_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 gone without a word (killed): a waiting rank stops waiting after as long as a
    collective would have waited, instead of polling for good."""
    monkeypatch.setattr(prepare_board, "SILENCE_S", 0.3)
    monkeypatch.setattr(prepare_board, "POLL_S", 0.01)
    with pytest.raises(RankZeroSilent, match="rank 0 has not answered"):
        PrepareBoard(_Store(), readers=1).wait(lambda: False)
