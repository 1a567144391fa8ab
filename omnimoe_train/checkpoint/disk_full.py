"""Whether a failed checkpoint write met a full disk, whatever the writer made of the error.

The writers report a full disk in their own words: Python's file objects as ``OSError(ENOSPC)``,
torch's C++ serializer (DeepSpeed's files, ``torch.save`` to a path) as ``[enforce fail at
inline_container.cc:...] . unexpected pos 64 vs 0`` without the errno, megatron's asynchronous
writer as "Worker failure: ... <class 'OSError'>". So the error's chain is searched for the
errno first, and otherwise the file system holding the folder is asked for its free space.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

#: The errnos of a disk (or a quota) with no room left.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: Free bytes under which a file system counts as full after a failed write: writers allocate
#: in blocks of a few KiB to MiB, so a write can fail with some bytes still free.
FULL_BELOW_BYTES = 1 << 20


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, the exceptions it wraps (torch's ``CheckpointException.failures``), its causes
    and contexts; each once."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop()
        if any(current is s for s in seen):
            continue
        seen.append(current)
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            for wrapped in failures.values():
                if isinstance(wrapped, tuple) and wrapped and isinstance(wrapped[0], BaseException):
                    todo.append(wrapped[0])
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return seen


def free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding ``folder`` (or
    its nearest existing parent); None when that cannot be asked."""
    path = folder
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error``, raised while writing into ``folder``, means the disk is full: an
    ENOSPC / EDQUOT anywhere in its chain, or (a writer that drops the errno) a file system
    with less than :data:`FULL_BELOW_BYTES` free. Call before the partial files are removed."""
    if any(isinstance(e, OSError) and e.errno in FULL_ERRNOS for e in _chain(error)):
        return True
    free = free_bytes(folder)
    return free is not None and free < FULL_BELOW_BYTES
