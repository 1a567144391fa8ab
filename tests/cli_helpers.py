"""Running ``omnimoe-train`` in a subprocess, as a user would, and checking its usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_train_cli(
    args: list[str], *, cache: Path, world_size: int | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMNIMOE_CACHE": str(cache), "WANDB_SILENT": "true"}
    env.pop("WORLD_SIZE", None)
    # An in-process test's init_runtime leaves its rendezvous port in os.environ (its store may
    # still hold it): the subprocess picks its own.
    env.pop("MASTER_PORT", None)
    env.pop("MASTER_ADDR", None)
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
