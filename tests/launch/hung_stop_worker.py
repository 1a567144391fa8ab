"""A torchrun worker whose stop never ends, for the launcher tests: like the trainer it takes
SIGTERM as a stop request, then (as a save stuck on a dead file system would) never exits. It
starts a child process first, in its process group, as a data-loader worker would be.

    python -m tests.launch.hung_stop_worker READY_DIR

Writes ``READY_DIR/pids_<rank>`` (its pid and its child's) once its handler is installed, and
``READY_DIR/stopping_<rank>`` when the stop request came.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

received: list[int] = []


def main() -> None:
    ready = Path(sys.argv[1])
    rank = os.environ["RANK"]
    signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (ready / f"pids_{rank}").write_text(f"{os.getpid()} {child.pid}")
    while not received:
        time.sleep(0.05)
    (ready / f"stopping_{rank}").touch()
    while True:  # the stop that hangs
        time.sleep(0.05)


if __name__ == "__main__":
    main()
