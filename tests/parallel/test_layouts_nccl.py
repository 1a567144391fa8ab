"""The layout-equivalence and sharded-op checks on 2 GPUs with NCCL, and the launcher end to end.

The same rank bodies as the gloo tests (``layout_checks``, ``sharding_checks``), run one rank
per GPU: every layout of 2 ranks trains like one GPU from the same weights (bit-identical
initial shards, step-1 loss, gradients and grad norm, the 5-step loss curve), the sharded
atomic-expert ops equal the one-GPU op on the Triton kernels, and ``launch/torchrun.sh 2`` runs
the main job. fp32 throughout; the tolerances are 10x the gloo ones (GPU GEMMs and NCCL sum in
other orders than the one-GPU run), far below what a wrong shard or a missing reduction gives.
Skipped (with that reason) unless 2 CUDA GPUs are visible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .distributed import run_distributed
from .layout_checks import (
    RTOL_CURVE,
    RTOL_STEP,
    check_distopt_bitwise,
    check_layouts,
    make_reference,
)
from .sharding_checks import Case, check_cases_triton

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multi_gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

LAYOUTS = ["tp2", "tp2_sp", "pp2", "pp2_vpp2", "dp2_distopt", "ep2_rows", "ep2_dim", "tp2_sp_ep2"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reference") / "reference.pt"
    run_distributed(make_reference, 1, path, "cuda", backend="nccl", timeout_s=300)
    return path


def test_two_gpu_layouts_match_one_gpu(reference: Path) -> None:
    run_distributed(
        check_layouts, 2, reference, LAYOUTS, "cuda", 10 * RTOL_STEP, 10 * RTOL_CURVE,
        backend="nccl", timeout_s=600,
    )  # fmt: skip


def test_distributed_optimizer_equals_plain_dp_without_clipping_nccl() -> None:
    run_distributed(check_distopt_bitwise, 2, 8, "cuda", backend="nccl", timeout_s=300)


def test_sharded_ops_match_one_gpu() -> None:
    cases = [
        Case((512, 512), 64, 1024, 16, seed=1),
        Case((300, 300), 32, 64 * 64, 64, seed=2),
        Case((3, 3), 8, 16, 3, indices=((9, 12, 15), (0, 3, 7), (1, 8, 14)) * 2),
    ]
    run_distributed(check_cases_triton, 2, cases, ("rows", "dim"), "cuda", backend="nccl")


def test_torchrun_launcher_two_gpus(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMNIMOE_RUN_DIR": str(tmp_path / "run"),
        "OMNIMOE_CACHE": os.environ.get("OMNIMOE_CACHE", str(tmp_path / "cache")),
        "OMNIMOE_PYTHON": sys.executable,  # the interpreter running the tests, venv or not
    }
    args = [
        "parallel=ep2_dim",
        "trainer.max_steps=6",
        "optim.warmup_steps=1",
        "trainer.log_interval=3",
        "trainer.eval_interval=6",
        "trainer.eval_iters=2",
        "trainer.progress=false",
        "logging=disabled",
        "data.global_batch_size=32",
        "data.max_bytes=500000",
        "data.vocab_size=512",
    ]
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), "2", *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [3, 6]
    assert all(r["dispatch_load_imbalance"] == 1.0 for r in train)
    assert records[-1]["val_loss"] < records[0]["val_loss"]
