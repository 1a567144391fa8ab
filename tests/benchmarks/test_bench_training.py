"""``benchmarks/bench_training.py``: its table's status cell and the ``--steps`` rule (no GPU
needed; the runs themselves are GPU benchmarks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_training  # noqa: E402 - the script's folder, as it imports its neighbours itself


@pytest.mark.parametrize(
    ("status", "cell"),
    [
        ("ok", "ok"),
        ("exit 1: Traceback ... torch.OutOfMemoryError: CUDA out of memory", "exit 1"),
        ("exit -9: see run.log", "exit -9"),
        ("timeout after 300 s", "timeout"),
    ],
)
def test_status_cell_keeps_one_word_and_the_reason_goes_below(status: str, cell: str) -> None:
    assert bench_training.short_status(status) == cell


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_below_one_are_refused_in_one_line(steps: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_training.py"), "--steps", steps],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--steps: must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_steady_state_peak_memory_leaves_the_first_window_apart() -> None:
    """Each logged window carries its own peak (the trainer resets it per logged step): the
    table's peak is the steady windows', the first window (graph capture, compilation) apart."""
    from runs import RunResult, steady_state

    records = [
        {"step": 5, "tokens_per_s": 1.0, "consumed_tokens": 50, "peak_memory_gib": 9.0},
        {"step": 10, "tokens_per_s": 2.0, "consumed_tokens": 100, "peak_memory_gib": 7.0},
        {"step": 15, "tokens_per_s": 2.0, "consumed_tokens": 150, "peak_memory_gib": 7.2},
    ]
    out = steady_state(RunResult("ok", 1.0, records))
    assert out["peak_memory_gib"] == 7.2 and out["peak_memory_gib_first_window"] == 9.0
    assert out["tokens_per_s"] == 2.0
