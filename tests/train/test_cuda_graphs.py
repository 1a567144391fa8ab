"""``trainer.cuda_graphs=mlp`` (model/cuda_graphs.py): a graphed run trains like the eager one.

On a GPU: the same tiny OmniMoE run (two micro-batches per step, so the graphs replay within a
step and the router statistics of both reach the step's BatchNorm update; an evaluation in the
middle, eager) with and without the graphs gives the same per-step losses, held-out losses and
expert statistics. On CPU: the layout rules refuse it in one line before any work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import run_train_cli, tiny

KEYS = ("loss", "grad_norm", "expert_usage", "router_entropy", "load_imbalance")


def _train(tmp_path: Path, name: str, *extra: str, gpus: int = 1) -> list[dict]:
    run_dir = tmp_path / name
    args = tiny(
        trainer__device="cuda", trainer__precision="fp32", trainer__max_steps=6,
        trainer__eval_interval=3, data__global_batch_size=8 * gpus,
    )  # fmt: skip
    args = [*args, *extra, f"hydra.run.dir={run_dir}"]
    if gpus == 1:
        result = run_train_cli(args, cache=tmp_path / "cache", timeout=600)
    else:  # one rank per GPU, as launch/torchrun.sh starts them
        env = {**os.environ, "OMNIMOE_CACHE": str(tmp_path / "cache")}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc-per-node={gpus}", "-m", "omnimoe_train.cli", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _compare(eager: list[dict], graphed: list[dict]) -> None:
    assert len(eager) == len(graphed)
    for a, b in zip(eager, graphed, strict=True):
        assert a.get("step") == b.get("step")
        for key in (*KEYS, "val_loss"):
            if key in a:
                # fp32: the graphs replay the eager kernels on the same values; GEMM algorithm
                # choices may differ under capture, so not necessarily bitwise.
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


@pytest.mark.gpu
def test_graphed_mlps_train_like_eager_gpu(tmp_path: Path) -> None:
    eager = _train(tmp_path, "eager")
    graphed = _train(tmp_path, "graphed", "trainer.cuda_graphs=mlp")
    _compare(eager, graphed)
    assert any("val_loss" in r for r in graphed)


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_graphed_mlps_expert_parallel_rows_gpu(tmp_path: Path) -> None:
    """The rows mode's NCCL exchanges inside the graphs, and its dispatch counters, replayed."""
    extra = ("parallel=ep2_rows",)
    eager = _train(tmp_path, "eager", *extra, gpus=2)
    graphed = _train(tmp_path, "graphed", *extra, "trainer.cuda_graphs=mlp", gpus=2)
    _compare(eager, graphed)
    for a, b in zip(eager, graphed, strict=True):
        if "dispatch_load_imbalance" in a:
            assert b["dispatch_load_imbalance"] == pytest.approx(a["dispatch_load_imbalance"])
            assert b["dispatch_fwd_bytes_per_layer"] == a["dispatch_fwd_bytes_per_layer"]
            assert b["dispatch_dest_ranks"] == pytest.approx(a["dispatch_dest_ranks"])
