"""The training loop: steps, logging, evaluation, checkpoints and early stops around an engine.

How one optimizer step is computed (model chunks, optimizer, schedules, parallel layout) is the
engine's business (``engine/``); when a checkpoint is complete, kept or loaded is the
checkpoint manager's (``checkpoint/``); what the run needs before its first step is
``training_setup``'s, evaluation ``evaluation``'s, and what a logged step holds ``step_log``'s;
this module decides only what happens when.

One step: forward/backward; one world all-reduce of [loss, tokens, stop flag]
(``checkpoint.signals.StepSync``); the grad norm (the step's one host sync); then the bad-step
verdict (``bad_steps.StepGuard``) decides whether the update is applied. Every rank reaches the
same verdict and the same stop decision from the same reduced values.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from omnimoe_train import evaluation
from omnimoe_train.evaluation import EVAL_OFF
from omnimoe_train.exit_codes import EXIT_DIVERGED, EXIT_OK, EXIT_REQUEUE, resume_hint
from omnimoe_train.metrics import METRICS_FILE, MetricsSink, logged_initial_val_loss
from omnimoe_train.step_log import (
    StepOutcome,
    bad_step_record,
    divergence_message,
    window_record,
)
from omnimoe_train.training_setup import StoppedBeforeFirstStep, TrainingSetup
from omnimoe_train.validation import ATOMIC_EXPERT_MLPS

# run.py and tests import these from here.
__all__ = ["StepOutcome", "StoppedBeforeFirstStep", "Trainer"]


class Trainer(TrainingSetup):
    """The loop (:meth:`fit`) over a run's setup (``training_setup.TrainingSetup``, whose
    constructor raises the errors of a run that cannot start)."""

    def train_step(self) -> StepOutcome:
        s = self.state
        total = self.engine.forward_backward_step(iter(self.train_loader))
        if s.step + 1 in self.cfg.trainer.nan_loss_steps:  # TEST HOOK (config docstring)
            total = total * float("nan")
        self.sync.start(total, self.stop.local())
        grad_norm = self.engine.grad_norm()
        loss_sum, tokens, stop = self.sync.result()
        loss = loss_sum / tokens if tokens > 0 else float("nan")
        verdict = self.guard.check(loss, grad_norm)
        if verdict.skip:
            self.engine.skip_update()
        else:
            self.engine.apply_update(grad_norm)
        s.step += 1
        s.consumed_tokens += self.tokens_per_step
        return StepOutcome(loss, loss_sum, tokens, grad_norm, verdict, stop)

    def eval_samples(self) -> int:
        """Validation samples of one evaluation (``evaluation.eval_samples``)."""
        assert self.val_loader is not None
        return evaluation.eval_samples(self.cfg, self.val_loader)

    def evaluate(self) -> float:
        """The validation loss (``evaluation.evaluate``), the same for every layout."""
        assert self.val_loader is not None, "evaluation is off (data.val_fraction=0)"
        return evaluation.evaluate(self.cfg, self.rt, self.engine, self.val_loader)

    def save(self) -> None:
        self.ckpt.save(self.state, self.train_loader, self.guard)

    # -- loop ---------------------------------------------------------------------------------
    def fit(self, sink: MetricsSink) -> dict[str, Any]:
        """Train to ``trainer.max_steps`` or an early stop; ``summary["exit_code"]`` says which."""
        try:
            return self._fit(sink)
        finally:
            self.close()

    def _fit(self, sink: MetricsSink) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        t = cfg.trainer
        summary: dict[str, Any] = {"num_parameters": self.num_parameters(), "exit_code": EXIT_OK}
        if self.resume is not None:
            for line in self.resume.restore(self.ckpt, s, self.train_loader, self.guard):
                self._warn(line)
            if t.profile_step is not None and t.profile_step <= s.step:
                self._warn(f"trainer.profile_step={t.profile_step}: this run resumes after it "
                           f"(step {s.step}), so no step is profiled")  # fmt: skip
            sink.log({"step": s.step, "resumed_from": self.resume.name})
        # Only now that the start is taken: a refused resume leaves the run dir's checkpoints.
        self.ckpt.manager.set_aside_other_timeline()
        if self.rt.is_main and cfg.model.mlp in ATOMIC_EXPERT_MLPS:
            sink.console.log(self.engine.sharding_note)
        evaluating = self.val_loader is not None
        if evaluating:
            summary["evaluation"] = f"{self.eval_samples()} validation samples per evaluation"
        else:
            summary["evaluation"] = EVAL_OFF
            if self.rt.is_main:
                sink.console.log(f"evaluation {EVAL_OFF}: no val_loss is logged")
        if s.step == 0 and evaluating:
            s.initial_val_loss = self.evaluate()
            sink.log({"step": 0, "val_loss": s.initial_val_loss})
        elif evaluating and self.resume is not None and s.initial_val_loss is None:
            # Resumed from a checkpoint written before it was recorded: the run dir's log.
            s.initial_val_loss = logged_initial_val_loss(self.run_dir / METRICS_FILE)
        if s.initial_val_loss is not None:
            summary["initial_val_loss"] = s.initial_val_loss
        window_start = time.perf_counter()
        if self.rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        while s.step < t.max_steps:
            with self.profiler.around(s.step + 1):  # trainer.profile_step (profiling.py)
                out = self.train_step()
            if (profile := self.profiler.take()) is not None:
                sink.log(profile.record(), line=profile.line())
                window_start += profile.overhead_s  # the files' writing is not training time
            if out.verdict.reason is not None:
                self._log_bad_step(sink, out)
            if not out.verdict.skip:
                s.window[0] += out.loss_sum
                s.window[1] += out.tokens
            s.window[2] += 1
            if s.step % t.log_interval == 0 or s.step == t.max_steps:
                summary["last_train"] = self._log_window(sink, out, window_start)
                window_start = time.perf_counter()
                self.ckpt.manager.poll()  # publish a finished async save (ranks sync here anyway)
            else:
                sink.advance(s.step)
            if evaluating and (s.step % t.eval_interval == 0 or s.step == t.max_steps):
                summary["final_val_loss"] = self.evaluate()
                sink.log({"step": s.step, "val_loss": summary["final_val_loss"]})
            interval = cfg.checkpoint.interval
            if (interval and s.step % interval == 0) or (
                s.step == t.max_steps and cfg.checkpoint.save_final
            ):
                self.save()
            if self.guard.diverged:
                return self._stop(summary, EXIT_DIVERGED, divergence_message(self, out))
            if out.stop and s.step < t.max_steps:
                return self._stop(summary, EXIT_REQUEUE, self.stop.reason())
        self.ckpt.manager.wait()
        return summary

    def _stop(self, summary: dict[str, Any], code: int, why: str) -> dict[str, Any]:
        self.save()
        self.ckpt.manager.wait()
        summary["exit_code"] = code
        summary["stop_reason"] = why
        where = self.ckpt.manager.root / f"step_{self.state.step:08d}"
        if code == EXIT_REQUEUE:
            summary["message"] = (
                f"{why}: stopped after step {self.state.step}, checkpoint {where}; exit code "
                f"{code} ({resume_hint(self.run_dir)})"
            )
        else:
            summary["message"] = f"{why}; the last good weights are in {where}"
        return summary

    def _log_bad_step(self, sink: MetricsSink, out: StepOutcome) -> None:
        sink.log(bad_step_record(self, out))

    def _log_window(self, sink: MetricsSink, out: StepOutcome, started: float) -> dict[str, Any]:
        record = window_record(self, out, started)
        sink.log(record)
        sink.advance(self.state.step, record["loss"], record["tokens_per_s"])
        self.state.reset_window()
        return record
