"""The stop line's continue hint (``exit_codes.resume_hint``) is a command that can be pasted."""

from __future__ import annotations

import shlex
from pathlib import Path

from omnimoe_train.exit_codes import resume_hint


def test_resume_hint_quotes_a_run_dir_with_spaces(tmp_path: Path) -> None:
    run_dir = tmp_path / "my run"
    hint = resume_hint(run_dir)
    assignment = hint.split("with ", 1)[1]
    # A shell reads the pasted assignment back as one word naming the whole folder.
    assert shlex.split(assignment) == [f"OMNIMOE_RUN_DIR={run_dir.resolve()}"]
