"""``omnimoe-train`` as a user runs it, when things go wrong (subprocesses, CPU, gloo).

- kill -9 after the first checkpoint, rerun the same command: the loss trajectory is bitwise
  that of an uninterrupted run, and the rerun resumed (not restarted); then one file of the
  newest checkpoint is truncated and the same command falls back to the previous one.
- SIGTERM to one of two ranks during training: both finish the step, save and exit 75; one
  process (another world size) then finishes the run from there.
- SIGTERM to the whole job, DataLoader workers included (as SLURM signals a job step): the
  same clean stop, the workers ended.
- ``trainer.max_time``: exit 75 with a checkpoint, and the next run continues.
- Injected NaN losses: skipped without touching weights or optimizer state; two in a row stop
  the run with exit 65 and a checkpoint of the last good weights.
- A full disk while writing a checkpoint: exit 74 with one line; the previous one stays newest.
- Ctrl-C (SIGINT): exit 130 at once with one line, no checkpoint; the newest complete one stays.
- SIGTERM or SIGUSR1 before the trainer's handler is installed, also while the config is
  checked: exit 143 or 75 (requeue) at once with one line, ``exit_status.json`` replaced.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from omnimoe_train.exit_codes import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_IO_ERROR,
    EXIT_REQUEUE,
    EXIT_TERMINATED,
)
from tests.cli_helpers import cli_env, run_train_cli, tiny
from tests.parallel.distributed import find_free_port

TINY = tiny(
    model__num_attention_heads=4,
    data__vocab_size=512,
    data__max_bytes=300000,
    data__global_batch_size=8,
    data__val_fraction=None,
    optim__warmup_steps=2,
    trainer__log_interval=4,
    trainer__eval_interval=24,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "omnimoe_train.cli", *args]


def records(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # the half-written last line of a killed run
            continue
    return out


def trajectory(run_dir: Path) -> dict[tuple[int, str], float]:
    """Last logged loss, grad norm, lr and val_loss per step (a resumed step supersedes)."""
    out: dict[tuple[int, str], float] = {}
    for r in records(run_dir):
        for key in ("loss", "grad_norm", "lr", "val_loss"):
            if key in r and "bad_step" not in r:
                out[(r["step"], key)] = r[key]
    return out


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def _tensors(folder: Path, out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, global shapes (torch's DCP converter, no process group)."""
    dcp_to_torch_save(folder, out)
    return {k: v for k, v in torch.load(out).items() if isinstance(v, torch.Tensor)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_9_and_rerun_is_bitwise_and_falls_back_past_a_truncated_file(
    tmp_path: Path, cache: Path
) -> None:
    args = [*TINY, "trainer.max_steps=48", "checkpoint.interval=4", "checkpoint.keep=2"]
    ref, run = tmp_path / "uninterrupted", tmp_path / "killed"
    done = run_train_cli([*args, f"hydra.run.dir={ref}"], cache=cache)
    assert done.returncode == 0, done.stderr[-3000:]

    command = _cmd(*args, f"hydra.run.dir={run}")
    proc = subprocess.Popen(command, env=cli_env(cache), stderr=subprocess.DEVNULL)
    _wait_for(run / "checkpoints" / "step_00000004", proc)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in records(run))
    assert killed_at < 48

    rerun = subprocess.run(command, env=cli_env(cache), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr
    resumes = [r for r in records(run) if "resumed_from" in r]
    assert len(resumes) == 1 and 4 <= resumes[0]["step"] <= killed_at  # resumed, ...
    initial_evals = [r for r in records(run) if r["step"] == 0 and "val_loss" in r]
    assert len(initial_evals) == 1  # ... not restarted from step 0
    expected = trajectory(ref)
    assert trajectory(run) == expected  # bitwise: floats compared with ==

    # Truncate the largest file of the newest checkpoint: the same command falls back.
    newest = run / "checkpoints" / "step_00000048"
    victim = max((p for p in newest.iterdir() if p.name != "meta.json"), key=os.path.getsize)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    again = subprocess.run(command, env=cli_env(cache), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    warnings = [line for line in again.stderr.splitlines() if "is not usable" in line]
    assert len(warnings) == 1
    assert f"step_00000048 is not usable: {victim.name} is truncated" in warnings[0]
    assert "falling back to step_00000044" in warnings[0]
    assert [r["resumed_from"] for r in records(run) if "resumed_from" in r][-1] == "step_00000044"
    assert trajectory(run) == expected


def test_injected_nan_is_skipped_and_repeated_ones_stop_the_run(
    tmp_path: Path, cache: Path
) -> None:
    run = tmp_path / "run"
    args = [
        *TINY,
        "trainer.max_steps=8",
        "trainer.log_interval=1",
        "trainer.max_bad_steps=2",
        "trainer.nan_loss_steps=[3,5,6]",
        "checkpoint.interval=1",
        "checkpoint.keep=10",
        f"hydra.run.dir={run}",
    ]
    result = run_train_cli(args, cache=cache)
    assert result.returncode == EXIT_DIVERGED, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "omnimoe-train: error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "training diverged: 2 bad steps in a row" in errors[0]
    assert "step_00000006" in errors[0]
    # The console: a bad step's loss reads nan, a window of skipped steps only n/a (was None).
    steps = [line for line in result.stderr.splitlines() if "] step " in line]
    assert not any("loss None" in line for line in steps), steps
    assert [line.split("  loss ")[1].split()[0] for line in steps if "bad_step" in line] == [
        "nan"
    ] * 3
    windows = {int(ln.split("] step ")[1].split()[0]): ln for ln in steps if "  lr " in ln}
    assert all("  loss n/a  " in windows[step] for step in (3, 5, 6)), windows

    recs = records(run)
    bad = [(r["step"], r["bad_step"], r["skipped"]) for r in recs if "bad_step" in r]
    assert bad == [
        (3, "nonfinite_loss", True),
        (5, "nonfinite_loss", True),
        (6, "nonfinite_loss", True),
    ]
    skipped = {r["step"]: r["skipped_steps"] for r in recs if "loss" in r and "bad_step" not in r}
    assert skipped[2] == 0 and skipped[4] == 1

    ckpts = run / "checkpoints"
    state = {s: _tensors(ckpts / f"step_{s:08d}", tmp_path / f"{s}.pt") for s in (2, 3, 4, 6)}
    assert _equal(state[3], state[2])  # the NaN step changed no weight and no Adam moment
    assert not _equal(state[4], state[3])  # a good step does
    assert _equal(state[6], state[4])  # the saved weights are the last good ones


def test_max_time_stops_with_75_and_the_next_run_continues(tmp_path: Path, cache: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=6", "trainer.max_time=0.001s", f"hydra.run.dir={run}"]
    for attempt in (1, 2):
        result = run_train_cli(args, cache=cache)
        assert result.returncode == EXIT_REQUEUE, result.stderr[-3000:]
        stops = [line for line in result.stderr.splitlines() if "omnimoe-train: stopped:" in line]
        assert len(stops) == 1 and "trainer.max_time" in stops[0], result.stderr[-3000:]
        assert f"stopped after step {attempt}" in stops[0] and "exit code 75" in stops[0]
        assert (run / "checkpoints" / f"step_{attempt:08d}" / "meta.json").is_file()
        status = json.loads((run / "exit_status.json").read_text())
        assert status["exit_code"] == EXIT_REQUEUE and status["message"] in stops[0]
    assert [r["resumed_from"] for r in records(run) if "resumed_from" in r] == ["step_00000001"]


@pytest.mark.parametrize(
    ("helper", "extra"),
    [
        ("tests.checkpoint.full_disk", []),  # Python's OSError(ENOSPC)
        # The kernel's ENOSPC (/dev/full) through torch's C++ serializer, which said only
        # "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"; and megatron's
        # asynchronous writer, which said "Worker failure: ... <class 'OSError'>".
        ("tests.checkpoint.dev_full_disk", ["trainer.engine=deepspeed"]),
        ("tests.checkpoint.dev_full_disk", ["checkpoint.async_save=true"]),
        # A full disk quota (EDQUOT) through the same two writers, which drop the errno: it
        # used to be their own words, the file system having room.
        ("tests.checkpoint.dev_full_disk --quota", ["trainer.engine=deepspeed"]),
        ("tests.checkpoint.dev_full_disk --quota", ["checkpoint.async_save=true"]),
    ],
)
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(
    helper: str, extra: list[str], tmp_path: Path, cache: Path
) -> None:
    run = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=12", "checkpoint.interval=4", f"hydra.run.dir={run}", *extra]
    cmd = [sys.executable, "-m", *helper.split(), "step_00000008", *args]
    result = subprocess.run(cmd, env=cli_env(cache), capture_output=True, text=True, timeout=600)
    assert result.returncode == EXIT_IO_ERROR, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "omnimoe-train: error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    full = (
        "the disk quota is exceeded while writing checkpoint step_00000008 to "
        f"{run / 'checkpoints'}; free space within the quota (or have it raised) and"
        if "--quota" in helper
        else "the disk is full while writing checkpoint step_00000008 to "
        f"{run / 'checkpoints'}; free space and"
    )
    assert errors[0] == (
        f"omnimoe-train: error: checkpoint.dir: {full} run the same command again (the newest "
        "complete checkpoint, if any, stays)"
    )
    assert json.loads((run / "exit_status.json").read_text())["exit_code"] == EXIT_IO_ERROR
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004"]
    assert (ckpts / "latest").read_text() == "step_00000004\n"


def _start_rank(rank: int, port: int, run: Path, cache: Path, args: list[str]) -> subprocess.Popen:
    env = {
        **cli_env(cache),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMNIMOE_RUN_DIR": str(run),
    }
    return subprocess.Popen(_cmd(*args), env=env, stderr=subprocess.PIPE, text=True)


def _two_ranks_sigterm_one(run: Path, cache: Path, args: list[str], after: Path):  # noqa: ANN202
    port = find_free_port()
    procs = [_start_rank(r, port, run, cache, args) for r in (0, 1)]
    _wait_for(after, procs[1])
    procs[1].send_signal(signal.SIGTERM)  # one rank only: the other must stop with it
    errs = [p.communicate(timeout=600)[1] for p in procs]
    return [p.returncode for p in procs], errs


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_both_at_one_step_with_a_checkpoint(
    tmp_path: Path, cache: Path
) -> None:
    run = tmp_path / "run"
    args = [*TINY, "parallel=ep2_rows", "trainer.max_steps=60", "checkpoint.interval=4"]
    codes, errs = _two_ranks_sigterm_one(run, cache, args, run / "checkpoints" / "step_00000004")
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], errs[0][-3000:] + errs[1][-3000:]
    stops = [line for line in errs[0].splitlines() if "omnimoe-train: stopped:" in line]
    assert len(stops) == 1 and "exit code 75" in stops[0]
    step = int(stops[0].split("stopped after step ")[1].split(",")[0])
    assert 4 <= step < 60
    newest = sorted(p.name for p in (run / "checkpoints").glob("step_*"))[-1]
    assert newest == f"step_{step:08d}"  # one save, collective: both ranks stopped there
    meta = json.loads((run / "checkpoints" / newest / "meta.json").read_text())
    assert meta["step"] == step and meta["layout"]["world_size"] == 2

    # Continue on one process instead of two (another world size, ep 1): resharded model and
    # optimizer, the data position carried over (global samples), a fresh RNG said in one line.
    single = [*TINY, "trainer.max_steps=60", "checkpoint.interval=4", f"hydra.run.dir={run}"]
    rest = run_train_cli(single, cache=cache)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "layout changed" in rest.stderr and "the RNG states start fresh" in rest.stderr
    assert [r["resumed_from"] for r in records(run) if "resumed_from" in r] == [newest]
    train = [r for r in records(run) if "loss" in r and "bad_step" not in r]
    assert train[-1]["step"] == 60 and train[-1]["consumed_tokens"] == 60 * 8 * 32


@pytest.mark.slow
def test_sigterm_to_the_whole_job_with_data_workers_stops_with_a_checkpoint(
    tmp_path: Path, cache: Path
) -> None:
    """SLURM signals every process of a job step, the data loader's workers included: they
    must not die of it (the main process would then fail on its next batch instead of saving)."""
    run = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=400", "checkpoint.interval=4", "data.num_workers=2"]
    args.append(f"hydra.run.dir={run}")
    proc = subprocess.Popen(
        _cmd(*args), env=cli_env(cache), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _wait_for(run / "checkpoints" / "step_00000004", proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as scancel / a time limit does: the whole group
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    stops = [line for line in err.splitlines() if "omnimoe-train: stopped:" in line]
    assert len(stops) == 1, err[-3000:]
    step = int(stops[0].split("stopped after step ")[1].split(",")[0])
    assert (run / "checkpoints" / f"step_{step:08d}").is_dir()
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # no worker outlived the run
        os.killpg(proc.pid, 0)


def test_ctrl_c_stops_at_once_in_one_line_and_keeps_the_checkpoints(
    tmp_path: Path, cache: Path
) -> None:
    """Was a KeyboardInterrupt traceback (from wherever the step was, each line prefixed
    ``[rank0]:``) and no ``exit_status.json``."""
    run = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=400", "checkpoint.interval=4", f"hydra.run.dir={run}"]
    # A job started in the background by a non-interactive shell (``nohup ... &``, some CI
    # harnesses) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    # handler: the child gets the default disposition back, as an interactive run has it.
    proc = subprocess.Popen(
        _cmd(*args), env=cli_env(cache), stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    _wait_for(run / "checkpoints" / "step_00000004", proc)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    line = (
        "interrupted (SIGINT): stopped at once, without saving a checkpoint (the newest "
        "complete one stays; SIGTERM or SIGUSR1 save first)"
    )
    assert err.strip().splitlines()[-1] == f"omnimoe-train: stopped: {line}"
    status = json.loads((run / "exit_status.json").read_text())
    assert status == {"exit_code": EXIT_INTERRUPTED, "message": line}
    assert (run / "checkpoints" / "step_00000004" / "meta.json").is_file()


SIGTERM_BEFORE_TRAINING = (
    "terminated (SIGTERM) before training started: stopped at once, nothing was saved (the "
    "newest complete checkpoint, if any, stays)"
)
SIGUSR1_BEFORE_TRAINING = (
    "stop requested (SIGUSR1) before training started: stopped at once, nothing was saved (the "
    "newest complete checkpoint, if any, stays); exit code 75 (to continue, run the same "
    "command with OMNIMOE_RUN_DIR={run})"
)
BEFORE_TRAINING = {
    signal.SIGTERM: (EXIT_TERMINATED, SIGTERM_BEFORE_TRAINING),
    signal.SIGUSR1: (EXIT_REQUEUE, SIGUSR1_BEFORE_TRAINING),
}


def _stop_before_training(
    proc: subprocess.Popen, ready: Callable[[], object], sig: signal.Signals, run: Path
) -> None:
    """Once ``ready()`` returns, send ``sig``; check the one line, the exit code and ``run``'s
    ``exit_status.json``."""
    try:
        ready()
        proc.send_signal(sig)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    code, message = BEFORE_TRAINING[sig]
    message = message.format(run=run.resolve())
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines() == [f"omnimoe-train: stopped: {message}"]
    status = json.loads((run / "exit_status.json").read_text())
    assert status == {"exit_code": code, "message": message}
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["term", "usr1"])
def test_stop_signal_before_training_starts_is_one_line_and_its_exit_code(
    sig: signal.Signals, tmp_path: Path, cache: Path
) -> None:
    """scancel or a preemption (SIGTERM), or SLURM's signal ahead of the time limit (SIGUSR1,
    which the launchers pass on), in a run's first seconds (imports, config, process groups),
    before the trainer's handler is installed, killed the process with no word and no
    ``exit_status.json``: exit 143, or 138 and no requeue. Now 143, or 75 to requeue."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    # Hydra writes .hydra/config.yaml, then .hydra/hydra.yaml, before it calls the training
    # function: a FIFO no one reads holds the process there, before any trainer work, until
    # the signal (an open() interrupted by a signal runs the handler and propagates what it
    # raises, PEP 475). The stale exit status of an earlier process must not survive either.
    os.mkfifo(run / ".hydra" / "hydra.yaml")
    (run / "exit_status.json").write_text('{"exit_code": 0, "message": "earlier"}')
    proc = subprocess.Popen(
        _cmd(*TINY, "trainer.max_steps=4", f"hydra.run.dir={run}"),
        env=cli_env(cache),
        stderr=subprocess.PIPE,
        text=True,
    )
    _stop_before_training(
        proc, lambda: _wait_for(run / ".hydra" / "config.yaml", proc, timeout=120), sig, run
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["term", "usr1"])
def test_stop_signal_during_the_config_checks_replaces_an_earlier_exit_status(
    sig: signal.Signals, tmp_path: Path, cache: Path
) -> None:
    """A rerun in a run directory (here ``OMNIMOE_RUN_DIR``) stopped while its config is
    checked, before Hydra has taken the directory: the earlier run's ``exit_status.json``
    stayed and read as this run's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "exit_status.json").write_text('{"exit_code": 0, "message": "finished"}')
    # The checks read a given tokenizer: a FIFO holds them there until the signal.
    fifo = tmp_path / "tokenizer.json"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        _cmd(*TINY, f"data.tokenizer={fifo}"),
        env={**cli_env(cache), "OMNIMOE_RUN_DIR": str(run)},
        stderr=subprocess.PIPE,
        text=True,
    )
    writer: list[int] = []

    def reading() -> None:  # opening the writing end succeeds once the process reads
        deadline = time.monotonic() + 120
        while not writer:
            assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
            try:
                writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                time.sleep(0.02)

    try:
        _stop_before_training(proc, reading, sig, run)
    finally:
        for fd in writer:
            os.close(fd)
    assert sorted(p.name for p in run.iterdir()) == ["exit_status.json"]


def test_the_cli_module_imports_no_torch() -> None:
    """``main`` installs that SIGTERM handler first, and a usage error's one line needs no torch:
    importing the CLI module imported torch (through ``validation``'s DeepSpeed key check and
    the ``engine`` package), a few seconds in which SIGTERM still killed without a word."""
    code = "import sys, omnimoe_train.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout
