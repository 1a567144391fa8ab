"""``omnimoe_data.workers.ordered_map``'s worker processes end with the process that started
them: a ``kill -9`` of a preparing trainer (or ``omnimoe-data prepare``) leaves no orphans, and
a SIGTERM to ``omnimoe-data prepare`` ends it in one line, its workers with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from omnimoe_data.prepare import prepare

from .helpers import TINY, make_docs, write_txt_folder

# Two workers that sleep far longer than the test: only their parent's death can end them.
_PREPARING = """
import time
from omnimoe_data.workers import ordered_map
for _ in ordered_map(time.sleep, [(600,), (600,), (600,)], 2):
    pass
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PREPARING])
    try:
        deadline = time.monotonic() + 60
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline:
            # The pool's workers run python -c "from multiprocessing.spawn import ..." (the
            # resource tracker, also a child, exits by itself once they are gone).
            workers = [
                p
                for p in psutil.Process(parent.pid).children(recursive=True)
                if "spawn_main" in " ".join(p.cmdline())
            ]
            if len(workers) == 2:
                break
            time.sleep(0.2)
        assert len(workers) == 2, "the pool did not start its workers"
        time.sleep(1.0)  # the workers are past their initializer, sleeping in a task
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    _, alive = psutil.wait_procs(workers, timeout=15)
    for orphan in alive:
        orphan.kill()
    assert not alive, f"{len(alive)} worker(s) outlived the killed parent"


REPO = Path(__file__).resolve().parents[2]

# The parent's own SIGTERM handler counts; a thread sends SIGTERM to the whole process group
# (as scancel does) every 2 ms while the pool starts and works.
_SIGNALLED_WHILE_STARTING = f"""
import os, signal, sys, threading, time
sys.path.insert(0, {str(REPO)!r})
from omnimoe_data.workers import ordered_map
from tests.data.worker_tasks import sleep_or_die
received = []
signal.signal(signal.SIGTERM, lambda *_: received.append(1))
done = threading.Event()
def burst():
    while not done.is_set():
        os.killpg(0, signal.SIGTERM)
        time.sleep(0.002)
threading.Thread(target=burst, daemon=True).start()
out = list(ordered_map(sleep_or_die, [(0.05,)] * 12, 2))
done.set()
print(len(out), bool(received))
"""

# One worker is SIGKILLed (an OOM kill) while the other works: the pool is broken.
_WORKER_KILLED = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from concurrent.futures.process import BrokenProcessPool
from omnimoe_data.workers import ordered_map
from tests.data.worker_tasks import sleep_or_die
try:
    for _ in ordered_map(sleep_or_die, [(2.0,), (-1.0,), (2.0,), (2.0,)], 2):
        pass
except BrokenProcessPool:
    print("broken")
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_stop_signals_while_the_workers_start_do_not_kill_them() -> None:
    """A worker ignores SIGTERM from its initializer on; one that came earlier, while it was
    still importing, killed it (then the pool broke, and its shutdown hung). The parent blocks
    the stop signals while it starts workers, which inherit the mask."""
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNALLED_WHILE_STARTING], capture_output=True, text=True,
        timeout=120, start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["12", "True"], proc.stdout + proc.stderr[-2000:]


def test_a_killed_worker_breaks_the_map_instead_of_hanging_it() -> None:
    """CPython ends a broken pool's other workers with SIGTERM, which ours ignore, and joins
    them without a timeout: the map waited for good. Now they are SIGKILLed."""
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER_KILLED], capture_output=True, text=True, timeout=60,
        start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "broken", proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [
        (signal.SIGTERM, 143, "omnimoe-data: terminated (SIGTERM): stopped,"),
        (signal.SIGUSR1, 75, "omnimoe-data: stop signal (SIGUSR1): stopped,"),
    ],
)
def test_stop_signal_stops_prepare_in_one_line_and_publishes_nothing(
    sig: signal.Signals, code: int, line: str, tmp_path: Path
) -> None:
    """SIGTERM (or SIGUSR1, SLURM's warning before a time limit) to ``omnimoe-data prepare``
    and its pool (every process, as ``scancel`` sends it) while it encodes: it used to die of
    the default action, exit 143 (138) without a word (a resource-tracker warning instead), its
    half-written shards left for the next run to clear. Now: one line, exit 143 (75: rerun), the
    workers gone, the folder it made removed. Under SIGUSR1 multiprocessing's resource tracker
    (which ignores only SIGINT and SIGTERM) must live on: it was killed, and the stop printed
    its warnings."""
    tokenizer = prepare(
        [write_txt_folder(tmp_path / "small", make_docs(60))], tmp_path / "tok", progress=False,
        **TINY,
    ).manifest_path.parent / "tokenizer.json"  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "omnimoe_data.cli", "prepare", "--out", str(out),
            "--tokenizer", str(tokenizer), "--seq-len", "16", "--samples-per-shard", "64",
            "--block-bytes", "100000", "--max-bytes", "40000000", "--workers", "2",
            "--no-progress",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not any(out.glob("train-*.tar")):  # the stdlib corpus (40 MB) is being encoded
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no shard written"
            time.sleep(0.01)
        workers = [
            p for p in psutil.Process(proc.pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())
        ]  # fmt: skip
        os.killpg(proc.pid, sig)
        started = time.monotonic()
        err = proc.communicate(timeout=60)[1]
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err[-3000:]
    assert err.strip().splitlines() == [
        f"{line} nothing unfinished was published (what was half-written is removed); run the "
        "same command again"
    ], err[-3000:]
    assert took < 20, f"took {took:.1f} s to stop"
    assert not out.exists()
    _, alive = psutil.wait_procs(workers, timeout=15)
    for orphan in alive:
        orphan.kill()
    assert not alive, f"{len(alive)} worker(s) outlived the stop"
