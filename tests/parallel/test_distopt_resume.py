"""The distributed optimizer's sharded Adam state survives a checkpoint: exact resume on 2 ranks
(torchrun, a fresh run directory resuming from an explicit checkpoint path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omnimoe_train.checkpoint.files import find_problem

ARGS = [
    "parallel=dp2_distopt",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_experts=256",
    "data.vocab_size=512",
    "data.max_bytes=300000",
    "data.seq_len=32",
    "data.micro_batch_size=4",
    "data.global_batch_size=8",
    "optim.warmup_steps=2",
    "trainer.max_steps=8",
    "trainer.log_interval=2",
    "trainer.eval_interval=8",
    "trainer.eval_iters=2",
    "trainer.progress=false",
    "logging=disabled",
    "checkpoint.interval=4",
]


def _torchrun(run_dir: Path, cache: Path, *extra: str) -> None:
    env = {**os.environ, "OMNIMOE_CACHE": str(cache), "OMNIMOE_RUN_DIR": str(run_dir)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*cmd, "-m", "omnimoe_train.cli", *ARGS, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_distributed_optimizer_resumes_exactly(tmp_path: Path) -> None:
    cache, run_a, run_b = tmp_path / "cache", tmp_path / "a", tmp_path / "b"
    _torchrun(run_a, cache)
    step4 = run_a / "checkpoints" / "step_00000004"
    assert find_problem(step4) is None
    assert json.loads((step4 / "meta.json").read_text())["layout"]["distributed_optimizer"]
    _torchrun(run_b, cache, f"checkpoint.resume={step4}")
    full = _losses(run_a)
    assert _losses(run_b) == {step: loss for step, loss in full.items() if step > 4}
