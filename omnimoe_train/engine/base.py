"""The interface between the training loop and an engine.

The loop (``trainer.py``) owns the schedule of a run: which step, when to log, evaluate and save.
An engine owns how one step is computed: the wrapped model chunks, the optimizer and its LR
schedule, and the forward/backward schedule (megatron-core's pipeline schedules, or DeepSpeed's
engine). Everything the loop needs from an engine is listed here, so the loop, the metrics and
the checkpoint rules are written once for every engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn


class Engine(Protocol):
    """One optimizer step at a time on this rank's share of the model."""

    #: The model chunks this rank holds (one, or one per virtual pipeline stage), wrapped.
    model: list[nn.Module]
    #: Micro-batches this rank runs per optimizer step (gradient accumulation steps).
    num_microbatches: int
    #: One console line: how the expert tables and optimizer state are laid out over ranks.
    sharding_note: str

    def forward_backward_step(self, data_iterator: Iterator[torch.Tensor]) -> torch.Tensor:
        """Forward and backward of one step's micro-batches; grads reduced, not yet applied.

        Returns a float64 device tensor ``[loss sum, token count]`` (zeros off the last stage).
        """
        ...

    def run_schedule(
        self, data_iterator: Iterator[torch.Tensor], num_microbatches: int, forward_only: bool
    ) -> torch.Tensor:
        """Forward (and backward unless ``forward_only``) of ``num_microbatches`` micro-batches."""
        ...

    def optimizer_step(self) -> float:
        """Clip, apply the update, advance the LR schedule; returns the global grad norm."""
        ...

    def mean_loss(self, total: torch.Tensor) -> float:
        """``[sum, count]`` of this rank -> mean over every rank that holds losses (collective)."""
        ...

    def dispatch_metrics(self, steps: int) -> dict[str, float]:
        """Expert-dispatch traffic per layer per step over the last ``steps`` (collective)."""
        ...

    def num_parameters(self) -> int:
        """Parameters of this rank's model chunks, at full size even where ZeRO partitions them."""
        ...

    def current_lr(self) -> float:
        """The learning rate of the last (or next) update."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and LR-schedule state of this rank, for a checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        ...
