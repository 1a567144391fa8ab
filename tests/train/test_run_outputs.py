"""What a run leaves in its folder when it ends badly: ``summary.json`` is valid JSON (a
diverged run's NaN as null) and written whole or not at all; a disk that fills up mid-run
ends the run in one line, exit 74, with no temporary file left."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from omnimoe_train.checkpoint import atomic
from omnimoe_train.exit_codes import EXIT_DIVERGED, EXIT_IO_ERROR
from tests.cli_helpers import cli_env, run_train_cli, tiny

TINY = tiny(trainer__max_steps=4, checkpoint__interval=100)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def strict_json(path: Path) -> object:
    """``path`` parsed as JSON proper: ``NaN``/``Infinity`` (Python's extension) refused."""

    def refuse(token: str) -> None:
        raise ValueError(f"{path.name}: {token} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_json_is_written_whole_with_non_finite_values_as_null(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "summary.json"
    payload = {"loss": float("nan"), "xs": [float("inf"), 1.5], "n": 2}
    atomic.write_json_atomic(path, payload, finite=True)
    assert strict_json(path) == {"loss": None, "xs": [None, 1.5], "n": 2}

    def full_disk(obj: object, f: object, **kwargs: object) -> None:
        f.write('{"half": ')  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.json, "dump", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_json_atomic(path, {"loss": 1.0}, finite=True)
    assert strict_json(path) == {"loss": None, "xs": [None, 1.5], "n": 2}  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no .tmp


def test_a_diverged_runs_summary_is_valid_json(tmp_path: Path, cache: Path) -> None:
    """Its last training loss is NaN: ``summary.json`` said ``NaN``, which is not JSON."""
    run = tmp_path / "run"
    args = [*TINY, "trainer.max_bad_steps=2", "trainer.nan_loss_steps=[2,3]"]
    result = run_train_cli([*args, f"hydra.run.dir={run}"], cache=cache)
    assert result.returncode == EXIT_DIVERGED, result.stderr[-3000:]
    summary = strict_json(run / "summary.json")
    assert isinstance(summary, dict) and summary["exit_code"] == EXIT_DIVERGED
    assert None in json.loads(json.dumps(summary)).get("last_train", {}).values()
    assert not list(run.glob("*.tmp"))


@pytest.mark.parametrize(
    ("lines", "what"), [(2, ""), (6, "summary.json: ")], ids=["metrics", "summary"]
)
def test_a_full_disk_mid_run_is_one_line_exit_74(
    tmp_path: Path, cache: Path, lines: int, what: str
) -> None:
    """The disk fills up once ``metrics.jsonl`` holds ``lines`` records (``full_disk_run``):
    while training (the next metrics line), or at the end (``summary.json``). Was chained
    tracebacks (the write, the close that flushes again, the exit status) and a ``.tmp``."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tests.train.full_disk_run", str(lines), *TINY]
    cmd += ["trainer.log_interval=1", f"hydra.run.dir={run}"]
    result = subprocess.run(cmd, env=cli_env(cache), capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_IO_ERROR, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "omnimoe-train: error:" in line]
    assert errors == [
        f"omnimoe-train: error: hydra.run.dir: cannot write to {run} ({what}[Errno 28] No space "
        "left on device); free space and run the same command again to resume from the newest "
        "checkpoint, if any"
    ]
    assert not list(run.rglob("*.tmp")) and not (run / "summary.json").exists()
