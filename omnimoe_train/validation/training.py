"""Rules of the training run around the model: the optimizer and its schedule, checkpoints,
the time limit and bad-step guard, the profiled step, and the names the run creates (folders,
W&B tags)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from omnimoe_data.shards import file_in_the_way
from omnimoe_train.checkpoint.signals import parse_duration
from omnimoe_train.config import (
    CheckpointConfig,
    DataConfig,
    OptimConfig,
    TrainerConfig,
    WandbConfig,
)
from omnimoe_train.names import COMPONENT_MAX_BYTES, long_component
from omnimoe_train.validation.errors import ConfigError, require

# W&B refuses a run whose tags are empty or longer than this (wandb.Settings.validate_tags).
WANDB_TAG_MAX_CHARS = 64


def validate_optim(o: OptimConfig, max_steps: int) -> None:
    """The peak LR, AdamW's hyperparameters (``torch.optim.AdamW`` refuses the same values with
    a traceback once the model is built) and the warmup-stable-decay schedule over
    ``trainer.max_steps``."""
    require(math.isfinite(o.lr) and o.lr > 0, "optim.lr", f"must be a positive number (got {o.lr})")
    for key in ("beta1", "beta2"):
        beta = getattr(o, key)
        require(0.0 <= beta < 1.0, f"optim.{key}", f"must be in [0, 1) (got {beta})")
    require(math.isfinite(o.eps) and o.eps > 0, "optim.eps", f"must be positive (got {o.eps})")
    require(
        math.isfinite(o.weight_decay) and o.weight_decay >= 0,
        "optim.weight_decay",
        f"must be >= 0 (got {o.weight_decay})",
    )
    require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    require(0.0 <= o.decay_fraction <= 1.0, "optim.decay_fraction", "must be in [0, 1]")
    require(
        0 <= o.warmup_steps < max_steps,
        "optim.warmup_steps",
        f"must be in [0, trainer.max_steps={max_steps}) (got {o.warmup_steps})",
    )
    require(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables clipping)")


def validate_checkpoint(c: CheckpointConfig) -> None:
    require(c.interval >= 0, "checkpoint.interval", "must be >= 0 (0 = final only)")
    require(c.keep >= 1, "checkpoint.keep", f"must be >= 1 (got {c.keep})")
    require(
        all(s >= 0 for s in c.keep_steps),
        "checkpoint.keep_steps",
        f"must be steps >= 0 (got {list(c.keep_steps)})",
    )


def validate_resume_path(c: CheckpointConfig) -> None:
    """A ``checkpoint.resume`` path names an existing folder. A fact of this machine, checked in
    the CLI's pre-check (like ``validate_data_paths``): otherwise the run finds it only after
    data preparation. Whether the folder holds a valid checkpoint is the run's check (it reads
    every file's checksum)."""
    resume = c.resume
    if resume is None or str(resume).lower() in ("auto", "none", "null", "false"):
        return
    path = Path(resume).expanduser()
    require(
        path.is_dir(),
        "checkpoint.resume",
        f"{resume} is not a folder (give a checkpoint folder step_<8 digits>, a folder of them, "
        "auto or none)",
    )


# An empty path names the folder it is taken relative to: checkpoint.dir='' put the
# checkpoints among the run's own files, checkpoint.resume='' looked in the current folder.
EMPTY_RULE = (
    "must not be empty (it names the folder it is relative to); leave it out for the default"
)


def validate_output_folder(key: str, folder: str | Path) -> None:
    """A folder the run will write (``hydra.run.dir``, ``checkpoint.dir``) can be made: no
    existing file is in its way, and it can be created and written. A fact of this machine,
    checked before any work, because the checkpoint folder is first made at the first save: a
    file there would cost the training done before it, with a traceback. Raises :class:`ConfigError` naming ``key`` for a file in
    the way and for a folder that cannot be made or written (permission, a read-only file
    system)."""
    require(str(folder).strip() != "", key, EMPTY_RULE)
    path = Path(folder).expanduser()
    blocker = file_in_the_way(path)
    if blocker is not None:
        where = "" if blocker == path else f": {blocker}"
        raise ConfigError(key, f"{folder}{where} is a file, not a folder")
    # No permission, a read-only or pseudo file system (/proc, /sys): found by making (and
    # removing) a folder where the run's would go, since os.access says yes to root there.
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".omnimoe-probe-", dir=existing))
    except OSError as exc:
        raise ConfigError(
            key, f"{folder} cannot be made or written ({exc.strerror or exc} in {existing})"
        ) from None


# torch's generators take a 64-bit seed, and megatron's RNG tracker seeds its streams with
# trainer.seed plus small offsets (2718 + the TP rank, 1024 + 100 * the EP rank): a seed below
# 2**63 leaves room for them. A larger one crashed in torch.manual_seed after the data was made.
SEED_LIMIT = 2**63


def validate_seed(t: TrainerConfig) -> None:
    """``trainer.seed`` in [0, 2**63): what the RNG streams derived from it accept."""
    require(
        0 <= t.seed < SEED_LIMIT,
        "trainer.seed",
        f"must be an integer in [0, 2**63) (got {t.seed})",
    )


def validate_robustness(t: TrainerConfig) -> None:
    """Time limit and bad-step rules."""
    if t.max_time is not None:
        try:
            parse_duration(t.max_time)
        except ValueError as exc:
            raise ConfigError("trainer.max_time", str(exc)) from None
    require(
        t.spike_zscore >= 0, "trainer.spike_zscore", f"must be >= 0 (0 = off; got {t.spike_zscore})"
    )
    require(t.spike_window >= 2, "trainer.spike_window", f"must be >= 2 (got {t.spike_window})")
    require(t.max_bad_steps >= 1, "trainer.max_bad_steps", f"must be >= 1 (got {t.max_bad_steps})")
    require(
        all(s >= 1 for s in t.nan_loss_steps),
        "trainer.nan_loss_steps",
        f"must be steps >= 1 (a test hook; got {list(t.nan_loss_steps)})",
    )


def validate_profile_step(t: TrainerConfig) -> None:
    """``trainer.profile_step``: off (null) or a step the run reaches, 1-based as logged. (A
    resumed run that starts past it simply does not profile: not a rule, the step is gone.)"""
    step = t.profile_step
    if step is None:
        return
    require(
        isinstance(step, int) and not isinstance(step, bool) and 1 <= step <= t.max_steps,
        "trainer.profile_step",
        f"must be null (off) or a step in [1, trainer.max_steps={t.max_steps}] (got {step!r})",
    )


def validate_names(d: DataConfig, c: CheckpointConfig, w: WandbConfig) -> None:
    """Names and paths given empty, folders the run creates from paths given whole, and W&B's
    tag rule: checked here, not at the first write (the checkpoint folder is first made at the
    end of training). Empty paths: see ``EMPTY_RULE``."""
    single = {
        "data.name": d.name,
        "data.dir": d.dir,
        "data.tokenizer": d.tokenizer,
        "checkpoint.dir": c.dir,
        "checkpoint.resume": c.resume,
    }
    listed = {"data.inputs": d.inputs or [], "data.dirs": d.dirs or []}
    for key, value in single.items():
        require(value is None or str(value).strip() != "", key, EMPTY_RULE)
    for key, values in listed.items():
        require(
            all(str(v).strip() != "" for v in values),
            key,
            "an entry is empty (it names the current folder); remove it",
        )
    for key, path in (("data.dir", d.dir), ("checkpoint.dir", c.dir)):
        part = long_component(path) if path is not None else None
        require(
            part is None,
            key,
            f"a path component has {len(part.encode()) if part else 0} bytes, more than the "
            f"file system's {COMPONENT_MAX_BYTES} ({(part or '')[:40]}...)",
        )
    if w.mode != "disabled":
        for tag in w.tags:
            require(
                1 <= len(str(tag)) <= WANDB_TAG_MAX_CHARS,
                "logging.wandb.tags",
                f"each tag must have 1 to {WANDB_TAG_MAX_CHARS} characters, W&B's rule "
                f"(got {len(str(tag))}: {str(tag)[:40]!r})",
            )
