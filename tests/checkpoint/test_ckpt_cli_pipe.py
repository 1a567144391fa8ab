"""``omnimoe-ckpt inspect`` whose reader stops early (``omnimoe-ckpt inspect ... | head``) ends
quietly with 128 + SIGPIPE, as a shell tool would, not with a ``BrokenPipeError`` traceback
(``exit_codes.quiet_broken_pipe``). ``omnimoe-params`` writes through rich, which already ends
quietly there (exit 1)."""

from __future__ import annotations

import subprocess
import sys

from omnimoe_train.exit_codes import EXIT_BROKEN_PIPE


def _run_with_stdout_closed(args: list[str]) -> tuple[int, str]:
    """Run ``python args`` and close the read end of its stdout at once (before the script,
    still importing, writes anything); (exit code, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(timeout=300), err


def test_checkpoint_inspect_into_a_closed_pipe() -> None:
    # inspect's own output (a checkpoint's description) stood in for by a megabyte of text,
    # more than a pipe holds: the write fails however the two processes interleave.
    script = (
        "from omnimoe_train.checkpoint import cli\n"
        "cli.inspect = lambda path, as_json: print('x' * 1_000_000) or 0\n"
        "cli.main(['inspect', 'any'])\n"
    )
    code, err = _run_with_stdout_closed(["-c", script])
    assert code == EXIT_BROKEN_PIPE, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
