"""``omnimoe_data.workers.ordered_map``'s worker processes end with the process that started
them: a ``kill -9`` of a preparing trainer (or ``omnimoe-data prepare``) leaves no orphans."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

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
