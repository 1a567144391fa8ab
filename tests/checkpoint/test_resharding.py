"""Resharding on load (gloo, CPU, fp32): a checkpoint saved under one parallel layout continues
under another with the next-step loss the original layout gives, within 1e-6 relative.

Matrix (issue 10, item 2): saved at ``tp2_ep2`` (world 4, ``rows`` tables) -> loaded at 4-way EP
with ``dim`` tables, at ``pp2`` (world 2) and on one process; saved on one process -> loaded at
``tp2_sp`` (that one written asynchronously while training continued). Plus: the same layout (per-rank state restored), the distributed optimizer in both
directions (``mixed4``: pp2 x dp2, dim tables, distributed optimizer), and ``omnimoe-ckpt
consolidate`` of the tp2_ep2 and the single-process checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.distributed import run_distributed

from .test_ckpt_cli import consolidate_and_check


@pytest.mark.slow
def test_resharding_matrix(tmp_path: Path) -> None:
    from .reshard_checks import stage  # here, not at collection: see test_ckpt_cli

    tp2_ep2, distopt, single = tmp_path / "tp2_ep2", tmp_path / "dp2_distopt", tmp_path / "single"
    run_distributed(stage, 4, [], ("tp2_ep2", tp2_ep2), timeout_s=300)
    # Same layout (per-rank state restored), dim tables at 4-way EP, pp2 x dp2 with dim tables
    # and the distributed optimizer.
    run_distributed(stage, 4, [(["tp2_ep2", "ep4_dim", "mixed4"], tp2_ep2)], timeout_s=300)
    run_distributed(stage, 2, [(["pp2"], tp2_ep2)], ("dp2_distopt", distopt), timeout_s=300)
    # The single-process checkpoint is written asynchronously while training goes on.
    loads = [(["single"], tp2_ep2), (["single"], distopt)]
    run_distributed(stage, 1, loads, ("single", single, True))
    run_distributed(stage, 2, [(["tp2_sp", "dp2_distopt"], single)], timeout_s=300)

    # omnimoe-ckpt consolidate: the same single-process weights file from either layout.
    step = "step_00000002"
    sharded = consolidate_and_check(tp2_ep2 / step, tmp_path / "from_tp2_ep2.pt")
    plain = consolidate_and_check(single / step, tmp_path / "from_single.pt")
    assert sharded.keys() == plain.keys()
    assert all(sharded[k].shape == plain[k].shape for k in plain)
