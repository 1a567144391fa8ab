"""Every baseline MLP trains under a TP and an EP layout exactly like one process (gloo, CPU).

dense, GShard, DeepSeekMoE (megatron's MoE layer: its alltoall dispatcher and expert parallelism),
PKM and PEER: 4-step loss curves within 1e-6 of the world-1 run from the same weights (see
``variant_checks``); OmniMoE is checked by ``test_layouts_equivalence``. Also: the trainer logs the
MoE metrics of a GShard run with expert parallelism.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .distributed import run_distributed
from .layout_checks import two_rank_fit_records
from .variant_checks import LAYOUTS, check_variants, fit_gshard_and_log, make_references


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("variant_references")
    run_distributed(make_references, 1, out, timeout_s=300)
    return out


@pytest.mark.slow
def test_variants_under_tp_and_ep_match_single_process(references: Path) -> None:
    run_distributed(check_variants, 2, references, list(LAYOUTS), timeout_s=600)


def test_trainer_logs_moe_metrics_under_expert_parallelism(tmp_path: Path) -> None:
    train = two_rank_fit_records(fit_gshard_and_log, tmp_path)
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        assert r["aux_loss"] >= 0.99  # megatron's switch loss: 1 when balanced
        assert 0 < r["expert_usage"] <= 1 and r["unevenness"] >= 0
        assert r["load_imbalance"] >= 1 and r["router_entropy"] > 0
        assert r["tflops"] > 0 and "mfu" not in r  # no bf16 peak for a CPU
