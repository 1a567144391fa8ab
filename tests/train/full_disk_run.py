"""``omnimoe-train`` on a disk that fills up mid-run (a test helper).

    python -m tests.train.full_disk_run LINES [omnimoe-train overrides...]

Once ``metrics.jsonl`` holds ``LINES`` records, every write through Python's ``open`` (the
metrics, ``summary.json``, ``exit_status.json``, their temporary files) raises
``OSError(ENOSPC)``, as a full disk does; checkpoints are left alone
(``tests/checkpoint/full_disk.py`` fills the disk during one).
"""

from __future__ import annotations

import builtins
import errno
import io
import sys
from typing import Any

_state = {"metrics_lines": 0, "full": False}


class _FillingFile:
    """A file object whose writes fail once the disk is full."""

    def __init__(self, file: Any, name: str, limit: int) -> None:
        self._file, self._name, self._limit = file, name, limit
        self._failed = False

    def write(self, data: Any) -> int:
        if _state["full"]:
            self._failed = True
            raise OSError(errno.ENOSPC, "No space left on device")
        written = self._file.write(data)
        if self._name.endswith("metrics.jsonl"):
            _state["metrics_lines"] += str(data).count("\n")
            _state["full"] = _state["metrics_lines"] >= self._limit
        return written

    def close(self) -> None:
        # A buffered file flushes what it holds on close: on a full disk that fails again.
        self._file.close()
        if self._failed:
            raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def main() -> None:
    limit = int(sys.argv[1])
    real_open = io.open

    def filling_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = real_open(file, mode, *args, **kwargs)
        if any(m in mode for m in "wax+") and "checkpoints" not in str(file):
            return _FillingFile(opened, str(file), limit)
        return opened

    io.open = builtins.open = filling_open
    sys.argv = ["omnimoe-train", *sys.argv[2:]]
    from omnimoe_train.cli import main as train

    train()


if __name__ == "__main__":
    main()
