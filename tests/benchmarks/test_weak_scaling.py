"""``benchmarks/weak_scaling.py --repeats``: the rotated layout order, the ratio to the
data-parallel run of each round and the summary over rounds, on rows as a failing, partial or
impossible run leaves them (no GPU needed: the rows are the script's own format)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import weak_scaling  # noqa: E402 - the script's folder, as it imports its neighbours itself


def _run(round_: int, layout: str, tokens: float | None, status: str = "ok") -> dict:
    row = {"round": round_, "gpus": 2, "layout": layout, "status": status}
    if tokens is not None:
        row["tokens_per_s_per_gpu"] = tokens
    return row


@pytest.mark.parametrize(
    ("shift", "expected"),
    [(0, "abc"), (1, "bca"), (2, "cab"), (3, "abc"), (7, "bca"), (-1, "cab")],
)
def test_rotated_starts_each_round_at_another_layout(shift: int, expected: str) -> None:
    assert weak_scaling.rotated(list("abc"), shift) == list(expected)
    assert weak_scaling.rotated([], shift) == []


def test_summary_over_rounds_with_a_failed_a_partial_and_an_impossible_layout() -> None:
    rows = [
        _run(0, "dp2", 100.0),
        _run(0, "ep2_rows", 80.0),
        {"round": 0, "gpus": 2, "layout": "tp_sp", "status": "no valid layout"},
        _run(1, "ep2_rows", None, "exit 1: out of memory"),  # failed: no windows
        _run(1, "dp2", 120.0),
        {"round": 1, "gpus": 2, "layout": "tp_sp", "status": "no valid layout"},
        # The DP run of round 2 crashed after logging some windows: no baseline for the round.
        _run(2, "dp2", 50.0, "exit 1: killed"),
        _run(2, "ep2_rows", 90.0),
    ]
    weak_scaling.add_ratios_vs_dp(rows)
    assert [r.get("ratio_vs_dp") for r in rows] == [1.0, 0.8, None, None, 1.0, None, None, None]
    summary = {s["layout"]: s for s in weak_scaling.summarize(rows)}
    dp, ep, tp = summary["dp2"], summary["ep2_rows"], summary["tp_sp"]
    assert (dp["runs"], dp["runs_vs_dp"], dp["median_tokens_per_s_per_gpu"]) == (2, 2, 110.0)
    # Rounds 0 and 2 finished; only round 0 has a DP run to compare with.
    assert (ep["runs"], ep["runs_vs_dp"], ep["median_tokens_per_s_per_gpu"]) == (2, 1, 85.0)
    assert ep["median_ratio_vs_dp"] == ep["ratio_vs_dp_min"] == ep["ratio_vs_dp_max"] == 0.8
    # Never ran: no number at all (a 0.0 would read as a measurement).
    assert tp["runs"] == 0 and tp["median_tokens_per_s_per_gpu"] is None
    assert tp["median_ratio_vs_dp"] is None and tp["ratio_vs_dp_min"] is None
    table = weak_scaling.summary_table(list(summary.values()))
    assert "| 2 | tp_sp | 0 | – | – | – |" in table
    assert "| 2 | ep2_rows | 2 | 85 | 0.80 | 0.80–0.80 |" in table


def test_summary_without_a_data_parallel_layout_keeps_the_throughput() -> None:
    """``--layouts ep_rows ep_dim``: nothing to compare with, but the runs and their
    tokens/s are real."""
    rows = [_run(r, "ep2_rows", 70.0 + 10 * r) for r in range(3)]
    weak_scaling.add_ratios_vs_dp(rows)
    (s,) = weak_scaling.summarize(rows)
    assert (s["runs"], s["runs_vs_dp"], s["median_tokens_per_s_per_gpu"]) == (3, 0, 80.0)
    assert s["median_ratio_vs_dp"] is None
    assert "| 2 | ep2_rows | 3 | 80 | – | – |" in weak_scaling.summary_table([s])


def test_one_round_summary_is_the_run_itself() -> None:
    rows = [_run(0, "dp2", 100.0), _run(0, "ep2_dim", 125.0)]
    weak_scaling.add_ratios_vs_dp(rows)
    summary = weak_scaling.summarize(rows)
    assert [(s["runs"], s["median_ratio_vs_dp"]) for s in summary] == [(1, 1.0), (1, 1.25)]


def test_zero_repeats_is_a_usage_error() -> None:
    """``--repeats 0`` used to run no round and print empty tables with exit 0."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "weak_scaling.py"
    result = subprocess.run(
        [sys.executable, str(script), "--repeats", "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("--repeats must be >= 1 (got 0)")
    assert "Traceback" not in result.stderr
