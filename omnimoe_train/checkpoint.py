"""Checkpoints: one folder per step, written whole or not at all.

Layout: ``<dir>/step_00000300/`` (the step, at least 8 digits) with ``rank_00000.pt`` per rank (model, optimizer, scheduler,
data position, RNG states) and ``meta.json`` (step, world size, layout). Everything is written
under ``step_<8 digits>.tmp`` and renamed after every rank has finished, so a folder with the final
name is always complete; ``latest`` names the newest one. Resharding to another layout is the job
of the sharded-checkpoint work; this format resumes the same layout exactly.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# At least 8 digits: a run past step 99,999,999 writes step_100000000, which must still be found
# by resume=auto and pruned by keep.
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    root: Path, step: int, state: dict[str, Any], meta: dict[str, Any], *, rank: int, keep: int
) -> Path:
    """Collective: every rank calls it with its own ``state``."""
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(state, tmp / f"rank_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / "latest.tmp").write_text(final.name + "\n")
        (root / "latest.tmp").rename(root / "latest")
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def resolve_resume(root: Path, resume: str | None) -> Path | None:
    """``None`` -> no resume; ``auto`` -> newest complete checkpoint in ``root`` (if any)."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint folder")
    return path


def load_checkpoint(path: Path, *, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = json.loads((path / "meta.json").read_text())
    state = torch.load(path / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False)
    return state, meta
