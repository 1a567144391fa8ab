"""What a run needs before its first step, in the order that refuses bad input cheapest first.

The stop handler first (a signal during the setup is not lost), then the rules between the
config and the data already known, the checkpoint to resume from (checked against this run
before any data or model work), the data (prepared on demand), the loaders, the engine, and the
loop's helpers (bad-step guard, step sync, profiler). ``trainer.Trainer`` runs the loop on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from omnimoe_train.bad_steps import StepGuard
from omnimoe_train.checkpoint.compat import RunAlreadyComplete
from omnimoe_train.checkpoint.resume import ResumePoint, find_resume_point, open_checkpointing
from omnimoe_train.checkpoint.session import CheckpointLoadError, TrainState
from omnimoe_train.checkpoint.signals import StepSync, StopRequest, parse_duration
from omnimoe_train.config import RootConfig
from omnimoe_train.data import PreparationStopped, build_loader, prepare_data
from omnimoe_train.distributed import Runtime
from omnimoe_train.engine import build_engine
from omnimoe_train.engine.deepspeed_config import zero_stage
from omnimoe_train.model.accounting import model_accounting
from omnimoe_train.model.expert_stats import ExpertStats
from omnimoe_train.model.gpt import padded_vocab_size
from omnimoe_train.profiling import PROFILE_DIR, StepProfiler
from omnimoe_train.validation import data_facts_before_preparation, validate_against_data


class StoppedBeforeFirstStep(Exception):
    """Every rank stops during the setup, before the first step, with nothing to save: a stop
    signal came while the data was prepared (``data.prepare_data``). ``why``: the start of the
    stop line (``run.py`` adds the rest); ``signal_name``: this rank's signal, if it got one."""

    def __init__(self, why: str, signal_name: str | None) -> None:
        super().__init__(why)
        self.why, self.signal_name = why, signal_name


class TrainingSetup:
    """Data, engine, loaders and checkpoints of one run, and their teardown (:meth:`close`).

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
        # takes its share, see ``evaluation.evaluate``); there is none with data.val_fraction=0.
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
