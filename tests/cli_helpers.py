"""Running ``omnimoe-train`` in a subprocess, as a user would, and checking its usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Issue 9's tiny model (2 layers, d = 32, 64 atomic experts) on a 200 kB slice of the default
# corpus: the base of every subprocess run of ``omnimoe-train`` in the tests.
TINY_BASE = {
    "model.num_layers": 2,
    "model.hidden_size": 32,
    "model.num_attention_heads": 2,
    "model.ffn_hidden_size": 64,
    "model.num_experts": 64,
    "model.top_k": 4,
    "data.vocab_size": 300,
    "data.max_bytes": 200000,
    "data.seq_len": 32,
    "data.micro_batch_size": 4,
    "data.global_batch_size": 4,
    "data.val_fraction": 0.2,
    "optim.warmup_steps": 1,
    "trainer.log_interval": 1,
    "trainer.eval_interval": 5,
    "trainer.eval_iters": 2,
    "trainer.progress": "false",
    "logging": "disabled",
}


def tiny(**changes: object) -> list[str]:
    """``TINY_BASE`` as Hydra overrides, with ``changes`` (keys with ``__`` for ``.``:
    ``data__global_batch_size=8``) replacing or adding values; None drops a key (its default
    applies)."""
    values = {**TINY_BASE, **{k.replace("__", "."): v for k, v in changes.items()}}
    return [f"{key}={value}" for key, value in values.items() if value is not None]


def cli_env(cache: Path) -> dict[str, str]:
    """The environment of a one-process ``omnimoe-train`` subprocess: data cache ``cache``, no
    W&B chatter, and none of the launcher variables an in-process test left behind (its
    ``init_runtime`` leaves its rendezvous port in os.environ, and its store may still hold it:
    the subprocess picks its own)."""
    env = {**os.environ, "OMNIMOE_CACHE": str(cache), "WANDB_SILENT": "true"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_train_cli(
    args: list[str], *, cache: Path, world_size: int | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = cli_env(cache)
    if world_size is not None:
        env["WORLD_SIZE"] = str(world_size)
    return subprocess.run(
        [sys.executable, "-m", "omnimoe_train.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_usage_error(result: subprocess.CompletedProcess, prefix: str, workdir: Path) -> None:
    """Exit 2, exactly one stderr line starting with ``prefix``, no traceback, no files made."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    assert "Traceback" not in result.stderr
    assert not any(workdir.iterdir())  # stopped before data, model or process-group work


PRECHECK_ERROR = "omnimoe-train: error: "


def precheck_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``cli.precheck``'s one stderr line for ``argv`` (in this process, before Hydra), without
    its prefix; fails unless it exits 2 with exactly one line."""
    from omnimoe_train import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.precheck(argv, world_size=1)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PRECHECK_ERROR), err
    return lines[0].removeprefix(PRECHECK_ERROR)
