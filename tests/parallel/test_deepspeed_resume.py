"""``omnimoe-train trainer.engine=deepspeed`` as a user runs it: torchrun, 2 gloo ranks, ZeRO-2.

kill -9 after the first checkpoint and rerun the same command: the loss trajectory is bitwise
that of an uninterrupted run (the checkpoint manager's rules, shared with the megatron engine);
the checkpoint resumes on one process (a universal checkpoint underneath); ``omnimoe-ckpt
consolidate`` turns it into weights a single-process GPT model loads as they are.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from tests.checkpoint.test_fault_tolerance import _wait_for, records, trajectory

ARGS = [
    "trainer.engine=deepspeed",
    "deepspeed=zero2",
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=64",
    "model.num_experts=64",
    "model.top_k=4",
    "data.vocab_size=512",
    "data.max_bytes=300000",
    "data.seq_len=32",
    "data.micro_batch_size=2",
    "data.global_batch_size=8",
    "optim.warmup_steps=2",
    "trainer.max_steps=12",
    "trainer.log_interval=2",
    "trainer.eval_interval=12",
    "trainer.eval_iters=2",
    "trainer.progress=false",
    "logging=disabled",
    "checkpoint.interval=4",
]


def _env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "OMNIMOE_CACHE": str(cache), "WANDB_SILENT": "true"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _command(nproc: int, *args: str) -> list[str]:
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*run, "--nproc-per-node", str(nproc), "-m", "omnimoe_train.cli", *args]


def _run(command: list[str], cache: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=_env(cache), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_kill_resume_bitwise_other_dp_size_and_consolidate(tmp_path: Path) -> None:
    cache, ref, run = tmp_path / "cache", tmp_path / "uninterrupted", tmp_path / "killed"
    _run(_command(2, *ARGS, f"hydra.run.dir={ref}"), cache)

    command = _command(2, *ARGS, f"hydra.run.dir={run}")
    proc = subprocess.Popen(command, env=_env(cache), stderr=subprocess.DEVNULL)
    _wait_for(run / "checkpoints" / "step_00000004", proc)
    # torchrun and both ranks at once (its workers run in sessions of their own).
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in records(run))
    assert killed_at < 12
    rerun = _run(command, cache)
    assert "resumed from" in rerun.stdout + rerun.stderr
    resumes = [r for r in records(run) if "resumed_from" in r]
    assert len(resumes) == 1 and 4 <= resumes[0]["step"] <= killed_at
    assert trajectory(run) == trajectory(ref)  # bitwise: floats compared with ==

    # The dp-2 ZeRO-2 checkpoint on one process: DeepSpeed's universal checkpoint underneath.
    step8 = ref / "checkpoints" / "step_00000008"
    ckpt_names = [p.name for p in step8.parent.iterdir()]
    one = tmp_path / "one_process"
    resumed = _run(_command(1, *ARGS, f"checkpoint.resume={step8}", f"hydra.run.dir={one}"), cache)
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in records(one) if "resumed_from" in r] == [8]
    assert max(r["step"] for r in records(one)) == 12
    # The conversion's scratch was under this run's checkpoint folder, and is gone.
    assert sorted(p.name for p in step8.parent.iterdir()) == sorted(ckpt_names)
    assert not (one / "checkpoints" / ".convert.tmp").exists()

    out = tmp_path / "weights.pt"
    cli = [
        sys.executable,
        "-m",
        "omnimoe_train.checkpoint.cli",
        "consolidate",
        str(step8),
        str(out),
    ]
    done = subprocess.run(cli, env=_env(cache), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = torch.load(out, weights_only=False)
    assert payload["step"] == 8
    _load_into_gpt(payload)


def _load_into_gpt(payload: dict) -> None:
    """A single-process GPT model of the saved config takes the weights as they are."""
    from tests.parallel.distributed import run_distributed

    run_distributed(_build_and_load, 1, payload, timeout_s=300)


def _build_and_load(payload: dict) -> None:
    from megatron.core import parallel_state
    from omegaconf import OmegaConf

    from omnimoe_train.config import RootConfig
    from omnimoe_train.distributed import init_runtime
    from omnimoe_train.model.gpt import build_model, transformer_config

    cfg = OmegaConf.structured(RootConfig)
    cfg.model = OmegaConf.merge(cfg.model, payload["config"])
    cfg.trainer.device = "cpu"
    root: RootConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    init_runtime(root)
    try:
        model = build_model(
            root, transformer_config(root, bf16=False), vocab_size=payload["vocab_size"]
        )
        missing, unexpected = model.load_state_dict(payload["model"], strict=False)
        assert not unexpected, unexpected
        assert all(k.endswith("_extra_state") for k in missing), missing
        for name, param in model.named_parameters():
            assert torch.equal(param.detach(), payload["model"][name]), name
    finally:
        parallel_state.destroy_model_parallel()
