"""The interface between the training loop and an engine.

The loop (``trainer.py``) owns the schedule of a run: which step, when to log, evaluate and save.
An engine owns how one step is computed: the wrapped model chunks, the optimizer and its LR
schedule, and the forward/backward schedule (megatron-core's pipeline schedules, or DeepSpeed's
engine). Everything the loop needs from an engine is listed here, so the loop, the metrics and
the checkpoint rules are written once for every engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from omnimoe_train.checkpoint.manager import PendingWrite


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
        """Forward (and backward unless ``forward_only``) of ``num_microbatches`` micro-batches
        of equal shape; rows of token id -1 (evaluation's padding) count neither in the loss
        nor in the token count. Returns ``[loss sum, token count]`` as above."""
        ...

    def grad_norm(self) -> float:
        """Global L2 norm of this step's reduced gradients, the same float on every rank
        (collective). ``inf``/``NaN`` when any gradient is non-finite. This is the step's one
        host synchronisation: the trainer reads other per-step values only after it."""
        ...

    def apply_update(self, grad_norm: float) -> None:
        """Clip by ``grad_norm`` (``optim.clip_grad``), update the weights, advance the LR
        schedule. Not called for a skipped (bad) step: then nothing changes, neither weights
        nor optimizer state nor schedule, and the next ``forward_backward_step`` starts from
        zeroed gradients."""
        ...

    def skip_update(self) -> None:
        """The step is not applied (instead of ``apply_update``): put back whatever its forward
        pass changed outside the weights (running statistics such as the router's BatchNorm),
        so that a skipped step leaves the model exactly as it was."""
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

    # -- checkpoints (rules: checkpoint/manager.py; the loop's state: checkpoint/session.py) --
    def checkpoint_meta(self) -> dict[str, Any]:
        """JSON-able facts for ``meta.json``: at least ``engine`` (a name) and ``layout`` (a
        dict: a checkpoint whose layout equals the current one restores per-rank state too)."""
        ...

    def save_checkpoint(
        self, directory: Path, client_state: dict[str, Any], *, async_save: bool
    ) -> PendingWrite | None:
        """Collective. Write model, optimizer, LR schedule and every rank's RNG states, plus
        ``client_state`` (the loop's; the same on every rank, stored once), into the existing
        empty ``directory``. Write only there: the manager checksums and publishes the folder.
        Returns None when the files are complete, or (``async_save``) a
        :class:`~omnimoe_train.checkpoint.manager.PendingWrite` whose ``done`` finishes them;
        the state must be snapshotted before returning (training continues). Raise on any
        write error; the manager makes every rank agree and removes the folder."""
        ...

    def load_checkpoint(self, directory: Path, *, scratch: Path | None = None) -> dict[str, Any]:
        """Collective. Load a published checkpoint written under *any* parallel layout of this
        engine (resharding), restore per-rank state when the layout is the same, and return the
        saved ``client_state`` with ``_rank_local_restored`` (bool) added. Raise if it does not
        fit this model. ``scratch``: a folder every rank can read, where an engine that
        converts a checkpoint for another layout may write the conversion (made and removed by
        the engine; the run's checkpoint folder's ``.convert.tmp``, never beside
        ``directory``, which may belong to another run or be read-only)."""
        ...
