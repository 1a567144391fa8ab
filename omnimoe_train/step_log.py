"""What the loop logs of its steps: a bad step's record, a logging window's record (loss,
learning rate, throughput, expert and dispatch statistics, peak memory), and the line of a
diverged run. ``metrics.MetricsSink`` writes and shows the records."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from omnimoe_train.bad_steps import Verdict
from omnimoe_train.mfu import throughput_metrics
from omnimoe_train.model.expert_stats import collect_aux_loss, collect_expert_metrics
from omnimoe_train.training_setup import TrainingSetup
from omnimoe_train.validation import MEGATRON_MOE_MLPS


@dataclass(frozen=True)
class StepOutcome:
    loss: float  # global mean loss of the step (NaN if non-finite)
    loss_sum: float
    tokens: float
    grad_norm: float
    verdict: Verdict
    stop: bool  # some rank asked to stop (signal or time limit): every rank sees the same


def bad_step_record(run: TrainingSetup, out: StepOutcome) -> dict[str, Any]:
    """The record of a step the guard found bad (``out.verdict.reason`` set), skipped or not."""
    record: dict[str, Any] = {
        "step": run.state.step,
        "bad_step": out.verdict.reason,
        "skipped": out.verdict.skip,
        "loss": out.loss,
        "grad_norm": out.grad_norm,
        "skipped_steps": run.guard.skipped_steps,
    }
    if out.verdict.zscore is not None:
        record["zscore"] = out.verdict.zscore
    return record


def window_record(run: TrainingSetup, out: StepOutcome, started: float) -> dict[str, Any]:
    """The record of the logging window that ends with step ``out`` (``run.state.window``:
    its loss sum, tokens and steps; ``started``: its ``time.perf_counter()`` start). Resets
    the CUDA peak-memory counter, so each window reports its own peak."""
    s = run.state
    loss_sum, tokens, steps = s.window
    elapsed = time.perf_counter() - started
    # None: no step of the window was applied (all skipped), so it has no loss (the
    # console reads "loss n/a"; a skipped step's own non-finite loss was logged as nan).
    loss = loss_sum / tokens if tokens > 0 else None
    tokens_per_s = steps * run.tokens_per_step / elapsed
    record = {
        "step": s.step,
        "loss": loss,
        "lr": run.engine.current_lr(),
        "grad_norm": out.grad_norm,
        "tokens_per_s": tokens_per_s,
        **throughput_metrics(
            run.flops_per_token,
            tokens_per_s,
            world_size=run.rt.world_size,
            device=run.rt.device,
        ),
        "consumed_tokens": s.consumed_tokens,
        "skipped_steps": run.guard.skipped_steps,
        **expert_metrics(run, int(steps)),
        **run.engine.dispatch_metrics(int(steps)),
    }
    if run.rt.device.type == "cuda":
        # This window's peak, as torchtitan logs it: reset after each logged step, so the
        # one-off work of the first window (CUDA-graph capture, compilation, first-call
        # allocations) does not stand for every later step's peak.
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return record


def expert_metrics(run: TrainingSetup, steps: int) -> dict[str, float]:
    """Routed MLPs' usage statistics over the window's ``steps`` (``trainer.expert_stats``),
    and megatron MoE's load-balancing loss."""
    metrics = {}
    if run.cfg.trainer.expert_stats:
        metrics = collect_expert_metrics(
            run.expert_stats, sequence_parallel=run.cfg.parallel.sequence_parallel
        )
    m = run.cfg.model
    if m.mlp in MEGATRON_MOE_MLPS and m.moe_aux_loss_coeff > 0:
        metrics |= collect_aux_loss(
            num_layers=m.num_layers, microbatches=steps * run.num_microbatches
        )
    return metrics


def divergence_message(run: TrainingSetup, out: StepOutcome) -> str:
    return (
        f"training diverged: {run.guard.consecutive_bad} bad steps in a row "
        f"(trainer.max_bad_steps={run.cfg.trainer.max_bad_steps}; the last, step "
        f"{run.state.step}: {out.verdict.reason})"
    )
