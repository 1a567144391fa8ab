"""Router BatchNorm running statistics stay identical over data-parallel replicas and equal one
process's with the same global batches (gloo, CPU, fp32; see ``router_stats_checks``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .distributed import run_distributed
from .router_stats_checks import check_stats, make_stats_reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stats") / "reference.pt"
    run_distributed(make_stats_reference, 1, path)
    return path


@pytest.mark.slow
def test_dp2_running_stats_match_single_process(reference: Path) -> None:
    run_distributed(check_stats, 2, reference, ["single"], timeout_s=300)


@pytest.mark.slow
def test_world4_running_stats_match_single_process(reference: Path) -> None:
    """Sequence parallel + expert parallel (tp2_ep2) and pipeline stages (pp2_dp2), dp = 2."""
    run_distributed(check_stats, 4, reference, ["tp2_ep2", "pp2_dp2"], timeout_s=300)
