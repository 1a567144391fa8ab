"""Files that are either absent or complete: written to a temporary name, fsynced, renamed.

No torch here: the CLI records a stop before training (``exit_status.json``) with it before
torch is imported, and the second or so that import takes is long enough for torchrun's agent
to end the process (it stops the other workers once one has exited).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``path`` so that it is either absent or complete: temp file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    # A rename is durable only once the directory entry is flushed too.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
