"""Task functions for the pool tests of ``omnimoe_data.workers`` (spawned workers import them
by module path, so they cannot live in a ``python -c`` script)."""

from __future__ import annotations

import os
import signal
import time


def sleep_or_die(seconds: float) -> float:
    """Sleep ``seconds``; a negative value SIGKILLs the worker instead (an OOM kill, say)."""
    if seconds < 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds)
    return seconds
