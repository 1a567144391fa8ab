"""Evaluation gives one process's val_loss under every layout (gloo, CPU, fp32; see
``eval_checks``): pp2 with the interleaved schedule and 3 micro-batches, pp2 and dp2 with a
partial last micro-batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from .distributed import run_distributed
from .eval_checks import check_eval, make_eval_dataset, make_eval_reference


@pytest.mark.slow
def test_evaluation_matches_single_process_under_pipeline_and_data_parallel(
    tmp_path: Path,
) -> None:
    data_dir = make_eval_dataset(tmp_path / "data")
    ref = tmp_path / "reference.pt"
    run_distributed(make_eval_reference, 1, data_dir, tmp_path / "run", ref)
    runs = [("pp2_vpp2", "vpp"), ("pp2", "partial"), ("single", "partial"), ("single", "vpp")]
    run_distributed(check_eval, 2, data_dir, tmp_path / "run", ref, runs, timeout_s=300)
