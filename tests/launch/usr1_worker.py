"""A torchrun worker for the launcher tests: it marks itself ready, waits for SIGUSR1 and then
exits as the trainer does after saving its checkpoint (75); 3 if no signal came in 60 s.
Like the trainer it also takes SIGTERM as a stop request: once one worker has exited, torchrun's
agent sends SIGTERM to the others, which may not have acted on their SIGUSR1 yet.

    python -m tests.launch.usr1_worker READY_DIR
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

EXIT_REQUEUE = 75
received: list[int] = []


def main() -> int:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    Path(sys.argv[1], f"ready_{os.environ['RANK']}").touch()
    deadline = time.monotonic() + 60
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    return EXIT_REQUEUE if received else 3


if __name__ == "__main__":
    sys.exit(main())
