"""Engine-independent checkpoint rules: atomic publish, retention, resume with fallback, async.

An engine only has to write "this step's state into this folder" (a callable passed to
:meth:`CheckpointManager.save`, returning ``None`` when the write is finished or a
:class:`PendingWrite` when it continues in the background) and to load from a folder. The
manager owns everything else:

* **Atomic publish.** The engine writes into ``step_<8 digits>.tmp/``. Once every rank has
  finished, the files are checksummed (spread over the ranks), ``meta.json`` is written last,
  and the folder is renamed to ``step_<8 digits>``; only then is it the newest checkpoint, and
  ``latest`` (a convenience for people and launchers) names it. A crash at any point leaves a
  ``.tmp`` folder, which is never loaded and is removed by the next save.
* **Retention.** The newest ``checkpoint.keep`` published checkpoints plus those whose step is in
  ``checkpoint.keep_steps`` are kept; older ones are deleted after a successful publish.
* **Errors.** A write error on any rank (a full disk or disk quota) is agreed on by all ranks,
  the ``.tmp`` folder is removed and :class:`CheckpointWriteError` is raised everywhere, with
  the first failing rank's line; the previous checkpoint stays the newest.
* **Resume.** ``auto``: the newest published checkpoint that passes :func:`files.find_problem`;
  each one that fails is renamed ``*.corrupt`` (kept for inspection) with one warning line naming
  the bad file, and the one before it is tried. When none is valid nothing is renamed (a rerun
  must stop again, not start over) and the run stops.
* **Another timeline.** A run that does not continue from the newest checkpoint of its own
  ``root`` (``none``: from scratch; a path: an older one of ``root``, or one elsewhere) renames
  the checkpoints of ``root`` that are not its past ``*.superseded`` (kept, never loaded or
  pruned), with one warning line. Left as they were, retention would keep them over the new
  run's (it keeps the highest steps) and the next ``auto`` resume would continue the old run.

Every public method is collective: all ranks call it at the same point.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from omnimoe_train.checkpoint.atomic import fsync_dir, write_json_atomic
from omnimoe_train.checkpoint.disk_full import full_cause
from omnimoe_train.checkpoint.files import (
    FORMAT,
    CheckpointCorrupt,
    checksum_files,
    find_problem,
    list_checkpoints,
    step_dir_name,
    step_of,
)
from omnimoe_train.config import CheckpointConfig
from omnimoe_train.distributed import barrier, first_failure, rank_and_world


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one is still the newest."""


class PendingWrite(Protocol):
    """An engine's write still running in the background (asynchronous save)."""

    def done(self, blocking: bool) -> bool:
        """Collective. True once every rank's write has finished (and the engine's own
        finalisation is done); with ``blocking`` waits for that. Raises if any rank failed."""
        ...


WriteFn = Callable[[Path], PendingWrite | None]


def first_line(exc: BaseException) -> str:
    """The root cause in one line: torch's ``CheckpointException`` wraps each rank's error
    (``failures``: rank -> (exception, traceback)), megatron wraps a writer's in a RuntimeError."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = next(iter(failures.values()))
        if isinstance(wrapped, tuple) and wrapped and isinstance(wrapped[0], BaseException):
            exc = wrapped[0]
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class CheckpointManager:
    """Saves, publishes, prunes and finds checkpoints under ``root`` (see module docstring)."""

    def __init__(
        self, root: Path, cfg: CheckpointConfig, *, warn: Callable[[str], None] | None = None
    ) -> None:
        self.root, self.cfg = root, cfg
        self.rank, self.world = rank_and_world()
        self._warn = warn or (lambda line: None)
        self._pending: tuple[int, Path, dict[str, Any], PendingWrite] | None = None
        self.last_saved_step: int | None = None
        # Where resolve_resume started this run, to set the other timeline aside once taken.
        self._timeline_start: Path | None = None
        self._set_aside_pending = False

    # -- saving -------------------------------------------------------------------------------
    def save(self, step: int, write: WriteFn, meta: dict[str, Any]) -> None:
        """Write and (now, or when the background write ends) publish the checkpoint of
        ``step``. Waits first for a previous asynchronous save. Raises
        :class:`CheckpointWriteError` on every rank if any rank fails."""
        self.set_aside_other_timeline()  # before retention could prune the new timeline's
        self.wait()
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step_*.tmp"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        barrier()
        pending: PendingWrite | None = None
        error: BaseException | None = None
        try:
            pending = write(tmp)
        except BaseException as exc:  # torch's CheckpointException is not an Exception
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            error = exc
        self._agree_or_raise(error, step, tmp)
        self.last_saved_step = step
        if pending is None:
            self._publish(step, tmp, meta)
        else:
            self._pending = (step, tmp, meta, pending)

    def poll(self) -> None:
        """Publish a finished background save without waiting (call where ranks already sync)."""
        self._finish_pending(blocking=False)

    def wait(self) -> None:
        """Block until a background save is written and published."""
        self._finish_pending(blocking=True)

    def _finish_pending(self, *, blocking: bool) -> None:
        if self._pending is None:
            return
        step, tmp, meta, pending = self._pending
        error: BaseException | None = None
        finished = False
        try:
            finished = pending.done(blocking)
        except BaseException as exc:  # as in save()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            error, finished = exc, True
        if not finished:
            return
        self._pending = None
        self._agree_or_raise(error, step, tmp)
        self._publish(step, tmp, meta)

    def _agree_or_raise(self, error: BaseException | None, step: int, tmp: Path) -> None:
        # Each rank's own line, asked before the partial files are removed (which frees their
        # space again); every rank raises the first failing rank's, so rank 0 (the one that
        # prints) names a disk that filled on another rank, not "failed on another rank".
        reason = None if error is None else self._failure_line(error, step, tmp)
        failed = first_failure(reason)
        if failed is None:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        raise CheckpointWriteError(failed[1])

    def _failure_line(self, error: BaseException, step: int, tmp: Path) -> str:
        """This rank's one line for a failed write of ``step`` into ``tmp``."""
        name = step_dir_name(step)
        again = "run the same command again (the newest complete checkpoint, if any, stays)"
        # The writers' own words for a full disk can be opaque (torch's "enforce fail").
        cause = full_cause(error, tmp)
        if cause == "disk":
            return (
                f"the disk is full while writing checkpoint {name} to {self.root}; free space "
                f"and {again}"
            )
        if cause == "quota":
            return (
                f"the disk quota is exceeded while writing checkpoint {name} to {self.root}; "
                f"free space within the quota (or have it raised) and {again}"
            )
        where = f" on rank {self.rank}" if self.world > 1 else ""
        return f"could not write checkpoint {name}{where}: {first_line(error)}"

    def _publish(self, step: int, tmp: Path, meta: dict[str, Any]) -> None:
        files = checksum_files(tmp)
        final = self.root / step_dir_name(step)
        error: BaseException | None = None
        if self.rank == 0:
            try:
                payload = {"format": FORMAT, "step": step, **meta, "files": files}
                write_json_atomic(tmp / "meta.json", payload)
                if final.exists():  # an older timeline's checkpoint of the same step
                    shutil.rmtree(final)
                tmp.rename(final)
                fsync_dir(self.root)
                latest = self.root / "latest.tmp"
                latest.write_text(final.name + "\n")
                latest.replace(self.root / "latest")
                self._prune(step)
            except OSError as exc:
                error = exc
        self._agree_or_raise(error, step, tmp)  # also the barrier: published for every rank

    def _prune(self, just_saved: int) -> None:
        published = list_checkpoints(self.root)
        keep = {step_of(p) for p in published[-self.cfg.keep :]}
        keep |= set(self.cfg.keep_steps) | {just_saved}
        for path in published:
            if step_of(path) not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # -- resuming -----------------------------------------------------------------------------
    def resolve_resume(self) -> Path | None:
        """The checkpoint to resume from per ``checkpoint.resume``, or None to start fresh.

        ``auto``: the newest valid one under ``root`` (None if there is none at all). A path:
        that checkpoint folder, or the newest valid one in that folder. Raises
        :class:`CheckpointCorrupt` when checkpoints exist but none is valid, or when an
        explicitly named folder is invalid.
        """
        resume = self.cfg.resume
        if resume is None or str(resume).lower() in ("none", "null", "false"):
            self._set_aside_later(None)
            return None
        auto = str(resume).lower() == "auto"  # as "none" here and the pre-check
        path = self.root if auto else Path(resume).expanduser()
        if not auto and (step_of(path) is not None or (path / "meta.json").exists()):
            problem = find_problem(path)
            if problem is not None:
                raise CheckpointCorrupt(f"{path}: {problem}")
            self._set_aside_later(path)
            return path
        candidates = list(reversed(list_checkpoints(path)))
        if not auto and not candidates:
            raise CheckpointCorrupt(f"{path}: no checkpoint folders (step_<8 digits>) in it")
        bad: list[tuple[Path, str]] = []
        for candidate in candidates:
            problem = find_problem(candidate)
            if problem is None:
                for j, (folder, why) in enumerate(bad):
                    after = bad[j + 1][0].name if j + 1 < len(bad) else candidate.name
                    quarantined = self._quarantine(folder) if auto else folder.name
                    self._warn(
                        f"warning: checkpoint {folder.name} is not usable: {why}; falling back "
                        f"to {after}" + (f" (the bad one is kept as {quarantined})" if auto else "")
                    )
                if not auto:
                    self._set_aside_later(candidate)
                return candidate
            bad.append((candidate, problem))
        # None is valid: they stay where they are (not renamed *.corrupt), so that rerunning
        # the same command stops with this error again instead of silently starting over.
        for folder, why in bad:
            self._warn(f"warning: checkpoint {folder.name} is not usable: {why}")
        if candidates:
            raise CheckpointCorrupt(
                f"{path}: none of the {len(candidates)} checkpoints is valid; move them away "
                "or set checkpoint.resume=none to start from scratch"
            )
        return None

    def _set_aside_later(self, start: Path | None) -> None:
        self._timeline_start, self._set_aside_pending = start, True

    def set_aside_other_timeline(self) -> None:
        """Collective: set aside the checkpoints of ``root`` that are not the past of the start
        :meth:`resolve_resume` chose (``checkpoint.resume=none`` or a path), once the run has
        taken it: the checkpoint loaded (or, from scratch, training about to begin). A resume
        refused on the way (another engine or model, other data, a checkpoint that does not
        load: exit 2) leaves them as they were; renamed at once, the rerun of the run's own
        command found nothing of its own and started over from step 0."""
        if self._set_aside_pending:
            self._set_aside_pending = False
            self._supersede_other_timeline(self._timeline_start)

    def _supersede_other_timeline(self, start: Path | None) -> None:
        """Rename the checkpoints of ``root`` that are not the past of a run starting from
        ``start`` (None: from scratch) out of the ``step_*`` namespace (module docstring).
        Rank 0 decides and renames (the ranks must agree on the list), the others learn it."""
        kept: list[str] = []
        if self.rank == 0:
            start_dir = start.resolve() if start is not None else None
            ours = start_dir is not None and start_dir.parent == self.root.resolve()
            # From scratch or from elsewhere, every checkpoint of root is another run's; from
            # an older checkpoint of root, the ones after it are.
            start_step = (step_of(start) or 0) if start is not None and ours else -1
            for path in list_checkpoints(self.root):
                if (step_of(path) or 0) > start_step:
                    kept.append(_free_name(path, "superseded").name)
                    os.replace(path, path.with_name(kept[-1]))
        kept = _broadcast_object(kept)
        barrier()
        if kept:
            origin = "from scratch" if start is None else f"from {start}"
            self._warn(
                f"warning: checkpoint.resume={self.cfg.resume}: this run starts {origin}; the "
                f"checkpoints of another run in {self.root} are set aside as {', '.join(kept)} "
                "(a later resume would have continued them)"
            )

    def _quarantine(self, folder: Path) -> str:
        """Rename a bad checkpoint out of the ``step_*`` namespace so nothing loads or prunes it."""
        target = _free_name(folder, "corrupt")
        if self.rank == 0:
            os.replace(folder, target)
        target_name = _broadcast_object(target.name)
        barrier()
        return target_name


def _free_name(folder: Path, suffix: str) -> Path:
    """``<folder>.<suffix>``, or ``<folder>.<suffix><n>`` for the first n not yet taken."""
    target, n = folder.with_name(f"{folder.name}.{suffix}"), 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.{suffix}{n}"), n + 1
    return target


def _broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
