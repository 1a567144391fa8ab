"""Resharding on load (gloo, CPU, fp32): a checkpoint saved under one parallel layout continues
under another with the next-step loss the original layout gives, within 1e-6 relative.

Matrix (issue 10, item 2): saved at ``tp2_ep2`` (world 4, ``rows`` tables) -> loaded at 4-way EP
with ``dim`` tables, at ``pp2`` (world 2) and on one process; saved on one process -> loaded at
``tp2_sp``. Plus: the same layout (per-rank state restored), the distributed optimizer in both
directions (``mixed4``: pp2 x dp2, dim tables, distributed optimizer).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.distributed import run_distributed

from .reshard_checks import stage


@pytest.mark.slow
def test_resharding_matrix(tmp_path: Path) -> None:
    tp2_ep2, distopt, single = tmp_path / "tp2_ep2", tmp_path / "dp2_distopt", tmp_path / "single"
    run_distributed(stage, 4, [], ("tp2_ep2", tp2_ep2), timeout_s=300)
    # Same layout (per-rank state restored), dim tables at 4-way EP, pp2 x dp2 with dim tables
    # and the distributed optimizer.
    run_distributed(stage, 4, [(["tp2_ep2", "ep4_dim", "mixed4"], tp2_ep2)], timeout_s=300)
    run_distributed(stage, 2, [(["pp2"], tp2_ep2)], ("dp2_distopt", distopt), timeout_s=300)
    run_distributed(stage, 1, [(["single"], tp2_ep2), (["single"], distopt)], ("single", single))
    run_distributed(stage, 2, [(["tp2_sp", "dp2_distopt"], single)], timeout_s=300)
