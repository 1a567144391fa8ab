"""The GPU-only benchmark scripts, on a machine without a GPU: one line naming the script and
what it needs, exit 2 -- not a traceback from their first timed kernel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [
    ("bench_kernels.py",),
    ("bench_kernels.py", "--only", "combine_ranges"),
    ("profile_layer.py",),
    ("bench_grad_paths.py",),
    ("bench_expert_stats.py",),
    ("profile_experts.py", "16", "8", "4", "2"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("command", SCRIPTS, ids=[" ".join(c) for c in SCRIPTS])
def test_gpu_only_benchmarks_refuse_in_one_line_without_a_gpu(command: tuple[str, ...]) -> None:
    script, *args = command
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines == [f"{script}: error: times GPU kernels: needs a CUDA GPU, none is visible"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_profile_expert_parallel_cuda_graph_refuses_in_one_line_without_a_gpu() -> None:
    script = "profile_expert_parallel.py"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--cuda-graph"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines == [f"{script}: error: --cuda-graph needs a CUDA GPU, none is visible"]


def test_profile_expert_parallel_refuses_a_cap_below_one_mib() -> None:
    script = "profile_expert_parallel.py"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--dense-max-mib", "0"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"{script}: error: --dense-max-mib must be >= 1 (got 0)"
    ]


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="checks the refusal below 2 GPUs")
def test_probe_copy_engine_refuses_in_one_line_without_two_gpus() -> None:
    script = "probe_copy_engine.py"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: needs 2+ CUDA GPUs"), lines
