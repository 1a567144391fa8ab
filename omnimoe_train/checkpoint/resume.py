"""Resuming a run: which checkpoint it continues from, whether that checkpoint fits the run
(decided from its ``meta.json`` before the data, the model or the engine is built, see
``compat``), and putting the loop back at the checkpoint's step.

The order matters for the user: every refusal that ``meta.json`` alone can decide comes before
any data preparation or model work, so it costs one line; the data order is checked once the
data is prepared (the loader's state names the datasets), still before the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnimoe_train.bad_steps import StepGuard
from omnimoe_train.checkpoint.compat import (
    check_data_order,
    check_resumable,
    checkpoint_vocab_size,
    schedule_change,
)
from omnimoe_train.checkpoint.files import read_meta
from omnimoe_train.checkpoint.session import Checkpointing, TrainState
from omnimoe_train.config import CheckpointConfig, ModelConfig, OptimConfig, TrainerConfig
from omnimoe_train.validation import validate_output_folder


def open_checkpointing(
    cfg: CheckpointConfig,
    run_dir: Path,
    *,
    run_config: dict[str, Any],
    warn: Callable[[str], None],
) -> Checkpointing:
    """The run's checkpoints in ``checkpoint.dir`` (a relative one: under ``run_dir``), with no
    engine attached yet (the caller sets ``engine`` once it is built).

    Raises ``ConfigError`` (``checkpoint.dir``) when a file is in the way of the folder: it is
    made at the first save, and finding that out then would cost the training done before it.
    """
    root = Path(cfg.dir).expanduser()
    ckpt_root = root if root.is_absolute() else run_dir / root
    validate_output_folder("checkpoint.dir", ckpt_root)
    return Checkpointing(cfg, ckpt_root, None, run_config=run_config, warn=warn)


@dataclass(frozen=True)
class ResumePoint:
    """A verified checkpoint this run continues from, and its ``meta.json``."""

    path: Path
    meta: dict[str, Any]
    # A changed learning-rate schedule: worth a line at resume, not a refusal (a longer
    # trainer.max_steps extends the run).
    schedule_note: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def check_data_order(self, loader_state: dict[str, Any]) -> None:
        """Raises ``CheckpointLoadError`` (one line naming the key) unless this run's loader
        (its ``state_dict()``) reads the data in the order the checkpoint's position belongs to
        (``compat.check_data_order``)."""
        check_data_order(self.path, self.meta, loader_state)

    def vocab_size(self, vocab: int, tp: int) -> int | None:
        """The checkpoint's padded vocabulary when this run (``vocab`` entries, ``tp``
        tensor-parallel ranks) can take it, else None (``compat.checkpoint_vocab_size``).
        Raises ``CheckpointLoadError`` when the run asks more entries than it has."""
        return checkpoint_vocab_size(self.path, self.meta, vocab, tp)

    def restore(
        self, ckpt: Checkpointing, state: TrainState, loader: Any, guard: StepGuard
    ) -> list[str]:
        """Load the engine and the loop's state (``state``, the loader's data position, the
        bad-step guard) from the checkpoint; returns the lines worth logging (where it resumed,
        a fresh RNG after a layout change, a changed schedule).

        Raises ``CheckpointLoadError`` when the engine cannot load it into this model, and the
        loader's ``DataError`` for a data position of another data order.
        """
        lines = ckpt.load(self.path, state, loader, guard)
        if self.schedule_note is not None:
            lines.append(self.schedule_note)
        return lines


def find_resume_point(
    ckpt: Checkpointing,
    *,
    trainer: TrainerConfig,
    model: ModelConfig,
    optim: OptimConfig,
    data_seed: int | None,
    zero_stage: int | None = None,
    bf16: bool | None = None,
) -> ResumePoint | None:
    """The checkpoint to resume from per ``checkpoint.resume`` (None: start from step 0), checked
    against this run's engine, model shape, ``data.seed`` and ``trainer.max_steps``.

    Raises ``CheckpointCorrupt`` when checkpoints exist but none can be resumed from (or a named
    one is invalid), ``CheckpointLoadError`` when the one to resume from was written by another
    engine, for another model shape or another ``data.seed``, and ``RunAlreadyComplete`` when it
    is at or past ``trainer.max_steps``.
    """
    path = ckpt.manager.resolve_resume()
    if path is None:
        return None
    meta = read_meta(path)
    check_resumable(
        path,
        meta,
        engine=trainer.engine,
        model=model,
        max_steps=trainer.max_steps,
        data_seed=data_seed,
        zero_stage=zero_stage,
        bf16=bf16,
    )
    note = schedule_change(path, meta, optim=optim, max_steps=trainer.max_steps)
    return ResumePoint(path, meta, note)
