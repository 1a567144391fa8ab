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
