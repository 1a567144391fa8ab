"""Every parallel layout of the issue trains exactly like one process (gloo, CPU, fp32).

One reference run (world 1) is shared; each spawned world then checks several layouts in turn
(spawning costs seconds): step-1 loss, gradients of every shard and grad norm within 1e-5, and the
5-step loss curve within 1e-4 (see ``layout_checks``). The router keeps its BatchNorm: under
sequence parallelism its statistics are summed over the TP group, and every data-parallel rank
normalises a micro-batch the single process also normalises as one batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .distributed import run_distributed
from .layout_checks import (
    check_distopt_bitwise,
    check_layouts,
    fit_and_log,
    make_reference,
    two_rank_fit_records,
)

WORLD_2 = ["tp2", "tp2_sp", "pp2", "pp2_vpp2", "dp2_distopt", "ep2_rows", "ep2_dim", "tp2_sp_ep2"]
WORLD_4 = ["tp2_ep2", "pp2_dp2", "mixed4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reference") / "reference.pt"
    run_distributed(make_reference, 1, path)
    return path


def test_two_rank_layouts_match_single_process(reference: Path) -> None:
    run_distributed(check_layouts, 2, reference, WORLD_2, timeout_s=300)


def test_four_rank_layouts_match_single_process(reference: Path) -> None:
    run_distributed(check_layouts, 4, reference, WORLD_4, timeout_s=300)


def test_distributed_optimizer_equals_plain_dp_without_clipping() -> None:
    run_distributed(check_distopt_bitwise, 2, 8, timeout_s=300)


def test_metrics_record_dispatch_bytes_per_layer(tmp_path: Path) -> None:
    train = two_rank_fit_records(fit_and_log, tmp_path)
    assert [r["step"] for r in train] == [2, 4]
    for record in train:
        assert record["dispatch_fwd_bytes_per_layer"] > 0
        assert record["dispatch_bwd_bytes_per_layer"] > 0
        assert 1.0 <= record["dispatch_dest_ranks"] <= 2.0
        # max / mean pairs over the 2 ranks: at least 1, at most 2 (all on one rank)
        assert 1.0 <= record["dispatch_load_imbalance"] <= record["dispatch_load_imbalance_max"]
        assert record["dispatch_load_imbalance_max"] <= 2.0
