"""``benchmarks/diag_cuda_graphs.py``: a usage error (an unknown case, or no GPU to capture on)
is one line and exit code 2, said before any case process starts, not one "FAILED" line per
case that reads like a failed capture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "diag_cuda_graphs.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def _one_line_usage_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diag_cuda_graphs: error:"), lines
    assert words in lines[0], lines
    assert "FAILED" not in result.stdout and "OK" not in result.stdout


def test_unknown_case_is_one_line() -> None:
    _one_line_usage_error(_run("omnimoe:fsdp"), "omnimoe:ddp_side")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_is_one_line() -> None:
    _one_line_usage_error(_run(), "CUDA")
