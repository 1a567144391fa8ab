"""``omnimoe-train`` whose checkpoint files of one step land on a full disk (a test helper).

    python -m tests.checkpoint.dev_full_disk [--quota] STEP_DIR_NAME [omnimoe-train overrides...]

megatron's file writer opens each file of the checkpoint with ``open``; for files under
``STEP_DIR_NAME`` it gets ``/dev/full`` instead, where the kernel refuses every write with
ENOSPC, as a full disk does: torch's own serializer (``torch.save`` into the stream) meets the
real error, and reports it its own way (``[enforce fail at inline_container.cc]``). Every other
write is real. ``os.statvfs`` of that folder reports no free space, as on the full disk.

``--quota``: the user's disk quota is full instead: the writes fail the same way (the writers
drop the errno, so the kernel's ENOSPC of ``/dev/full`` stands for the quota's EDQUOT here),
``os.statvfs`` reports the file system's real free space (a quota is not in it), and an
allocation (``os.posix_fallocate``) in the checkpoint folder is refused with EDQUOT.
"""

from __future__ import annotations

import builtins
import errno
import os
import sys
from typing import Any


def main() -> None:
    from omnimoe_train.run import quiet_libraries

    quiet_libraries()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    quota = sys.argv[1] == "--quota"
    if quota:
        del sys.argv[1]
    doomed = sys.argv[1]
    real_open, real_statvfs = builtins.open, os.statvfs
    real_fallocate = os.posix_fallocate

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if doomed in str(file) and "w" in mode:
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    def full_statvfs(path: Any) -> Any:
        stat = real_statvfs(path)
        if doomed not in str(path) and "checkpoints" not in str(path):
            return stat
        values = list(stat)
        values[4] = values[3] = 0  # f_bavail, f_bfree
        return os.statvfs_result(values)

    import torch

    real_save = torch.save

    def full_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        # A path: torch's C++ file writer opens and writes it itself (DeepSpeed's files).
        if isinstance(f, (str, os.PathLike)) and doomed in str(f):
            f = "/dev/full"
        return real_save(obj, f, *args, **kwargs)

    def quota_fallocate(fd: int, offset: int, length: int) -> None:
        if "checkpoints" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        real_fallocate(fd, offset, length)

    filesystem_async.open = full_open  # the module's global open (its writer's)
    torch.save = full_save
    if quota:
        os.posix_fallocate = quota_fallocate
    else:
        os.statvfs = full_statvfs
    sys.argv = ["omnimoe-train", *sys.argv[2:]]
    from omnimoe_train.cli import main as train

    train()


if __name__ == "__main__":
    main()
