"""One checkpoint folder on disk: its name, its ``meta.json`` and the checks that make it valid.

A checkpoint is ``<root>/step_<8 digits>/``: whatever files the engine wrote (megatron-core's
``dist_checkpointing`` files for the megatron engine) plus ``meta.json``, written last, which
lists every other file with its size and SHA-256. A folder is valid only if ``meta.json``
parses, has this format, lists at least one file, and every file it lists exists with that
size and checksum. The checks are engine-independent (they see files, not tensors), so every
engine gets them.

Hashing is spread over the ranks (file ``i`` on rank ``i % world``) and the results gathered,
so a checkpoint written by 64 ranks is checked by 64 ranks.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch.distributed as dist

from omnimoe_train.distributed import rank_and_world

FORMAT = "omnimoe-checkpoint/1"
META = "meta.json"
# At least 8 digits: a run past step 99,999,999 writes step_100000000, which must still be found
# by resume=auto and pruned by keep.
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_CHUNK = 8 << 20


class CheckpointCorrupt(Exception):
    """A checkpoint folder that must not be loaded; the message names the bad file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoint folders under ``root``, oldest first (``*.tmp`` never counts)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def _gather(obj: Any) -> list[Any]:
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def data_files(folder: Path) -> list[str]:
    """Every file under ``folder`` except ``meta.json``, as sorted relative POSIX paths."""
    names = [
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != META
    ]
    return sorted(names)


def checksum_files(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` for every file; collective when distributed."""
    rank, world = rank_and_world()
    names = data_files(folder) if rank == 0 else None
    names = _broadcast(names)
    mine = {
        n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)}
        for n in names[rank::world]
    }
    merged: dict[str, dict[str, Any]] = {}
    for part in _gather(mine):
        merged.update(part)
    return {n: merged[n] for n in names}


def _broadcast(obj: Any) -> Any:
    rank, world = rank_and_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_meta(folder: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint; :class:`CheckpointCorrupt` if absent or unreadable."""
    path = folder / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{META} is missing (the save did not finish)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointCorrupt(f"{META} is unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointCorrupt(f"{META} is not a {FORMAT} checkpoint")
    # What every reader indexes without looking (a hand-edited or foreign meta.json was a
    # KeyError traceback from inspect, consolidate and a resuming run).
    files = meta.get("files")
    if not isinstance(meta.get("step"), int) or isinstance(meta["step"], bool):
        raise CheckpointCorrupt(f"{META} is malformed: no integer step")
    # Every engine writes files; an empty list (a hand edit) would make the checksum check
    # pass on anything the folder holds.
    if not isinstance(files, dict) or not files:
        raise CheckpointCorrupt(f"{META} is malformed: no files listed")
    for name, entry in files.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointCorrupt(f"{META} is malformed: no bytes and sha256 for {name}")
    return meta


def find_problem(folder: Path) -> str | None:
    """Why ``folder`` must not be loaded (one phrase naming the file), or None if it is valid.

    Collective when distributed: every rank gets the same answer. Sizes are checked first
    (a truncated file costs no hashing), then the checksums, spread over the ranks.
    """
    rank, world = rank_and_world()
    problem: str | None = None
    files: dict[str, dict[str, Any]] = {}
    if rank == 0:
        try:
            files = read_meta(folder)["files"]
            for name, entry in files.items():
                path = folder / name
                if not path.is_file():
                    problem = f"{name} is missing"
                    break
                size = path.stat().st_size
                if size < entry["bytes"]:
                    problem = f"{name} is truncated ({size} of {entry['bytes']} bytes)"
                    break
                if size > entry["bytes"]:  # appended to or replaced: not "truncated"
                    problem = f"{name} has {size} bytes, {META} lists {entry['bytes']}"
                    break
        except CheckpointCorrupt as exc:
            problem = str(exc)
    problem, files = _broadcast((problem, files))
    if problem is not None:
        return problem
    names = sorted(files)
    bad = [n for n in names[rank::world] if sha256_file(folder / n) != files[n]["sha256"]]
    for found in _gather(bad):
        if found:
            return f"{found[0]} is corrupt (SHA-256 mismatch)"
    return None
