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


def _run(model: str, variant: str, rnd: int, step_ms: float, peak: float = 5.0) -> dict:
    return {"scale": "a80m", "model": model, "variant": variant, "case": model, "round": rnd,
            "status": "ok", "tokens_per_s": 1e6 / step_ms, "step_ms": step_ms,
            "tflops": 1.0, "mfu": 0.1, "peak_memory_gib": peak}  # fmt: skip


def test_repeats_give_medians_and_each_rounds_own_ratio() -> None:
    """A slow round slows both models: the ratio is taken within each round, not across."""
    runs = [
        _run("omnimoe", "cuda_graphs", 0, 130.0, 7.0),
        _run("dense", "cuda_graphs", 0, 100.0),
        _run("omnimoe", "cuda_graphs", 1, 160.0, 7.3),  # a slow host spell: both slower
        _run("dense", "cuda_graphs", 1, 120.0),
        _run("omnimoe", "cuda_graphs", 2, 135.0, 7.1),
        _run("dense", "cuda_graphs", 2, 100.0),
    ]
    med = bench_training.median_row([r for r in runs if r["model"] == "omnimoe"])
    assert med["step_ms"] == 135.0 and med["peak_memory_gib"] == 7.3 and med["rounds"] == 3
    assert "round" not in med
    assert bench_training.round_ratios(runs) == [
        "a80m cuda_graphs: 1.30, 1.33, 1.35 (median 1.33x)"
    ]


def test_a_failed_round_marks_the_median_row() -> None:
    runs = [_run("dense", "baseline", 0, 100.0), _run("dense", "baseline", 1, 100.0)]
    runs[1] = {**runs[1], "status": "timeout after 300 s", "step_ms": None}
    med = bench_training.median_row(runs)
    assert med["status"] == "timeout after 300 s" and med["step_ms"] == 100.0


def test_a_profiled_step_gives_its_kernel_time_and_leaves_its_window_out() -> None:
    """``--profile-step``: the step's device kernel time comes out as ``kernel_ms``; its window
    (slower under CUPTI) leaves the throughput mean, and the kernel-time ratio is per round."""
    from runs import RunResult, steady_state

    records = [
        {"step": 5, "tokens_per_s": 1.0, "consumed_tokens": 50},
        {"step": 10, "tokens_per_s": 4.0, "consumed_tokens": 100},
        {"step": 12, "profile_kernel_ms": 300.0, "profile_step_wall_ms": 410.0},
        {"step": 15, "tokens_per_s": 3.0, "consumed_tokens": 150},  # holds step 12
        {"step": 20, "tokens_per_s": 4.0, "consumed_tokens": 200},
    ]
    out = steady_state(RunResult("ok", 1.0, records))
    assert out["tokens_per_s"] == 4.0
    assert out["kernel_ms"] == 300.0 and out["profiled_step_ms"] == 410.0
    # the profiled window is the only steady one: kept rather than no throughput at all
    alone = steady_state(RunResult("ok", 1.0, [records[0], records[2], records[3]]))
    assert alone["tokens_per_s"] == 3.0 and alone["kernel_ms"] == 300.0

    runs = [
        {**_run("omnimoe", "cuda_graphs", 0, 130.0), "kernel_ms": 450.0},
        {**_run("dense", "cuda_graphs", 0, 100.0), "kernel_ms": 300.0},
    ]
    assert bench_training.round_ratios(runs, "kernel_ms") == [
        "a80m cuda_graphs: 1.50 (median 1.50x)"
    ]
    assert bench_training.median_row(runs[:1])["kernel_ms"] == 450.0
