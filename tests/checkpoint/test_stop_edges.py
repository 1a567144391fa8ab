"""Stop signals at the edges of training, ``omnimoe-train`` in a subprocess (CPU, gloo), held at
a FIFO by ``tests/checkpoint/held_cli.py`` where the signal is to arrive:

- during the trainer's setup (its handler installed, no step yet): exit 75 at once, nothing
  saved, instead of the whole setup plus one step and a checkpoint;
- while the data is prepared (between two blocks): exit 75 at once, the partial dataset
  removed, instead of the whole preparation (hours on a large corpus) and the model build;
- once training has finished (the final checkpoint written), in a run and between the jobs of
  a local ``-m`` sweep: SIGUSR1 was its default action there (death, 138, no word).
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

import psutil
import pytest

from omnimoe_train.exit_codes import EXIT_OK, EXIT_REQUEUE
from tests.cli_helpers import cli_env, tiny
from tests.data.helpers import make_docs, write_txt_folder

TINY = tiny(data__val_fraction=None, trainer__device="cpu")
NOTHING = "before the first step: stopped, nothing new to save"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _held(where: str, fifo: Path, args: list[str], cache: Path) -> subprocess.Popen:
    os.mkfifo(fifo)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.checkpoint.held_cli", where, str(fifo), *args],
        env=cli_env(cache), stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _signal_when_held(
    proc: subprocess.Popen,
    fifo: Path,
    sig: signal.Signals,
    *,
    group: bool = False,
    while_held: Callable[[], None] | None = None,
) -> str:
    """Once ``proc`` waits at ``fifo``, call ``while_held``, send ``sig`` (``group``: to its
    whole process group, as SLURM signals every process of a job step), let it go on; its
    stderr once it exited."""
    writer = None
    try:
        deadline = time.monotonic() + 300
        while writer is None:  # opening the writing end succeeds once the process reads
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run did not reach the FIFO"
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
        if while_held is not None:
            while_held()
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        time.sleep(0.5)  # the signal lands while the process still waits
        os.close(writer)
        writer = None
        return proc.communicate(timeout=300)[1]
    finally:
        if writer is not None:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["term", "usr1"])
def test_stop_during_setup_exits_before_the_first_step(
    sig: signal.Signals, tmp_path: Path, cache: Path
) -> None:
    """A stop signal while the trainer set up (its handler installed) was acted on only after
    the first step: the whole setup, one step and a save (a checkpoint of step 1). Now every
    rank agrees before the first step and exits 75 with nothing saved."""
    run = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=50", "checkpoint.interval=1", f"hydra.run.dir={run}"]
    proc = _held("setup", tmp_path / "hold", args, cache)
    err = _signal_when_held(proc, tmp_path / "hold", sig)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    message = (
        f"received {sig.name} before the first step: stopped, nothing new to save (the newest "
        f"complete checkpoint, if any, stays); exit code 75 (to continue, run the same command "
        f"with OMNIMOE_RUN_DIR={run.resolve()})"
    )
    assert err.strip().splitlines()[-1] == f"omnimoe-train: stopped: {message}", err[-3000:]
    assert json.loads((run / "exit_status.json").read_text()) == {
        "exit_code": EXIT_REQUEUE, "message": message,
    }  # fmt: skip
    assert not list((run / "checkpoints").glob("step_*"))
    assert not (run / "metrics.jsonl").exists() and not (run / "summary.json").exists()


def test_sigterm_to_the_job_while_the_data_is_prepared_stops_between_two_blocks(
    tmp_path: Path, cache: Path
) -> None:
    """SIGTERM to every process (as ``scancel``) while the run prepared its data with two pool
    workers: the workers died of it and the run crashed (``BrokenProcessPool``, exit 1); spared
    that, it would have prepared to the end and built the model before stopping. Now the
    workers leave the signal to the run, which stops before the next block: exit 75 in one
    line, the pool gone, the partial dataset removed."""
    corpus = write_txt_folder(tmp_path / "corpus", make_docs(800, words=60))  # about 20 blocks
    data_dir, run = tmp_path / "data", tmp_path / "run"
    args = [
        *TINY, f"data.inputs=[{corpus}]", f"data.dir={data_dir}", "data.max_bytes=null",
        "data.samples_per_shard=32", "data.prepare_workers=2", "trainer.max_steps=2",
        f"hydra.run.dir={run}",
    ]  # fmt: skip
    proc = _held("preparing", tmp_path / "hold", args, cache)
    workers: list[psutil.Process] = []

    def check_preparing() -> None:
        workers.extend(
            p for p in psutil.Process(proc.pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())
        )  # fmt: skip
        assert len(workers) == 2, "the pool's workers are not there"
        assert list(data_dir.glob("train-*.tar")), "no shard written yet"

    err = _signal_when_held(
        proc, tmp_path / "hold", signal.SIGTERM, group=True, while_held=check_preparing
    )
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "omnimoe-train: stopped: received SIGTERM before the first step: stopped, nothing new "
        "to save (the newest complete checkpoint, if any, stays); "
        f"exit code 75 (to continue, run the same command with OMNIMOE_RUN_DIR={run.resolve()})"
    ), err[-3000:]
    assert "parameters per rank" not in err  # stopped before the model was built
    assert not data_dir.exists()  # the run made it: no partial dataset is left
    _, alive = psutil.wait_procs(workers, timeout=15)
    for orphan in alive:
        orphan.kill()
    assert not alive, "the pool's workers outlived the run"
    # The rerun prepares again: tests/data/test_data_cache.py (in one process, faster).


def test_usr1_to_a_waiting_rank_stops_the_preparation_on_rank_0(
    tmp_path: Path, cache: Path
) -> None:
    """Two workers under our torchrun; rank 0 prepares, SIGUSR1 to rank 1, which waits for it.
    It used to wait in a collective, deaf to the signal, through the whole preparation and the
    model build (and a preparation longer than the process group's 10-minute timeout failed it
    outright). Now it posts the request, rank 0 stops before its next block, and both exit 75,
    each saying why."""
    corpus = write_txt_folder(tmp_path / "corpus", make_docs(400, words=60))
    data_dir, run = tmp_path / "data", tmp_path / "run"
    os.mkfifo(tmp_path / "hold0")
    agent = subprocess.Popen(
        [
            sys.executable, "-m", "omnimoe_train.torchrun", "--standalone", "--nproc-per-node",
            "2", "-m", "tests.checkpoint.held_cli", "preparing", str(tmp_path / "hold{rank}"),
            *TINY, f"data.inputs=[{corpus}]", f"data.dir={data_dir}", "data.prepare_workers=1",
            "data.global_batch_size=8", "trainer.max_steps=2", f"hydra.run.dir={run}",
        ],
        env={**cli_env(cache), "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    writer = None
    try:
        deadline = time.monotonic() + 300
        while writer is None:
            assert agent.poll() is None, agent.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "rank 0 did not reach the FIFO"
            try:
                writer = os.open(tmp_path / "hold0", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
        ranks = sorted(psutil.Process(agent.pid).children(), key=lambda p: p.environ()["RANK"])
        ranks[1].send_signal(signal.SIGUSR1)
        time.sleep(1.0)  # rank 1 polls the store a few times a second
        os.close(writer)
        writer = None
        err = agent.communicate(timeout=300)[1]
    finally:
        if writer is not None:
            os.close(writer)
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == EXIT_REQUEUE, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    stops = sorted(line.split(" before the first step")[0] for line in err.splitlines()
                   if NOTHING in line)  # fmt: skip
    assert stops == [
        "omnimoe-train: stopped: another rank received a signal",
        "omnimoe-train: stopped: received SIGUSR1",
    ], err[-3000:]
    assert not data_dir.exists()


def test_stop_on_one_rank_during_setup_stops_every_rank_before_the_first_step(
    tmp_path: Path, cache: Path
) -> None:
    """Two workers under our torchrun, SIGUSR1 to one while both set up: they agree before the
    first step (one all-reduce) and both exit 75 with nothing saved, where they used to take
    one step and save it; the agent's line said "the workers saved a checkpoint"."""
    run = tmp_path / "run"
    fifos = [tmp_path / f"hold{rank}" for rank in (0, 1)]
    for fifo in fifos:
        os.mkfifo(fifo)
    env = {**cli_env(cache), "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(
        [
            sys.executable, "-m", "omnimoe_train.torchrun", "--standalone", "--nproc-per-node",
            "2", "-m", "tests.checkpoint.held_cli", "setup", str(tmp_path / "hold{rank}"),
            *TINY, "data.global_batch_size=8", "trainer.max_steps=50", "checkpoint.interval=1",
            f"hydra.run.dir={run}",
        ],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    writers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        for fifo in fifos:
            while len(writers) < fifos.index(fifo) + 1:
                assert agent.poll() is None, agent.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the workers did not reach the FIFOs"
                try:
                    writers.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    time.sleep(0.05)
        psutil.Process(agent.pid).children()[0].send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        for fd in writers:
            os.close(fd)
        writers.clear()
        err = agent.communicate(timeout=300)[1]
    finally:
        for fd in writers:
            os.close(fd)
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == EXIT_REQUEUE, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1] == (
        "omnimoe torchrun: the workers stopped before training started (exit 75): "
        "nothing was saved, the newest checkpoint, if any, stays; rerun the same command to "
        "continue"
    ), err[-3000:]
    # torch elastic's own lines about it ("Sending process N closing signal SIGTERM", "failed
    # (exitcode: 75) ...") are not repeated around the stop's lines
    assert not [x for x in lines if "closing signal" in x or "exitcode: 75" in x], err[-3000:]
    stops = sorted(line.split(" before the first step")[0] for line in lines if NOTHING in line)
    assert stops == [
        "omnimoe-train: stopped: another rank received a signal",
        "omnimoe-train: stopped: received SIGUSR1",
    ], err[-3000:]
    assert not list((run / "checkpoints").glob("step_*"))
    assert json.loads((run / "exit_status.json").read_text())["exit_code"] == EXIT_REQUEUE


def test_usr1_after_training_finished_keeps_exit_0_and_says_so(tmp_path: Path, cache: Path) -> None:
    """SIGUSR1 (SLURM's warning ahead of the time limit) once ``fit`` had returned, while the
    run wrote its summary: the default action, death with 138 and no word, though the run had
    finished and its final checkpoint was written. Now the run ends as finished, in one line."""
    run = tmp_path / "run"
    args = [*TINY, "trainer.max_steps=2", f"hydra.run.dir={run}"]
    proc = _held("after_fit", tmp_path / "hold", args, cache)
    err = _signal_when_held(proc, tmp_path / "hold", signal.SIGUSR1)
    assert proc.returncode == EXIT_OK, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "omnimoe-train: received SIGUSR1 after training finished: nothing left to stop or "
        "save, the run is complete (exit code 0)"
    ), err[-3000:]
    assert json.loads((run / "exit_status.json").read_text())["exit_code"] == EXIT_OK
    assert (run / "checkpoints" / "step_00000002" / "meta.json").is_file()
    assert json.loads((run / "summary.json").read_text())["exit_code"] == EXIT_OK


def test_usr1_between_the_jobs_of_a_local_sweep_stops_before_the_next(
    tmp_path: Path, cache: Path
) -> None:
    """A local ``-m`` sweep: SIGUSR1 once the first job's training finished killed the sweep
    (138, no word). Now the first job ends as finished and the second stops before its
    training starts (75, one line): the rerun of the sweep finds the first one complete."""
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "trainer.max_steps=2", "trainer.seed=1,2", f"hydra.sweep.dir={sweep}"]
    proc = _held("after_fit", tmp_path / "hold", args, cache)
    err = _signal_when_held(proc, tmp_path / "hold", signal.SIGUSR1)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("omnimoe-train: stopped: stop requested (SIGUSR1) before training")
    statuses = sorted(
        (json.loads(p.read_text())["exit_code"], p.parent.name)
        for p in sweep.glob("*/exit_status.json")
    )
    assert [code for code, _ in statuses] == [EXIT_OK, EXIT_REQUEUE], statuses
    second = sweep / statuses[1][1]
    assert not list((second / "checkpoints").glob("step_*"))
