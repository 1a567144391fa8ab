"""Bad-step verdicts, time limits and stop signals (one process, no model)."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from omnimoe_train.bad_steps import StepGuard
from omnimoe_train.checkpoint.signals import (
    STOP_SIGNALS,
    StartupStop,
    StepSync,
    StoppedBeforeTraining,
    StopRequest,
    parse_duration,
    startup_sigterm_paused,
)


def _guard(**kw) -> StepGuard:  # noqa: ANN003
    args = {"spike_zscore": 3.0, "spike_window": 5, "skip_spikes": False, "max_bad_steps": 2}
    return StepGuard(**{**args, **kw})


def test_non_finite_loss_or_grad_norm_is_skipped_and_counted() -> None:
    guard = _guard()
    assert guard.check(float("nan"), 1.0).reason == "nonfinite_loss"
    assert not guard.diverged
    verdict = guard.check(2.0, float("inf"))
    assert verdict.skip and verdict.reason == "nonfinite_grad_norm"
    assert guard.skipped_steps == 2 and guard.diverged  # two in a row
    assert not guard.check(2.0, 1.0).skip and guard.consecutive_bad == 0 and not guard.diverged
    assert guard.skipped_steps == 2


@pytest.mark.parametrize("skip_spikes", [False, True])
def test_spike_is_logged_and_optionally_skipped(skip_spikes: bool) -> None:
    guard = _guard(skip_spikes=skip_spikes)
    for loss in (3.0, 3.1, 2.9, 3.05, 2.95):
        assert guard.check(loss, 1.0).reason is None  # filling the window
    assert guard.check(2.0, 1.0).reason is None  # a drop is never a spike
    verdict = guard.check(9.0, 1.0)
    assert verdict.reason == "loss_spike" and verdict.zscore > 3.0
    assert verdict.skip == skip_spikes and guard.spikes == 1
    assert guard.skipped_steps == int(skip_spikes)
    # A skipped spike stays out of the window; an accepted one enters it.
    assert (9.0 in guard.window) != skip_spikes


def test_guard_state_round_trips() -> None:
    guard = _guard()
    for loss in (3.0, 3.2, float("nan"), 3.1):
        guard.check(loss, 1.0)
    other = _guard()
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == guard.state_dict()
    assert other.check(3.0, 1.0) == guard.check(3.0, 1.0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("23h30m", 84600),
        ("90m", 5400),
        ("1d2h", 93600),
        ("45s", 45),
        ("3600", 3600),
        ("23:30:00", 84600),
        ("1-00:00:10", 86410),
        ("0.5h", 1800),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "0s", "10x", "h", "-5m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="positive duration like 23h30m"):
        parse_duration(text)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_sets_the_local_flag_only(sig: signal.Signals) -> None:
    stop = StopRequest(None)
    stop.install()
    try:
        assert not stop.local()
        os.kill(os.getpid(), sig)  # delivered to the main thread before kill returns
        assert stop.local() and stop.reason() == f"received {sig.name}"
    finally:
        stop.restore()
    assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)


@pytest.fixture
def original_stop_handlers() -> Iterator[dict[int, object]]:
    """The stop signals' handlers before the test, put back after it."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        yield before
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def test_startup_sigterm_raises_until_the_trainer_takes_over_for_good(
    original_stop_handlers: dict[int, object],
) -> None:
    """The CLI's handler before training (exit 143 in one line) is replaced by the trainer's,
    whose restore puts back what was there before the CLI's, not the CLI's own."""
    before = original_stop_handlers[signal.SIGTERM]
    startup = StartupStop(lambda: Path("run-dir"))
    startup.install()
    startup.install()  # idempotent: what it replaced is still the original action
    assert startup.replaced == original_stop_handlers
    with pytest.raises(StoppedBeforeTraining) as exc:
        os.kill(os.getpid(), signal.SIGTERM)
    assert exc.value.run_dir == Path("run-dir") and exc.value.signal == signal.SIGTERM
    # Fired once: a second SIGTERM takes the previous action (the default: death).
    assert signal.getsignal(signal.SIGTERM) == before
    assert startup.hand_over() == "SIGTERM"  # else the next install acts on it: a raise
    startup.install()
    with startup_sigterm_paused():  # a blocking C++ rendezvous: the default action
        assert signal.getsignal(signal.SIGTERM) == before
    assert signal.getsignal(signal.SIGTERM) == startup._handle
    stop = StopRequest(None)
    stop.install()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.reason() == "received SIGTERM"
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before
    assert startup.hand_over() == "SIGTERM"  # left with the CLI's: training is over


def test_startup_sigusr1_raises_once_then_notes_it_for_the_trainer(
    original_stop_handlers: dict[int, object],
) -> None:
    """SIGUSR1 before training (time nearly up) was the default action: death, exit 138. Now
    it raises once (the CLI exits 75 in one line); a SIGTERM while that unwinds takes the
    previous action, a repeated SIGUSR1 is only noted, and if the raise was swallowed (a bare
    ``except:`` in an import) the trainer's handler takes the request over."""
    startup = StartupStop(lambda: None)
    startup.install()
    with pytest.raises(StoppedBeforeTraining) as exc:
        os.kill(os.getpid(), signal.SIGUSR1)
    assert exc.value.signal == signal.SIGUSR1 and exc.value.run_dir is None
    assert signal.getsignal(signal.SIGTERM) == original_stop_handlers[signal.SIGTERM]
    os.kill(os.getpid(), signal.SIGUSR1)  # noted, no second raise, no death
    stop = StopRequest(None)
    stop.install()
    assert stop.local() and stop.reason() == "received SIGUSR1"
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) == original_stop_handlers[signal.SIGTERM]
    assert signal.getsignal(signal.SIGUSR1) == startup._note  # training over: noted


def test_sigusr1_during_the_rendezvous_is_handed_to_the_trainer(
    original_stop_handlers: dict[int, object],
) -> None:
    """Inside the rendezvous other ranks may be past it: SIGUSR1 neither ends the process (its
    default action) nor raises when the call returns (this rank would leave the others waiting
    in a collective); the trainer's handler, installed next, stops every rank together."""
    startup = StartupStop(lambda: None)
    startup.install()
    with startup_sigterm_paused():
        assert signal.getsignal(signal.SIGTERM) == original_stop_handlers[signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGUSR1)
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == dict.fromkeys(
        STOP_SIGNALS, startup._handle
    )
    stop = StopRequest(None)
    stop.install()
    assert stop.reason() == "received SIGUSR1"
    assert startup.hand_over() is None  # taken over: the trainer acts on it
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) == original_stop_handlers[signal.SIGTERM]
    assert signal.getsignal(signal.SIGUSR1) == startup._note


def test_stop_after_training_is_noted_and_stops_the_next_job_before_training(
    original_stop_handlers: dict[int, object],
) -> None:
    """Once the trainer's handler is gone (training finished), SIGUSR1 took its default action:
    death, 138, no word, with the run finished (it wrote its summary) or a local ``-m`` sweep
    between jobs. Now the CLI's handler notes it, as it does one the trainer received in its
    last step; the CLI says so at its end (exit 0), or the sweep's next job, installing the
    CLI's handler again, stops before its training."""
    startup = StartupStop(lambda: Path("job-2"))
    startup.install()
    stop = StopRequest(None)
    stop.install()
    stop.restore()  # training finished, no signal
    assert startup.hand_over() is None
    os.kill(os.getpid(), signal.SIGUSR1)  # while the run writes its summary: noted
    assert startup.noted == "SIGUSR1"
    with pytest.raises(StoppedBeforeTraining) as exc:
        startup.install()  # the next job of the sweep
    assert exc.value.signal == signal.SIGUSR1 and exc.value.run_dir == Path("job-2")
    assert signal.getsignal(signal.SIGTERM) == original_stop_handlers[signal.SIGTERM]

    last_step = StartupStop(lambda: None)
    last_step.install()
    stop = StopRequest(None)
    stop.install()
    os.kill(os.getpid(), signal.SIGUSR1)  # during the last step: training finishes anyway
    stop.restore()
    assert last_step.hand_over() == "SIGUSR1"


def test_startup_sigterm_paused_changes_nothing_without_it() -> None:
    stop = StopRequest(None)
    stop.install()
    try:
        with startup_sigterm_paused():  # the trainer's handler (or a library's) stays
            assert signal.getsignal(signal.SIGTERM) == stop._handle
    finally:
        stop.restore()


def test_time_limit() -> None:
    assert StopRequest(3600.0).local() is False
    assert StopRequest(10.0, started=-1e9).time_is_up()


def test_step_sync_without_a_process_group() -> None:
    sync = StepSync(torch.device("cpu"))
    sync.start(torch.tensor([6.0, 3.0], dtype=torch.float64), stop=True)
    loss_sum, tokens, stop = sync.result()
    assert (loss_sum, tokens, stop) == (6.0, 3.0, True)
    sync.start(torch.tensor([float("nan"), 3.0], dtype=torch.float64), stop=False)
    loss_sum, _, stop = sync.result()
    assert math.isnan(loss_sum) and not stop
