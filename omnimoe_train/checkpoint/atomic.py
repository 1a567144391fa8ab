"""Files that are either absent or complete: written to a temporary name, fsynced, renamed.

No torch here: the CLI records a stop before training (``exit_status.json``) with it before
torch is imported, and the second or so that import takes is long enough for torchrun's agent
to end the process (it stops the other workers once one has exited).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by None, in nested dicts,
    lists and tuples: ``json.dumps`` writes them as ``NaN``/``Infinity``, which is not JSON
    (``jq`` and most parsers other than Python's refuse the file)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def write_json_atomic(
    path: Path,
    payload: dict[str, Any],
    *,
    default: Callable[[Any], Any] | None = None,
    finite: bool = False,
) -> None:
    """Write ``path`` so that it is either absent or complete: temp file, fsync, rename.
    ``finite``: non-finite floats are written as null (:func:`finite_json`), for files that
    other tools read (``summary.json``); otherwise as Python's ``NaN``/``Infinity``, which
    read back as the same floats (``meta.json``'s run config). ``default`` as in
    ``json.dump``. On any failure (e.g. ``OSError`` ENOSPC, re-raised) the temp file is
    removed and ``path`` keeps its previous content, if any."""
    tmp = path.with_name(path.name + ".tmp")
    data = finite_json(payload) if finite else payload
    try:
        with tmp.open("w") as f:
            json.dump(data, f, indent=2, allow_nan=not finite, default=default)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    # A rename is durable only once the directory entry is flushed too.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
