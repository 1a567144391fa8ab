"""The training loop: steps, logging, evaluation, checkpoints and early stops around an engine.

How one optimizer step is computed (model chunks, optimizer, schedules, parallel layout) is the
engine's business (``engine/``); when a checkpoint is complete, kept or loaded is the
checkpoint manager's (``checkpoint/``); this module decides only what happens when.

One step: forward/backward; one world all-reduce of [loss, tokens, stop flag]
(``checkpoint.signals.StepSync``); the grad norm (the step's one host sync); then the bad-step
verdict (``bad_steps.StepGuard``) decides whether the update is applied. Every rank reaches the
same verdict and the same stop decision from the same reduced values.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from omnimoe_train.bad_steps import StepGuard, Verdict
from omnimoe_train.checkpoint.compat import RunAlreadyComplete
from omnimoe_train.checkpoint.resume import ResumePoint, find_resume_point, open_checkpointing
from omnimoe_train.checkpoint.session import CheckpointLoadError, TrainState
from omnimoe_train.checkpoint.signals import StepSync, StopRequest, parse_duration
from omnimoe_train.config import RootConfig
from omnimoe_train.data import PreparationStopped, build_loader, prepare_data
from omnimoe_train.distributed import Runtime
from omnimoe_train.engine import build_engine
from omnimoe_train.engine.deepspeed_config import zero_stage
from omnimoe_train.engine.megatron import PAD_ID
from omnimoe_train.exit_codes import EXIT_DIVERGED, EXIT_OK, EXIT_REQUEUE, resume_hint
from omnimoe_train.metrics import METRICS_FILE, MetricsSink, logged_initial_val_loss
from omnimoe_train.mfu import throughput_metrics
from omnimoe_train.model.accounting import model_accounting
from omnimoe_train.model.expert_stats import ExpertStats, collect_aux_loss, collect_expert_metrics
from omnimoe_train.model.gpt import padded_vocab_size
from omnimoe_train.profiling import PROFILE_DIR, StepProfiler
from omnimoe_train.validation import (
    ATOMIC_EXPERT_MLPS,
    MEGATRON_MOE_MLPS,
    data_facts_before_preparation,
    validate_against_data,
)

EVAL_OFF = "off: data.val_fraction=0"


class StoppedBeforeFirstStep(Exception):
    """Every rank stops during the setup, before the first step, with nothing to save: a stop
    signal came while the data was prepared (``data.prepare_data``). ``why``: the start of the
    stop line (``run.py`` adds the rest); ``signal_name``: this rank's signal, if it got one."""

    def __init__(self, why: str, signal_name: str | None) -> None:
        super().__init__(why)
        self.why, self.signal_name = why, signal_name


@dataclass(frozen=True)
class StepOutcome:
    loss: float  # global mean loss of the step (NaN if non-finite)
    loss_sum: float
    tokens: float
    grad_norm: float
    verdict: Verdict
    stop: bool  # some rank asked to stop (signal or time limit): every rank sees the same


def eval_microbatches_per_rank(num_batches: int, dp: int, multiple: int) -> int:
    """Micro-batches every rank runs to evaluate ``num_batches`` global ones: ceil(num / dp),
    rounded up to ``multiple`` (the interleaved pipeline schedule runs groups of pp)."""
    return math.ceil(math.ceil(num_batches / dp) / multiple) * multiple


class Trainer:
    """Data, engine, loaders and checkpoints of one run; :meth:`fit` is the loop.

    Raises ``ConfigError`` (a rule between the config and the data, see
    ``validation.validate_against_data``) or ``DataError`` before any model work, and
    ``CheckpointCorrupt`` when checkpoints exist but none can be resumed from,
    ``CheckpointLoadError`` when the one to resume from was written by another engine, for
    another model shape or another ``data.seed``, and ``RunAlreadyComplete`` when it is at or
    past ``trainer.max_steps`` (all before the data is prepared or the model built, see
    ``checkpoint.resume``; other data, or a vocabulary larger than the checkpoint's, which the
    tokenizer may decide, once the data is known, before the model), and
    :class:`StoppedBeforeFirstStep` when a stop signal came while the data was prepared.
    """

    def __init__(
        self, cfg: RootConfig, runtime: Runtime, run_dir: Path, *, started: float | None = None
    ) -> None:
        self.cfg, self.rt, self.run_dir = cfg, runtime, run_dir
        t, d = cfg.trainer, cfg.data
        # First, so that a stop signal during the setup is not lost: every rank then stops
        # together before the first step (``stop_before_first_step``).
        self.stop = StopRequest(parse_duration(t.max_time) if t.max_time else None)
        self.stop.install()
        # Checked before preparation too: a dataset already in data.dir is never re-cut.
        for facts in data_facts_before_preparation(d):
            validate_against_data(cfg, facts)
        self.ckpt = open_checkpointing(
            cfg.checkpoint,
            run_dir,
            run_config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
            warn=self._warn,
        )
        # The checkpoint to resume from is chosen and checked against this run (engine, model
        # shape, anything left to train) before the data, the model or the engine is built.
        try:
            self.resume: ResumePoint | None = find_resume_point(
                self.ckpt,
                trainer=t,
                model=cfg.model,
                optim=cfg.optim,
                data_seed=d.seed,
                zero_stage=zero_stage(cfg.deepspeed) if t.engine == "deepspeed" else None,
                bf16=runtime.bf16,
            )
        except (CheckpointLoadError, RunAlreadyComplete):
            self.stop.restore()
            raise
        try:
            # Preparing may take hours: it stops between two units of work on a stop signal
            # (the time limit is left to the steps, as in ``stop_before_first_step``).
            self.data = prepare_data(
                d, rank=runtime.rank, stop_requested=lambda: self.stop.signal_name is not None
            )
        except PreparationStopped:
            self.stop.restore()
            # The same line as a stop agreed on after the setup (``stop_before_first_step``).
            why = self.stop.reason() if self.stop.signal_name else "another rank received a signal"
            raise StoppedBeforeFirstStep(why, self.stop.signal_name) from None
        self.data_dir = self.data.description
        for facts in self.data.facts():  # each dataset read (a mixture: every one)
            validate_against_data(cfg, facts)
        self.tokens_per_step = d.global_batch_size * d.seq_len
        # The loader takes only the DP coordinates: every TP (and PP) rank of a replica reads the
        # same micro-batches, as megatron's TP layers and pipeline stages require. Its order of
        # global batches does not depend on the DP size (omnimoe_data.order). Built before the
        # model, so a split too small for the layout is refused before any model work.
        self.train_loader = build_loader(
            d,
            self.data,
            "train",
            dp_rank=runtime.dp_rank,
            dp_size=runtime.dp_size,
            pin_memory=runtime.device.type == "cuda",
        )
        if self.resume is not None:  # other data: one line now, not after the model
            self.resume.check_data_order(self.train_loader.state_dict())
        # Evaluation reads the validation split in file order as one sequence (each rank then
        # takes its share, see ``evaluate``); there is none with data.val_fraction=0.
        self.val_loader = None
        if d.val_fraction > 0:
            self.val_loader = build_loader(
                d, self.data, "val", dp_rank=0, dp_size=1, infinite=False
            )
        self.vocab_size = self._vocab_size()
        self.engine = build_engine(cfg, runtime, self.vocab_size)
        self.ckpt.engine = self.engine
        self.num_microbatches = self.engine.num_microbatches
        # ``started``: when this process started (``time.perf_counter()``), for the wall time.
        self.state = TrainState() if started is None else TrainState(started=started)
        self.guard = StepGuard(
            spike_zscore=t.spike_zscore,
            spike_window=t.spike_window,
            skip_spikes=t.skip_spikes,
            max_bad_steps=t.max_bad_steps,
        )
        self.sync = StepSync(runtime.device)
        self.profiler = StepProfiler(
            t.profile_step, run_dir / PROFILE_DIR, rank=runtime.rank, device=runtime.device
        )
        self.expert_stats = [
            m for c in self.engine.model for m in c.modules() if isinstance(m, ExpertStats)
        ]
        for stats in self.expert_stats:
            stats.enabled = t.expert_stats
        # The same count omnimoe-params prints (the whole model, whatever this rank holds).
        self.flops_per_token = model_accounting(
            cfg.model, seq_len=d.seq_len, vocab_size=self.vocab_size
        ).flops_per_token

    def _warn(self, line: str) -> None:
        # A plain line (not the rich console's, which wraps it): launchers and people grep these.
        if self.rt.is_main:
            print(line, file=sys.stderr, flush=True)

    def _vocab_size(self) -> int:
        """The padded vocabulary: the checkpoint's when this layout can take it, else padded
        for this layout (``ResumePoint.vocab_size``)."""
        vocab, tp = self.cfg.model.vocab_size or self.data.vocab_size, self.cfg.parallel.tp
        saved = self.resume.vocab_size(vocab, tp) if self.resume is not None else None
        return saved if saved is not None else padded_vocab_size(vocab, tp)

    def num_parameters(self) -> int:
        return self.engine.num_parameters()

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
        """Validation samples of one evaluation: the first ``trainer.eval_iters`` micro-batches
        of the split in file order (fewer if the split is shorter; the last may be partial)."""
        assert self.val_loader is not None
        requested = self.cfg.trainer.eval_iters * self.cfg.data.micro_batch_size
        return min(requested, self.val_loader.total)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over :meth:`eval_samples`, the same value for every layout.

        The B global micro-batches are split into contiguous runs of M = ceil(B / dp) per
        data-parallel rank (M rounded up to a multiple of pp under the interleaved schedule), so
        every rank and pipeline stage runs M micro-batches of one shape: a partial last one and
        the runs past B are filled with padding rows (``PAD_ID``) that count neither in the
        loss nor in the token count. Padding, not dropping: the mean is over exactly the
        samples one process evaluates. (BatchNorm uses its running statistics in evaluation,
        so padding rows change no other token's loss.)
        """
        d, p = self.cfg.data, self.cfg.parallel
        loader = self.val_loader
        assert loader is not None, "evaluation is off (data.val_fraction=0)"
        for chunk in self.engine.model:
            chunk.eval()
        mbs = d.micro_batch_size
        num_batches = math.ceil(self.eval_samples() / mbs)
        per_rank = eval_microbatches_per_rank(num_batches, self.rt.dp_size, p.pp if p.vpp else 1)
        first = self.rt.dp_rank * per_rank
        # Start at this rank's first micro-batch (samples before it are not read).
        loader.seek(min(first, loader.batches_per_pass))
        pad = torch.full((mbs, loader.seq_len + 1), PAD_ID, dtype=torch.long)
        batches = []
        for index in range(first, first + per_rank):
            # The loader's last batch of the split is partial; past B only padding is left.
            batch = next(loader) if index < num_batches else pad[:0]
            batches.append(torch.cat([batch, pad[batch.shape[0] :]]))
        total = self.engine.run_schedule(iter(batches), per_rank, forward_only=True)
        return self.engine.mean_loss(total)

    def _expert_metrics(self, steps: int) -> dict[str, float]:
        metrics = {}
        if self.cfg.trainer.expert_stats:
            metrics = collect_expert_metrics(
                self.expert_stats, sequence_parallel=self.cfg.parallel.sequence_parallel
            )
        m = self.cfg.model
        if m.mlp in MEGATRON_MOE_MLPS and m.moe_aux_loss_coeff > 0:
            metrics |= collect_aux_loss(
                num_layers=m.num_layers, microbatches=steps * self.num_microbatches
            )
        return metrics

    def save(self) -> None:
        self.ckpt.save(self.state, self.train_loader, self.guard)

    # -- loop ---------------------------------------------------------------------------------
    def stop_before_first_step(self) -> str | None:
        """Collective, once, after the setup: why every rank stops before the first step (a
        stop signal some rank received during the setup), else None. On a stop the trainer is
        closed (:meth:`close`); the caller exits 75 without saving: no step, nothing new.

        Without it a signal during the setup was acted on only after the first step: one more
        step (on the GPU with its compilation and graph capture) and a save. The time limit
        is left to the steps: a setup longer than ``trainer.max_time`` must still progress.
        """
        self.sync.start(
            torch.zeros(2, dtype=torch.float64, device=self.rt.device),
            self.stop.signal_name is not None,
        )
        if not self.sync.result()[2]:
            return None
        self.close()
        return self.stop.reason() if self.stop.signal_name else "another rank received a signal"

    def close(self) -> None:
        """Stop handling the stop signals (``StopRequest.restore``) and end the data workers
        (they ignore stop signals: here, not at interpreter exit)."""
        self.stop.restore()
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()

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
                return self._stop(summary, EXIT_DIVERGED, self._divergence_message(out))
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

    def _divergence_message(self, out: StepOutcome) -> str:
        return (
            f"training diverged: {self.guard.consecutive_bad} bad steps in a row "
            f"(trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}; the last, step "
            f"{self.state.step}: {out.verdict.reason})"
        )

    def _log_bad_step(self, sink: MetricsSink, out: StepOutcome) -> None:
        record: dict[str, Any] = {
            "step": self.state.step,
            "bad_step": out.verdict.reason,
            "skipped": out.verdict.skip,
            "loss": out.loss,
            "grad_norm": out.grad_norm,
            "skipped_steps": self.guard.skipped_steps,
        }
        if out.verdict.zscore is not None:
            record["zscore"] = out.verdict.zscore
        sink.log(record)

    def _log_window(self, sink: MetricsSink, out: StepOutcome, started: float) -> dict[str, Any]:
        s = self.state
        loss_sum, tokens, steps = s.window
        elapsed = time.perf_counter() - started
        # None: no step of the window was applied (all skipped), so it has no loss (the
        # console reads "loss n/a"; a skipped step's own non-finite loss was logged as nan).
        loss = loss_sum / tokens if tokens > 0 else None
        tokens_per_s = steps * self.tokens_per_step / elapsed
        record = {
            "step": s.step,
            "loss": loss,
            "lr": self.engine.current_lr(),
            "grad_norm": out.grad_norm,
            "tokens_per_s": tokens_per_s,
            **throughput_metrics(
                self.flops_per_token,
                tokens_per_s,
                world_size=self.rt.world_size,
                device=self.rt.device,
            ),
            "consumed_tokens": s.consumed_tokens,
            "skipped_steps": self.guard.skipped_steps,
            **self._expert_metrics(int(steps)),
            **self.engine.dispatch_metrics(int(steps)),
        }
        if self.rt.device.type == "cuda":
            # This window's peak, as torchtitan logs it: reset after each logged step, so the
            # one-off work of the first window (CUDA-graph capture, compilation, first-call
            # allocations) does not stand for every later step's peak.
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        sink.log(record)
        sink.advance(s.step, loss, record["tokens_per_s"])
        s.reset_window()
        return record
