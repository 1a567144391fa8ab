"""Shared by the training benchmarks: run ``omnimoe-train`` in a subprocess, read its metrics.

``weak_scaling.py``, ``compare_mlps.py``, ``bench_training.py`` and ``bench_checkpoint.py`` all
measure real training runs the way a user starts them (the CLI, under ``torchrun`` for several
GPUs), so that what they report is what a run logs in ``metrics.jsonl``. The FLOP count is the
trainer's own (``omnimoe_train.model.accounting``, the one ``omnimoe-params`` prints).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Variables of an enclosing torchrun or test harness that would make the child join its world.
_DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class RunResult:
    status: str  # "ok", "exit N: <stderr tail>" or "timeout after S s"
    wall_s: float
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, in order

    @property
    def train(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "tokens_per_s" in r]

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "val_loss" in r]


def trainer_command(overrides: list[str], gpus: int = 1) -> list[str]:
    """The command line of one run: the CLI itself, or under torchrun for ``gpus`` > 1."""
    if gpus == 1:
        return [sys.executable, "-m", "omnimoe_train.cli", *overrides]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={gpus}", "-m", "omnimoe_train.cli", *overrides,
    ]  # fmt: skip


def run_trainer(
    overrides: list[str],
    run_dir: Path,
    *,
    gpus: int = 1,
    timeout_s: float = 600.0,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
) -> RunResult:
    """Run the trainer into ``run_dir`` and return its status and metrics records."""
    run_dir = Path(run_dir)
    child_env = {**os.environ, **(env or {}), "OMNIMOE_RUN_DIR": str(run_dir)}
    for key in _DIST_VARS:
        child_env.pop(key, None)
    cmd = trainer_command(overrides, gpus)
    start = time.perf_counter()
    log = log_path.open("w") if log_path is not None else subprocess.PIPE
    try:
        proc = subprocess.run(
            cmd, env=child_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            text=True, timeout=timeout_s,
        )  # fmt: skip
        tail = proc.stdout[-400:] if isinstance(proc.stdout, str) else f"see {log_path}"
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {tail}"
    except subprocess.TimeoutExpired:
        status = f"timeout after {timeout_s:.0f} s"
    finally:
        if log_path is not None:
            log.close()
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    return RunResult(status, time.perf_counter() - start, records)


def steady_state(result: RunResult, skip_windows: int = 1) -> dict[str, Any]:
    """Means over the logging windows after the first ``skip_windows`` (compilation, warm-up).

    Returns tokens/s, step time (ms), TFLOP/s and MFU (when logged), peak memory (GiB) of the
    steady windows and of the first, the first and last window's tokens/s, and the last
    training and held-out losses; with a profiled step (``trainer.profile_step``), its device
    kernel time ``kernel_ms`` and wall time ``profiled_step_ms``, its window left out of the
    means.
    """
    train = result.train
    if not train:
        return {}
    steady = train[skip_windows:] or train[-1:]
    profiled = [r for r in result.records if "profile_kernel_ms" in r]
    if profiled:
        # The profiled step (trainer.profile_step) runs under CUPTI, slower than the others:
        # its window leaves the throughput when another steady window is left.
        at = profiled[-1]["step"]
        starts = [0] + [r["step"] for r in train]
        kept = [r for r, s in zip(train, starts, strict=False) if not s < at <= r["step"]]
        steady = [r for r in steady if r in kept] or steady

    def mean(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    tokens_per_s = mean("tokens_per_s")
    step_tokens = train[-1]["consumed_tokens"] / max(1, train[-1]["step"])
    out = {
        "tokens_per_s": tokens_per_s,
        "step_ms": 1e3 * step_tokens / tokens_per_s if tokens_per_s else None,
        "tokens_per_s_first_window": steady[0]["tokens_per_s"],
        "tokens_per_s_last_window": steady[-1]["tokens_per_s"],
        "tflops": mean("tflops"),
        "mfu": mean("mfu"),
        # each window's own peak (the trainer resets it per logged step): the steady windows',
        # and the first one's apart (it holds the CUDA-graph capture, compilation, warm-up)
        "peak_memory_gib": max((r.get("peak_memory_gib") or 0.0) for r in steady),
        "peak_memory_gib_first_window": train[0].get("peak_memory_gib"),
        "loss": train[-1].get("loss"),
        "steps": train[-1]["step"],
        "consumed_tokens": train[-1]["consumed_tokens"],
    }
    if profiled:  # one step's device kernel time: what the GPU itself spent, host waits aside
        out["kernel_ms"] = profiled[-1]["profile_kernel_ms"]
        out["profiled_step_ms"] = profiled[-1]["profile_step_wall_ms"]
    if result.evals:
        out["val_loss"] = result.evals[-1]["val_loss"]
        out["initial_val_loss"] = result.evals[0]["val_loss"]
    for key in (
        "expert_usage", "unevenness", "load_imbalance", "router_entropy", "aux_loss",
        "dispatch_load_imbalance",
    ):  # fmt: skip
        if key in train[-1]:
            out[key] = train[-1][key]
    return out


def compose(overrides: list[str]) -> Any:
    """The config the trainer would run with ``overrides`` (Hydra composition, validated)."""
    from omnimoe_train.config import register_configs
    from omnimoe_train.params_cli import compose as compose_validated

    register_configs()
    return compose_validated(overrides)


def accounting(overrides: list[str]) -> dict[str, float]:
    """total_params, active_params, flops_per_token of the model ``overrides`` describe."""
    from omnimoe_train.model.accounting import model_accounting
    from omnimoe_train.model.gpt import padded_vocab_size

    cfg = compose(overrides)
    vocab = cfg.model.vocab_size or cfg.data.vocab_size
    vocab = padded_vocab_size(vocab, cfg.parallel.tp)
    return model_accounting(cfg.model, seq_len=cfg.data.seq_len, vocab_size=vocab).summary()


def require_cuda(prog: str) -> None:
    """One line and exit 2 when no CUDA GPU is visible: for the GPU-only benchmarks, which
    otherwise end in a traceback deep in their first timed kernel."""
    import torch

    from omnimoe_train.exit_codes import exit_usage

    if not torch.cuda.is_available():
        exit_usage(prog, "times GPU kernels: needs a CUDA GPU, none is visible")


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
