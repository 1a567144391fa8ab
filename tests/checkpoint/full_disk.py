"""``omnimoe-train`` on a disk that fills up while one checkpoint is written (a test helper).

    python -m tests.checkpoint.full_disk STEP_DIR_NAME [omnimoe-train overrides...]

megatron's checkpoint writer (``_write_item``, which streams each tensor into its file) raises
``OSError(ENOSPC)`` after a partial write for files under ``STEP_DIR_NAME``; every other write
is real. This is the error a full disk gives, on the real code path.
"""

from __future__ import annotations

import errno
import functools
import sys
from typing import Any


def main() -> None:
    from omnimoe_train.run import quiet_libraries

    quiet_libraries()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    doomed = sys.argv[1]
    real_write = filesystem_async._write_item

    @functools.wraps(real_write)  # megatron inspects its signature
    def write_item(*args: Any, **kwargs: Any) -> Any:
        stream = next(a for a in args if hasattr(a, "write") and hasattr(a, "name"))
        if doomed in str(stream.name):
            stream.write(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    filesystem_async._write_item = write_item
    sys.argv = ["omnimoe-train", *sys.argv[2:]]
    from omnimoe_train.cli import main as train

    train()


if __name__ == "__main__":
    main()
