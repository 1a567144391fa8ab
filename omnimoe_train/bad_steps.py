"""Which optimizer steps must not update the weights: non-finite values and loss spikes.

The verdict is computed on the host from the step's global loss and grad norm, values that every
rank holds identically (the loss comes from ``checkpoint.signals.StepSync``, the grad norm from
the optimizer, reduced over all ranks), so every rank skips the same steps without talking.

* Non-finite loss or grad norm: always skipped (no weight, optimizer-state or LR-schedule change).
* Spike: the loss is more than ``spike_zscore`` standard deviations above the mean of the last
  ``spike_window`` accepted losses (only once the window is full; downward moves never count).
  Logged; skipped only with ``skip_spikes``. A skipped loss does not enter the window.
* ``max_bad_steps`` skipped steps in a row: :attr:`StepGuard.diverged`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Verdict:
    skip: bool
    reason: str | None = None  # nonfinite_loss | nonfinite_grad_norm | loss_spike
    zscore: float | None = None


class StepGuard:
    """Bad-step bookkeeping of one run; its state is part of every checkpoint."""

    def __init__(
        self, *, spike_zscore: float, spike_window: int, skip_spikes: bool, max_bad_steps: int
    ) -> None:
        self.spike_zscore, self.skip_spikes = spike_zscore, skip_spikes
        self.max_bad_steps = max_bad_steps
        self.window: deque[float] = deque(maxlen=spike_window)
        self.skipped_steps = 0
        self.spikes = 0
        self.consecutive_bad = 0

    def _zscore(self, loss: float) -> float | None:
        if self.spike_zscore <= 0 or len(self.window) < (self.window.maxlen or 0):
            return None
        n = len(self.window)
        mean = sum(self.window) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / (n - 1))
        return (loss - mean) / std if std > 0 else None

    def check(self, loss: float, grad_norm: float) -> Verdict:
        """The verdict for one step; updates the counters and the window."""
        if not math.isfinite(loss):
            verdict = Verdict(True, "nonfinite_loss")
        elif not math.isfinite(grad_norm):
            verdict = Verdict(True, "nonfinite_grad_norm")
        else:
            z = self._zscore(loss)
            if z is not None and z > self.spike_zscore:
                self.spikes += 1
                verdict = Verdict(self.skip_spikes, "loss_spike", z)
            else:
                verdict = Verdict(False)
        if verdict.skip:
            self.skipped_steps += 1
            self.consecutive_bad += 1
        else:
            self.consecutive_bad = 0
            self.window.append(loss)
        return verdict

    @property
    def diverged(self) -> bool:
        return self.consecutive_bad >= self.max_bad_steps

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": list(self.window),
            "skipped_steps": self.skipped_steps,
            "spikes": self.spikes,
            "consecutive_bad": self.consecutive_bad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.clear()
        self.window.extend(state["window"])
        self.skipped_steps = state["skipped_steps"]
        self.spikes = state["spikes"]
        self.consecutive_bad = state["consecutive_bad"]
