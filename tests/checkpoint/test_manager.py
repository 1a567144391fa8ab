"""CheckpointManager rules on plain files (one process, no engine): atomic publish with
checksums, retention, write errors, resume with fallback past truncated or corrupt checkpoints,
and asynchronous publication."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from omnimoe_train.checkpoint.files import FORMAT, CheckpointCorrupt, find_problem
from omnimoe_train.checkpoint.manager import CheckpointManager, CheckpointWriteError
from omnimoe_train.config import CheckpointConfig


def _writer(step: int):  # noqa: ANN202
    """An engine write: two files whose content depends on the step, one in a subfolder."""

    def write(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(bytes([step % 256]) * (1000 + step))
        (folder / "sub").mkdir()
        (folder / "sub" / "extra.txt").write_text(f"step {step}\n")

    return write


def _manager(root: Path, warnings: list[str] | None = None, **cfg) -> CheckpointManager:  # noqa: ANN003
    sink = warnings if warnings is not None else []
    return CheckpointManager(root, CheckpointConfig(**cfg), warn=sink.append)


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_publish_writes_checksums_last_and_prunes(tmp_path: Path) -> None:
    manager = _manager(tmp_path, keep=2, keep_steps=[2])
    for step in (1, 2, 3, 4, 5):
        manager.save(step, _writer(step), {"step": step})
    # keep=2 newest + keep_steps=[2]
    assert _names(tmp_path) == ["latest", "step_00000002", "step_00000004", "step_00000005"]
    assert (tmp_path / "latest").read_text() == "step_00000005\n"
    meta = json.loads((tmp_path / "step_00000005" / "meta.json").read_text())
    assert meta["format"] == FORMAT and meta["step"] == 5
    assert set(meta["files"]) == {"weights.bin", "sub/extra.txt"}
    assert meta["files"]["weights.bin"]["bytes"] == 1005
    assert find_problem(tmp_path / "step_00000005") is None


def test_write_error_keeps_previous_checkpoint_newest(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    manager.save(1, _writer(1), {})

    def full_disk(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointWriteError, match="disk is full while writing .*step_00000002"):
        manager.save(2, full_disk, {})
    assert _names(tmp_path) == ["latest", "step_00000001"]  # no .tmp left behind
    assert manager.resolve_resume() == tmp_path / "step_00000001"


#: What torch's C++ serializer says of a write the disk (or a quota) refused (no errno).
OPAQUE = "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"


def _refused_allocation(code: int):  # noqa: ANN202
    """``os.posix_fallocate`` as a file system refusing every allocation with ``code``."""

    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(code, os.strerror(code))

    return refuse


def test_a_full_quota_is_named_whatever_the_writer_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EDQUOT, from Python's writer (errno kept) or torch's (errno dropped, the file system
    has room: only an allocation in the folder meets the quota), gives the one line a full
    disk gives, naming the quota; it used to be the writer's own words."""
    manager = _manager(tmp_path)
    manager.save(1, _writer(1), {})

    def over_quota(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"partial")
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    def opaque(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"partial")
        raise RuntimeError(OPAQUE)

    line = (
        f"the disk quota is exceeded while writing checkpoint step_00000002 to {tmp_path}; "
        "free space within the quota (or have it raised) and run the same command again (the "
        "newest complete checkpoint, if any, stays)"
    )
    with pytest.raises(CheckpointWriteError) as raised:
        manager.save(2, over_quota, {})
    assert str(raised.value) == line
    monkeypatch.setattr(os, "posix_fallocate", _refused_allocation(errno.EDQUOT))
    with pytest.raises(CheckpointWriteError) as raised:
        manager.save(2, opaque, {})
    assert str(raised.value) == line
    assert _names(tmp_path) == ["latest", "step_00000001"]  # no .tmp, no probe file left
    # Room for the probe: the writer's own words.
    monkeypatch.undo()
    with pytest.raises(CheckpointWriteError, match=r"step_00000002: \[enforce fail"):
        manager.save(2, opaque, {})


def _disk_fills_on_rank1(root: Path) -> None:
    """Rank 1's write meets a full disk, rank 0's succeeds: both raise the disk-full line."""
    import torch.distributed as dist

    manager = _manager(root)
    rank = dist.get_rank()

    def write(folder: Path) -> None:
        (folder / f"rank{rank}.bin").write_bytes(b"partial")
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    try:
        manager.save(2, write, {})
    except CheckpointWriteError as exc:
        message = str(exc)
    else:
        raise AssertionError(f"rank {rank}: the save did not fail")
    assert message == (
        f"the disk is full while writing checkpoint step_00000002 to {root}; free space and "
        "run the same command again (the newest complete checkpoint, if any, stays)"
    ), message


def test_a_disk_full_on_another_rank_is_named_on_rank_0(tmp_path: Path) -> None:
    """Rank 0, the rank that prints, gives the failing rank's cause (it said "failed on
    another rank"); the .tmp folder is gone."""
    from tests.parallel.distributed import run_distributed

    run_distributed(_disk_fills_on_rank1, 2, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_another_write_error_keeps_its_own_words(tmp_path: Path) -> None:
    def denied(folder: Path) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(CheckpointWriteError, match="step_00000001: .*Permission denied"):
        _manager(tmp_path).save(1, denied, {})


def test_stale_tmp_from_a_killed_run_is_ignored_and_cleaned(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    manager.save(1, _writer(1), {})
    (tmp_path / "step_00000002.tmp").mkdir()
    (tmp_path / "step_00000002.tmp" / "weights.bin").write_bytes(b"half")
    assert manager.resolve_resume() == tmp_path / "step_00000001"
    manager.save(3, _writer(3), {})
    assert "step_00000002.tmp" not in _names(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "meta", "no_files"])
def test_resume_falls_back_past_a_damaged_newest(tmp_path: Path, damage: str) -> None:
    manager = _manager(tmp_path, keep=3)
    for step in (1, 2):
        manager.save(step, _writer(step), {})
    newest = tmp_path / "step_00000002"
    target = newest / "weights.bin"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[500] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    elif damage == "meta":
        (newest / "meta.json").write_text("{not json")
    else:  # a hand edit that lists no files: it was valid, and resumed from
        meta = json.loads((newest / "meta.json").read_text())
        (newest / "meta.json").write_text(json.dumps({**meta, "files": {}}))
    warnings: list[str] = []
    assert _manager(tmp_path, warnings, keep=3).resolve_resume() == tmp_path / "step_00000001"
    assert len(warnings) == 1
    line = warnings[0]
    assert "step_00000002" in line and "falling back to step_00000001" in line
    assert ("meta.json" if damage in ("meta", "no_files") else "weights.bin") in line
    # The bad one is kept out of the way (never loaded or pruned), for inspection.
    assert (tmp_path / "step_00000002.corrupt").is_dir() and not newest.exists()


def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    manager.save(1, _writer(1), {})
    (tmp_path / "step_00000001" / "weights.bin").write_bytes(b"")
    warnings: list[str] = []
    with pytest.raises(CheckpointCorrupt, match="none of the 1 checkpoints is valid"):
        _manager(tmp_path, warnings).resolve_resume()
    assert "step_00000001 is not usable" in warnings[0] and "weights.bin" in warnings[0]
    # Nothing is renamed *.corrupt: rerunning the same command stops again rather than finding
    # no checkpoint at all and silently starting over from step 0.
    assert _names(tmp_path) == ["latest", "step_00000001"]
    with pytest.raises(CheckpointCorrupt, match="none of the 1 checkpoints is valid"):
        _manager(tmp_path).resolve_resume()


def test_fallback_past_several_bad_names_each_and_its_successor(tmp_path: Path) -> None:
    manager = _manager(tmp_path, keep=3)
    for step in (1, 2, 3):
        manager.save(step, _writer(step), {})
    for step in (2, 3):
        (tmp_path / f"step_0000000{step}" / "weights.bin").write_bytes(b"")
    warnings: list[str] = []
    assert _manager(tmp_path, warnings).resolve_resume() == tmp_path / "step_00000001"
    assert (
        "step_00000003 is not usable" in warnings[0]
        and "falling back to step_00000002" in warnings[0]
    )
    assert (
        "step_00000002 is not usable" in warnings[1]
        and "falling back to step_00000001" in warnings[1]
    )
    assert _names(tmp_path) == [
        "latest",
        "step_00000001",
        "step_00000002.corrupt",
        "step_00000003.corrupt",
    ]


def test_resume_settings(tmp_path: Path) -> None:
    assert _manager(tmp_path / "none-yet").resolve_resume() is None  # auto, empty: fresh start
    manager = _manager(tmp_path / "a")
    manager.save(3, _writer(3), {})
    assert _manager(tmp_path / "b", resume=None).resolve_resume() is None
    explicit = tmp_path / "a" / "step_00000003"
    assert _manager(tmp_path / "b", resume=str(explicit)).resolve_resume() == explicit
    assert _manager(tmp_path / "b", resume=str(tmp_path / "a")).resolve_resume() == explicit
    (explicit / "sub" / "extra.txt").write_text("changed\n")
    with pytest.raises(CheckpointCorrupt, match="sub/extra.txt"):  # explicit: no fallback
        _manager(tmp_path / "b", resume=str(explicit)).resolve_resume()


class _Background:
    """A background write that finishes when the test says so."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.finished = folder, False

    def done(self, blocking: bool) -> bool:
        if blocking or self.finished:
            _writer(7)(self.folder)
            return True
        return False


def test_async_save_is_published_when_the_write_ends(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    pending: list[_Background] = []
    manager.save(7, lambda folder: pending.append(_Background(folder)) or pending[-1], {})
    assert _names(tmp_path) == ["step_00000007.tmp"]
    manager.poll()
    assert _names(tmp_path) == ["step_00000007.tmp"]  # still writing: not published
    pending[0].finished = True
    manager.poll()
    assert _names(tmp_path) == ["latest", "step_00000007"]
    assert find_problem(tmp_path / "step_00000007") is None


def test_a_run_on_another_timeline_sets_the_old_checkpoints_aside(tmp_path: Path) -> None:
    """Was: ``checkpoint.resume=none`` in a run dir holding checkpoints 80 and 85 left them
    there; retention kept them over the new run's (the highest steps) and the next ``auto``
    rerun said "run already complete at step 85" (or continued the old run)."""
    root = tmp_path / "run"
    old = _manager(root, keep=3)
    for step in (80, 85):
        old.save(step, _writer(step), {})
    warnings: list[str] = []
    fresh = _manager(root, warnings, resume=None)
    assert fresh.resolve_resume() is None
    assert _names(root) == ["latest", "step_00000080", "step_00000085"]  # not taken yet
    fresh.set_aside_other_timeline()  # the trainer's, once the start is taken
    assert _names(root) == ["latest", "step_00000080.superseded", "step_00000085.superseded"]
    assert warnings == [
        f"warning: checkpoint.resume=None: this run starts from scratch; the checkpoints of "
        f"another run in {root} are set aside as step_00000080.superseded, "
        "step_00000085.superseded (a later resume would have continued them)"
    ]
    new = _manager(root, keep=1)
    for step in (10, 20):
        new.save(step, _writer(step), {})
    assert (root / "step_00000020").is_dir()  # retention kept the new run's
    assert _manager(root).resolve_resume() == root / "step_00000020"  # which continues

    # Rolled back to an older checkpoint of its own root: the ones after it are another run's.
    new = _manager(root, keep=5)
    for step in (30, 40):
        new.save(step, _writer(step), {})
    warnings.clear()
    start = root / "step_00000030"
    rolled_back = _manager(root, warnings, resume=str(start))
    assert rolled_back.resolve_resume() == start
    rolled_back.save(31, _writer(31), {})  # at the latest before its first save
    assert (root / "step_00000040.superseded").is_dir() and start.is_dir()
    assert len(warnings) == 1 and f"starts from {start};" in warnings[0]

    # From another run's checkpoint: every checkpoint of root is set aside.
    other = tmp_path / "other"
    _manager(other).save(5, _writer(5), {})
    elsewhere = _manager(root, resume=str(other))
    assert elsewhere.resolve_resume() == other / "step_00000005"
    elsewhere.set_aside_other_timeline()
    assert (root / "step_00000030.superseded").is_dir()
    assert _manager(root).resolve_resume() is None  # nothing of root's is left to continue
    # auto never sets anything aside
    _manager(root).save(50, _writer(50), {})
    assert _manager(root).resolve_resume() == root / "step_00000050"
