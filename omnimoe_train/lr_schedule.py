"""The shape of the warmup-stable-decay learning-rate schedule, from the config alone.

Kept free of torch and megatron: ``checkpoint.compat`` reads it when it compares a checkpoint's
schedule with this run's, before anything heavy is imported; ``engine.optim.wsd_scheduler``
builds megatron's scheduler from the same numbers.
"""

from __future__ import annotations

# The keys megatron's WSD scheduler is built from (``engine.optim.wsd_scheduler``), as
# (section, key) of the root config.
SCHEDULE_KEYS = (
    ("trainer", "max_steps"),
    ("optim", "warmup_steps"),
    ("optim", "decay_fraction"),
    ("optim", "decay_style"),
    ("optim", "lr"),
    ("optim", "min_lr_ratio"),
)


def wsd_decay_steps(decay_fraction: float, max_steps: int) -> int:
    """Steps of WSD's decay phase: the last ``optim.decay_fraction`` of ``max_steps``, at
    least one (megatron's ``wsd_decay_steps``)."""
    return max(1, int(decay_fraction * max_steps))


def wsd_decay_start(decay_fraction: float, max_steps: int) -> int:
    """The last step of WSD's stable phase: megatron's ``wsd_anneal_start_``
    (``lr_decay_steps - wsd_decay_steps``; the LR decays after it)."""
    return max_steps - wsd_decay_steps(decay_fraction, max_steps)
