"""The loop's side of checkpoints, for any engine: what the loop saves besides the engine's
state, and how a run is put back where it stopped.

The engine contract (``engine.base.Engine``): ``save_checkpoint(folder, client_state,
async_save=...)`` writes the engine's state plus the loop's ``client_state`` (identical on every
rank; saved once) into ``folder``; ``load_checkpoint(folder)`` loads a checkpoint of any layout
and returns that ``client_state``; ``checkpoint_meta()`` describes the layout for ``meta.json``.
The rules of when a checkpoint is complete, kept or loaded are the manager's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnimoe_train.bad_steps import StepGuard
from omnimoe_train.checkpoint.files import read_meta
from omnimoe_train.checkpoint.manager import CheckpointManager, first_line
from omnimoe_train.config import CheckpointConfig

#: The folder under the run's checkpoint folder where an engine converts a checkpoint of
#: another layout before loading it (``engine.base.Engine.load_checkpoint``'s ``scratch``).
CONVERT_SCRATCH = ".convert.tmp"


class CheckpointLoadError(ValueError):
    """A valid checkpoint that does not fit this run (another model shape, engine...), or that
    could not be converted for this run's layout."""


def data_order(loader_state: dict[str, Any]) -> dict[str, Any]:
    """What of a loader's ``state_dict`` fixes the order of the data (``meta.json``'s "data",
    checked by ``compat.check_data_order``): the datasets, their weights, the seed."""
    return json.loads(json.dumps({k: loader_state.get(k) for k in ("data_ids", "weights", "seed")}))


def layout_change(saved: Any, now: dict[str, Any]) -> str:
    """What differs between a checkpoint's layout (``meta.json``'s, may be absent or of
    another engine) and this run's, as ``key old -> new`` items, e.g. ``world_size 2 -> 1,
    ep 2 -> 1``; keys one side lacks read ``-``. Not the raw dicts: one short line."""
    if not isinstance(saved, dict):
        return "the checkpoint does not record its layout"
    keys = [*now, *(k for k in saved if k not in now)]
    items = [
        f"{key} {_shown(saved.get(key, '-'))} -> {_shown(now.get(key, '-'))}"
        for key in keys
        if saved.get(key, "-") != now.get(key, "-")
    ]
    return ", ".join(items) or "the same layout, per-rank state not restored"


def _shown(value: Any) -> str:
    """A layout value as the config writes it (``true``, ``null``), not as Python does."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


@dataclass
class TrainState:
    """Everything of the loop that a resume must restore (the engine holds the rest)."""

    step: int = 0
    consumed_tokens: int = 0
    # The current logging window: sum of global loss sums, token counts, steps in it.
    window: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    # The validation loss before step 1 (None: not evaluated, or a checkpoint without it).
    initial_val_loss: float | None = None
    # Wall time (s) of the earlier processes of this run, each up to the checkpoint the next
    # one resumed from, and the ``time.perf_counter()`` at which this process started.
    earlier_wall_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def reset_window(self) -> None:
        self.window = [0.0, 0.0, 0.0]

    def segment_wall_s(self) -> float:
        """Seconds since this process started."""
        return time.perf_counter() - self.started

    def total_wall_s(self) -> float:
        """Seconds of this run's trajectory: earlier processes (up to each resume) + this one."""
        return self.earlier_wall_s + self.segment_wall_s()


class Checkpointing:
    """Save and resume one run: a :class:`CheckpointManager` plus the loop's own state."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        root: Path,
        engine: Any,
        *,
        run_config: dict[str, Any],
        warn: Callable[[str], None],
    ) -> None:
        self.cfg, self.engine, self.run_config, self.warn = cfg, engine, run_config, warn
        self.manager = CheckpointManager(root, cfg, warn=warn)

    def save(self, state: TrainState, loader: Any, guard: StepGuard) -> None:
        """Checkpoint the current step (once per step; a second call is a no-op)."""
        if self.manager.last_saved_step == state.step:
            return
        data = loader.state_dict()
        client = {
            "step": state.step,
            "consumed_tokens": state.consumed_tokens,
            "window": list(state.window),
            "data": data,
            "guard": guard.state_dict(),
            "initial_val_loss": state.initial_val_loss,
            "wall_s": state.total_wall_s(),
        }
        meta = {
            "step": state.step,
            "consumed_tokens": state.consumed_tokens,
            **self.engine.checkpoint_meta(),
            "config": self.run_config,
            "data": data_order(data),  # checked against the next run before its model is built
        }
        self.manager.save(
            state.step,
            lambda folder: self.engine.save_checkpoint(
                folder, client, async_save=self.cfg.async_save
            ),
            meta,
        )

    def load(self, path: Path, state: TrainState, loader: Any, guard: StepGuard) -> list[str]:
        """Restore the engine and the loop from ``path``; returns the lines worth logging."""
        try:
            client = self.engine.load_checkpoint(path, scratch=self.manager.root / CONVERT_SCRATCH)
        except (KeyboardInterrupt, SystemExit, CheckpointLoadError):
            raise
        except BaseException as exc:  # torch's CheckpointException is not an Exception
            # One line for the user, whatever went wrong (a shape the model-config check in
            # ``compat`` cannot see, e.g. in a checkpoint that does not record its config).
            raise CheckpointLoadError(f"{path} does not fit this run: {first_line(exc)}") from exc
        state.step, state.consumed_tokens = client["step"], client["consumed_tokens"]
        state.window = list(client["window"])
        # Absent from checkpoints written before they were recorded (the caller falls back).
        state.initial_val_loss = client.get("initial_val_loss")
        state.earlier_wall_s = float(client.get("wall_s", 0.0))
        guard.load_state_dict(client["guard"])
        lines = [f"resumed from {path} at step {state.step} ({state.consumed_tokens:,} tokens)"]
        if not client.get("_rank_local_restored", True):
            change = layout_change(read_meta(path).get("layout"), self.engine.layout())
            lines.append(f"layout changed since {path.name} ({change}): the RNG states start fresh")
        # Global samples consumed: the same on every rank and for any data-parallel size. Other
        # data (seed, datasets, weights) is refused by the loader with a DataError (exit 2).
        loader.load_state_dict(client["data"])
        return lines
