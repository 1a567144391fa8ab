"""Process exit codes of ``omnimoe-train`` (documented in docs/checkpoints.md).

Launchers key on these: 75 means "stopped early with a checkpoint saved, run the same command
again to continue" (requeue); the others need a person.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

#: Finished ``trainer.max_steps`` (or already had); also when a stop signal came once training
#: had finished: nothing left to stop or save (one line says so).
EXIT_OK = 0
#: An unexpected error (a traceback was printed).
EXIT_CRASH = 1
#: Bad input: a config key, a layout, the data, or a checkpoint that cannot be used.
EXIT_USAGE = 2
#: ``trainer.max_bad_steps`` skipped steps in a row (non-finite or spiking loss): the run
#: diverged. A checkpoint of the last good weights was saved; rerunning as is will not help.
EXIT_DIVERGED = 65
#: A checkpoint could not be written (e.g. disk full). The previous checkpoint is still the
#: newest and valid; free space and rerun.
EXIT_IO_ERROR = 74
#: EX_TEMPFAIL: stopped early on SIGTERM/SIGUSR1 or ``trainer.max_time``, checkpoint saved; or
#: at once, with nothing to save yet: on SIGTERM/SIGUSR1 during the trainer's setup (before the
#: first step), or on SIGUSR1 (time nearly up) before training started. Rerun the same command
#: to continue.
EXIT_REQUEUE = 75
#: 128 + SIGINT: stopped by Ctrl-C (SIGINT) at once, without a checkpoint (the newest complete
#: one stays); SIGTERM / SIGUSR1 save first.
EXIT_INTERRUPTED = 130
#: 128 + SIGTERM: terminated (scancel, a preemption) before training started, i.e. before the
#: trainer's handler (which saves first, then exits 75) was installed: stopped at once, nothing
#: saved. The exit status the signal's default action would give, with one line said.
EXIT_TERMINATED = 143
#: 128 + SIGPIPE: a reader of the standard output closed it early (``omnimoe-ckpt inspect ... |
#: head``), the status a shell tool killed by SIGPIPE gives.
EXIT_BROKEN_PIPE = 141

#: Set by ``omnimoe_train.torchrun`` for its workers: a folder where a worker that stops before
#: training (before its first step: 75 or 143, nothing saved) leaves a file named by its pid
#: (holding the signal's name, empty if another rank received it). The agent, which sees only
#: exit codes, tells from them whether the workers' 75 saved anything.
STOPPED_BEFORE_TRAINING_DIR = "OMNIMOE_STOPPED_BEFORE_TRAINING_DIR"


def exit_usage(prog: str, message: str) -> NoReturn:
    """Print ``<prog>: error: <message>`` on stderr (argparse's form: one line, no traceback)
    and exit with :data:`EXIT_USAGE`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


@contextlib.contextmanager
def quiet_broken_pipe() -> Iterator[None]:
    """Around a console script's work: a reader that stops early closes the standard output, and
    the script then ends quietly with :data:`EXIT_BROKEN_PIPE` as a shell tool would, not with a
    ``BrokenPipeError`` traceback. Python's own recipe (the signal module's "Note on SIGPIPE"):
    the standard output is pointed at /dev/null so that the interpreter's last flush at exit does
    not fail again."""
    try:
        yield
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)


def resume_hint(run_dir: Path) -> str:
    """How to continue a run that stopped with :data:`EXIT_REQUEUE` in ``run_dir``: the same
    command with the run (or, in a ``-m`` sweep, the sweep) directory fixed by the variable that
    ``conf/config.yaml`` reads. Said explicitly because the default directories carry the start
    time: rerunning the bare command would start a new run from step 0 (a launcher that set the
    variable itself, like ``launch/torchrun.sh``, would too).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    var, directory = "OMNIMOE_RUN_DIR", run_dir.resolve()
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        var, directory = "OMNIMOE_SWEEP_DIR", Path(HydraConfig.get().sweep.dir).resolve()
    return f"to continue, run the same command with {var}={shlex.quote(str(directory))}"
