"""Whether a failed checkpoint write met a full disk, whatever the writer made of the error.

The writers report a full disk in their own words: Python's file objects as ``OSError(ENOSPC)``,
torch's C++ serializer (DeepSpeed's files, ``torch.save`` to a path) as ``[enforce fail at
inline_container.cc:...] . unexpected pos 64 vs 0`` without the errno, megatron's asynchronous
writer as "Worker failure: ... <class 'OSError'>". So the error's chain is searched for the
errno first; otherwise the file system holding the folder is asked for its free space, and
then (a disk quota is not in the file system's free space) a small allocation is tried in the
folder, which a full quota refuses with EDQUOT.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Literal

#: What a failed write ran into: the disk (ENOSPC) or the user's disk quota (EDQUOT).
FullCause = Literal["disk", "quota"]

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


def _existing(folder: Path) -> Path:
    """``folder`` or its nearest existing parent."""
    path = folder
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding ``folder`` (or
    its nearest existing parent); None when that cannot be asked."""
    try:
        stat = os.statvfs(_existing(folder))
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def probe_allocation(folder: Path) -> int | None:
    """The errno (ENOSPC or EDQUOT) with which the file system refuses
    :data:`FULL_BELOW_BYTES` bytes in a new file in ``folder`` (or its nearest existing
    parent), or None when it takes them (or the probe itself cannot run). The file is removed."""
    try:
        fd, name = tempfile.mkstemp(prefix=".space-probe.", dir=_existing(folder))
    except OSError as exc:
        return exc.errno if exc.errno in FULL_ERRNOS else None
    try:
        try:
            os.posix_fallocate(fd, 0, FULL_BELOW_BYTES)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                return exc.errno if exc.errno in FULL_ERRNOS else None
            # No fallocate on this file system (some network ones): write the bytes instead;
            # a quota is charged at the latest when they are flushed.
            os.write(fd, bytes(FULL_BELOW_BYTES))
            os.fsync(fd)
    except OSError as exc:
        return exc.errno if exc.errno in FULL_ERRNOS else None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
    return None


def full_cause(error: BaseException, folder: Path) -> FullCause | None:
    """What ``error``, raised while writing into ``folder``, ran out of: ``"quota"`` for an
    EDQUOT, ``"disk"`` for an ENOSPC anywhere in its chain; for a writer that drops the errno,
    ``"disk"`` when the file system has less than :data:`FULL_BELOW_BYTES` free, else the
    errno of a probe allocation there (:func:`probe_allocation`); None when there is room.
    Call before the partial files are removed."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return "quota" if e.errno == errno.EDQUOT else "disk"
    free = free_bytes(folder)
    if free is not None and free < FULL_BELOW_BYTES:
        return "disk"
    probed = probe_allocation(folder)
    if probed is None:
        return None
    return "quota" if probed == errno.EDQUOT else "disk"
