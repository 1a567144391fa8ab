"""Folder names built from user input: readable, and within the file system's limits.

A path component may hold at most 255 bytes on the usual file systems (ext4, XFS, btrfs, APFS;
eCryptfs allows 143), so a name made of override values (a sweep job's folder, the run folder's
model name) is cut to :data:`NAME_MAX_BYTES` with a short hash of the whole text appended, and
path separators and control characters become ``_``. Paths the user gives whole (``data.dir``,
``checkpoint.dir``, ``hydra.run.dir``) are checked instead, by :func:`long_component`.

The resolvers are registered with OmegaConf by :func:`register_resolvers` and used in
``conf/config.yaml``; a job's full overrides stay recorded in its ``.hydra/overrides.yaml``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import PurePath

from omegaconf import OmegaConf

COMPONENT_MAX_BYTES = 255  # NAME_MAX of the usual file systems
NAME_MAX_BYTES = 120  # what a built name may take: room for prefixes, fits eCryptfs too
HASH_CHARS = 8
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")

# Keys swept by the current ``-m`` command line (set by the CLI before Hydra starts): a job's
# folder is named by their values only; the other overrides are the same for every job.
_swept_keys: set[str] = set()


def path_component(text: str, max_bytes: int = NAME_MAX_BYTES) -> str:
    """``text`` as one path component of at most ``max_bytes`` UTF-8 bytes: separators and
    control characters replaced by ``_``; when cut, ``-`` and 8 hex digits of the SHA-1 of the
    whole text end it (so different long texts stay different)."""
    safe = _UNSAFE.sub("_", text) or "_"
    if safe in (".", ".."):
        safe = safe.replace(".", "_")
    raw = safe.encode("utf-8")
    if len(raw) <= max_bytes:
        return safe
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:HASH_CHARS]
    head = raw[: max_bytes - HASH_CHARS - 1].decode("utf-8", errors="ignore")  # whole chars
    return f"{head}-{digest}"


def long_component(path: str) -> str | None:
    """The first component of ``path`` longer than the file system allows, if any."""
    for part in PurePath(path).parts:
        if len(part.encode("utf-8")) > COMPONENT_MAX_BYTES:
            return part
    return None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def set_swept_keys(keys: Iterable[str]) -> None:
    _swept_keys.clear()
    _swept_keys.update(_override_key(k) for k in keys)


def job_dirname(num: int, overrides: Iterable[str]) -> str:
    """``<job number>_<swept key=value,...>`` (all overrides when none is known to be swept),
    as one bounded component (:func:`path_component`)."""
    overrides = [str(o) for o in overrides]
    shown = [o for o in overrides if _override_key(o) in _swept_keys] or overrides
    return path_component(f"{num}_{','.join(shown)}" if shown else str(num))


def register_resolvers() -> None:
    """``${omnimoe.name:text}`` and ``${omnimoe.job_dir:num,overrides}`` for conf/config.yaml."""
    OmegaConf.register_new_resolver("omnimoe.name", path_component, replace=True)
    OmegaConf.register_new_resolver("omnimoe.job_dir", job_dirname, replace=True)
