"""Stopping early, cleanly and together: SIGTERM/SIGUSR1, ``trainer.max_time``, and the per-step
agreement that makes every rank stop at the same step.

A scheduler (SLURM sends SIGTERM before a time limit or a preemption, or SIGUSR1 with
``--signal``) may signal only some ranks, or signal them a moment apart; and each rank's clock
reads the time limit a moment apart. So a rank never acts on its own flag: each step,
:class:`StepSync` all-reduces ``[loss sum, token count, stop flag]`` over the whole world, and
every rank reads the same sum. The trainer then finishes that step, saves and exits with
:data:`~omnimoe_train.exit_codes.EXIT_REQUEUE` (75).

No extra host synchronisation on the GPU: the all-reduce is issued right after the backward
pass and copied into pinned host memory without blocking; the trainer reads it only after the
optimizer's grad-norm computation, which already waits on the host for a value the GPU computes
after that all-reduce. By then the copy has landed and reading it costs nothing. The same value
gives the trainer the global loss of every step (for the bad-step checks) for free.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used: config validation needs parse_duration fast
    import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)([dhms]))+$")
_TERM = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_CLOCK = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2}):(\d{2})$")


def parse_duration(text: str) -> float:
    """Seconds in ``23h30m``, ``90m``, ``1d2h``, ``45s``, ``3600`` or SLURM's ``[D-]HH:MM:SS``.

    Raises ``ValueError`` (message: the accepted forms) for anything else or a zero duration.
    """
    value = str(text).strip().lower().replace(" ", "")
    seconds: float | None = None
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        seconds = float(value)
    elif _DURATION.match(value):
        seconds = sum(float(n) * _UNITS[u] for n, u in _TERM.findall(value))
    elif clock := _CLOCK.match(value):
        days, hours, minutes, secs = (int(g or 0) for g in clock.groups())
        seconds = float(((days * 24 + hours) * 60 + minutes) * 60 + secs)
    if seconds is None or seconds <= 0:
        raise ValueError(
            f"must be a positive duration like 23h30m, 90m, 1d2h, 3600s or 23:30:00 (got {text!r})"
        )
    return seconds


class StopRequest:
    """This rank's wish to stop: a stop signal was received, or the time budget is used up.

    The handler only records the signal (async-signal-safe); the loop reads :meth:`local`.
    """

    def __init__(self, max_time_s: float | None, started: float | None = None) -> None:
        self.max_time_s = max_time_s
        self.started = time.monotonic() if started is None else started
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._startup: StartupStop | None = None

    def install(self) -> None:
        """Handle the stop signals from now on; :meth:`restore` puts back what was there before
        (before the CLI's :class:`StartupStop`, which this replaces for good). A stop signal
        that one noted without acting on it is taken over: it is this rank's request now."""
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._handle)
            owner = _startup_handler(previous)
            self._previous[sig] = owner.replaced[sig] if owner is not None else previous
            self._startup = self._startup or owner
        if self._startup is not None and (noted := self._startup.hand_over()) is not None:
            self.signal_name = noted

    def restore(self) -> None:
        """Put back what was there before :meth:`install`. Where that was the CLI's
        :class:`StartupStop`, SIGUSR1 is then only noted by it, and so is the stop signal this
        one received (if any): training is over (finished, or stopped and exiting). SIGUSR1's
        default action would end a finished run with 138 and no word, e.g. while it writes its
        summary or between the jobs of a local ``-m`` sweep; the CLI says the note in one line
        at its end (exit 0), or the next job of the sweep stops before its training
        (:meth:`StartupStop.install`). SIGTERM gets its previous action back: ending now loses
        nothing, the checkpoints are written by then (and torchrun's agent SIGTERMs the workers
        that are left once one exited)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if (startup := self._startup) is not None:
            self._startup = None
            signal.signal(signal.SIGUSR1, startup._note)
            startup.noted = self.signal_name or startup.noted

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.signal_name = signal.Signals(signum).name

    def time_is_up(self) -> bool:
        return self.max_time_s is not None and time.monotonic() - self.started >= self.max_time_s

    def local(self) -> bool:
        return self.signal_name is not None or self.time_is_up()

    def reason(self) -> str:
        if self.signal_name is not None:
            return f"received {self.signal_name}"
        if self.time_is_up():
            return f"trainer.max_time ({self.max_time_s:.0f} s) is used up"
        return "another rank received a stop signal or reached trainer.max_time"


class StoppedBeforeTraining(BaseException):
    """A stop signal arrived before training started (see :class:`StartupStop`); ``signal``:
    which (SIGTERM or SIGUSR1), ``run_dir``: the run directory chosen by then, or None.

    A ``BaseException``, as ``KeyboardInterrupt`` is: the ``except Exception`` of the config
    checks and of Hydra's job runner must not turn it into a usage error or a traceback.
    """

    def __init__(self, signum: int, run_dir: Path | None) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(f"{self.signal.name} before training started")
        self.run_dir = run_dir


class StartupStop:
    """SIGTERM and SIGUSR1 from the CLI's start until the trainer's :class:`StopRequest` takes
    over.

    Before, either took its default action in a run's first seconds (imports, config
    composition, process groups): SIGTERM (``scancel``, a preemption) exit 143, SIGUSR1 (SLURM's
    ``--signal`` ahead of the time limit, which the launchers pass on) exit 138, with no word
    and no ``exit_status.json``, and a launcher keyed on 75 did not requeue. There is nothing to
    save yet, so the handler does not wait for a step as the trainer's does: it raises
    :class:`StoppedBeforeTraining` in the main thread, where the CLI says so in one line and
    exits (``run.stopped_before_training``): 143 for SIGTERM, 75 (requeue) for SIGUSR1.
    ``run_dir``: the run directory chosen so far (None before there is one), asked at the
    signal.

    It acts once. Then SIGTERM's previous action is back: a SIGTERM while the stop unwinds ends
    the process at once (torchrun's agent SIGTERMs the other workers once one has exited, and
    leaves those it ended so out of its exit status). A SIGUSR1 is only noted from then on: it
    repeats the request (the launcher and slurmstepd may both send it), and its default action
    would end the process with 138. A signal noted and not acted on (see
    :func:`startup_sigterm_paused`, or a library's bare ``except:`` that swallowed the raise)
    is taken over by the trainer's :class:`StopRequest` when it installs, or acted on by the
    next :meth:`install`. Once training is over, :meth:`StopRequest.restore` leaves SIGUSR1
    noted here again (with the stop signal the trainer received, if any): the CLI says it in
    one line at its end, or the next job of a local ``-m`` sweep stops before its training.
    """

    def __init__(self, run_dir: Callable[[], Path | None]) -> None:
        self.run_dir = run_dir
        self.replaced: dict[int, Any] = dict.fromkeys(STOP_SIGNALS, signal.SIG_DFL)
        self.noted: str | None = None  # the last stop signal received, until handed over

    def install(self) -> None:
        """Idempotent; installs it again after a trainer's :meth:`StopRequest.restore` (the
        next job of a ``-m`` sweep). A stop signal noted and not acted on (one that came after
        the previous job's training, or a raise that was swallowed) is acted on now: raises
        :class:`StoppedBeforeTraining`."""
        for sig in STOP_SIGNALS:
            current = signal.signal(sig, self._handle)
            if _startup_handler(current) is not self:
                self.replaced[sig] = current
        if self.noted is not None:
            self._handle(signal.Signals[self.noted], None)

    def hand_over(self) -> str | None:
        """The stop signal noted and not acted on (None if none), forgotten here: the caller
        (the trainer's :class:`StopRequest`) acts on it."""
        noted, self.noted = self.noted, None
        return noted

    def _note(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.noted = signal.Signals(signum).name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._note(signum, frame)
        signal.signal(signal.SIGTERM, self.replaced[signal.SIGTERM])
        signal.signal(signal.SIGUSR1, self._note)
        try:
            run_dir = self.run_dir()
        except Exception:  # noqa: BLE001 - the one line matters more than the folder
            run_dir = None
        raise StoppedBeforeTraining(signum, run_dir)


def _startup_handler(handler: Any) -> StartupStop | None:
    """The :class:`StartupStop` whose bound method ``handler`` is, else None."""
    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, StartupStop) else None


@contextmanager
def startup_sigterm_paused() -> Iterator[None]:
    """Where :class:`StartupStop` is installed, for the duration: SIGTERM's default action, and
    SIGUSR1 noted for the trainer's :class:`StopRequest` (else nothing changes).

    For C++ calls that block until other processes come (the process-group rendezvous waits
    for every rank, up to its timeout): Python runs a signal handler only once such a call
    returns, so the handler would keep a SIGTERMed process waiting for ranks that may never
    come. The default action ends it at once (silently, exit 143, as before the handler).
    SIGUSR1 asks for a stop, not an end (its default action, exit 138, would lose the
    requeue); once this rank is in the rendezvous the others may be past it, and a rank that
    left alone would keep them waiting in their next collective. So it is noted, and the
    trainer's handler, installed right after, takes it over: every rank stops after the same
    step. A rank still waiting for one that stopped before the rendezvous is ended by the
    launcher's SIGTERM (torchrun's agent sends it once a worker has exited).
    """
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    startup = next(filter(None, map(_startup_handler, handlers.values())), None)
    if startup is None:
        yield
        return
    signal.signal(signal.SIGTERM, startup.replaced[signal.SIGTERM])
    signal.signal(signal.SIGUSR1, startup._note)
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class StepSync:
    """One world all-reduce per step of ``[loss sum, token count, stop flag]`` (module docstring).

    ``start`` after the backward pass, ``result`` after the grad norm has been read on the host.
    The loss sum counts each tensor-parallel copy of the last stage's loss, and so does the
    token count: their ratio is the global mean loss.
    """

    def __init__(self, device: torch.device) -> None:
        import torch

        self.device = device
        self._buf = torch.zeros(3, dtype=torch.float64, device=device)
        cuda = device.type == "cuda"
        self._host = torch.zeros(3, dtype=torch.float64, pin_memory=cuda)
        self._event = torch.cuda.Event() if cuda else None

    def start(self, loss_total: torch.Tensor, stop: bool) -> None:
        import torch.distributed as dist

        self._buf[:2].copy_(loss_total)
        self._buf[2].fill_(1.0 if stop else 0.0)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self._buf)
        self._host.copy_(self._buf, non_blocking=True)
        if self._event is not None:
            self._event.record()

    def result(self) -> tuple[float, float, bool]:
        """(loss sum, token count, stop) summed over the world; identical on every rank."""
        if self._event is not None:
            self._event.synchronize()  # already complete: see the module docstring
        loss_sum, count, stop = self._host.tolist()
        return loss_sum, count, stop > 0
