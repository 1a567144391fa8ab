"""``python -m omnimoe_train.torchrun``: torchrun with the signals and exit status that a
preemptible job needs. Takes torchrun's arguments unchanged (``launch/torchrun.sh`` calls it), or
``--slurm-node MODULE [ARGS...]``: the arguments of one node of a SLURM job (``slurm_node_args``;
``launch/slurm_node.sh`` and the torchrun sweep jobs of ``omnimoe_train.sweep_torchrun``), or
``--check-config WORLD_SIZE [ARGS...]``: only check ``omnimoe-train ARGS`` for that many ranks
(exit 0, or 2 with the one line; ``launch/slurm.sbatch`` runs it before anything else).

Before any rank starts, the training config is checked once for all ranks (exit 2 and one
line); only then does ``launch/torchrun.sh``'s run say its output dir: a usage error prints
nothing that looks like a started run.

torchrun's agent (``torch.distributed.run``) leaves SIGUSR1 at its default action, so the signal
SLURM sends before the time limit (``--signal=USR1@<s>``; slurmstepd signals every process of the
job step, the agent included) would kill the agent and, with it, its workers before they save.
And the agent exits with 1 whenever a worker fails, whatever the worker's exit code. Here:

- SIGUSR1 reaching the agent is passed on to its workers (the trainer finishes its step, saves
  and exits with ``EXIT_REQUEUE`` = 75). Under SLURM the workers also get it from slurmstepd;
  the trainer's handler only sets a flag, so twice is the same as once. The first SIGTERM is
  passed on the same way (torch's agent would SIGTERM the workers itself and exit 143, losing
  their 75). There is no time limit on that stop here: a scheduler's own (SLURM's KillWait)
  applies. A second SIGTERM kills the workers at once (SIGKILL to each worker's process group,
  its data-loader processes too) and exits 143: torch's agent would SIGTERM them again, which
  the trainer takes as the same stop request, and SIGKILL them only after its shutdown timeout
  (30 s). Checkpoints are written to a temporary name and renamed, so a kill mid-save leaves the
  previous checkpoint the newest. SIGINT (Ctrl-C) is torch's: SIGINT to the workers (Python's
  KeyboardInterrupt: no checkpoint), exit 130.
- When every failed worker exited with the same code (leaving out those the agent's own SIGTERM
  ended, see ``exit_status``), the agent exits with it: 75 (one line, no
  traceback) tells the batch script that the run stopped early with a checkpoint, or before
  training started with nothing to save (``requeue_line`` tells which), so it requeues, and
  the line says the command that continues the run (``resume_command``); 2 is a
  usage error the workers have already printed in one line. Other failures print torchrun's
  usual summary and exit 1; a signal that stopped the agent (a second SIGTERM, SIGINT) exits
  128 + its number.

Why our own wrapper: torchrun has ``--signals-to-handle`` (add SIGUSR1), but an agent handling a
signal shuts its workers down and exits 1 without their exit codes, which is the part we need.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import psutil

from omnimoe_train.exit_codes import (
    EXIT_CRASH,
    EXIT_REQUEUE,
    EXIT_USAGE,
    STOPPED_BEFORE_TRAINING_DIR,
)

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

# After its workers failed, the node hosting the rendezvous store keeps it up this long, so the
# other nodes' agents close the rendezvous cleanly instead of printing a C++ stack trace.
HOST_LINGER_S = 3.0
SLURM_NODE = "--slurm-node"  # first argument: build torchrun's arguments from the environment
CHECK_CONFIG = "--check-config"  # first argument: only check the training config


def _forward_to_workers(signum: int, _frame: FrameType | None) -> int:
    """Send ``signum`` to the agent's direct children: the worker processes it started.
    Returns how many were signalled."""
    sent = 0
    for child in psutil.Process().children(recursive=False):
        try:
            child.send_signal(signum)
            sent += 1
        except psutil.NoSuchProcess:
            continue
    return sent


def _kill_workers() -> None:
    """SIGKILL every worker's process group (torch starts each worker in a session of its own,
    so the group is the worker and the processes it started, e.g. data-loader workers)."""
    for child in psutil.Process().children(recursive=False):
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:  # not a group leader after all: the worker alone
            try:
                child.kill()
            except psutil.NoSuchProcess:
                continue


_terms_received: list[int] = []


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """The first SIGTERM is a stop request passed to the workers, as SIGUSR1 is (they save and
    exit 75, which the agent then returns). A second one kills the workers at once; then, as
    for one before any worker runs, torch's own handler ends the agent (exit 143)."""
    from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler

    _terms_received.append(signum)
    if len(_terms_received) > 1:
        _kill_workers()
        _terminate_process_handler(signum, frame)
    if _forward_to_workers(signum, frame) == 0:
        _terminate_process_handler(signum, frame)


def _without_sigterm(signals: str) -> str:
    """torchrun's ``--signals-to-handle`` list less SIGTERM (``_on_sigterm`` handles it)."""
    return ",".join(s for s in signals.split(",") if s.strip() and s.strip() != "SIGTERM")


def resume_command(script_args: list[str], env: Mapping[str, str]) -> str:
    """What continues a run whose workers stopped with 75: ``launch/torchrun.sh``'s command
    line (it exports ``OMNIMOE_LAUNCHER``) with the run directory (``OMNIMOE_SWEEP_DIR`` for a
    ``-m`` sweep) it used, which otherwise is a new time-stamped one on every start."""
    var = (
        "OMNIMOE_SWEEP_DIR"
        if any(a in ("-m", "--multirun") for a in script_args)
        else ("OMNIMOE_RUN_DIR")
    )
    directory, launcher = env.get(var), env.get("OMNIMOE_LAUNCHER")
    if directory is None:
        return "rerun the same command to continue"
    if launcher is None:
        return f"to continue, run the same command with {var}={shlex.quote(directory)}"
    return f"to continue: {var}={shlex.quote(directory)} {launcher} {shlex.join(script_args)}"


def exit_status(worker_exit_codes: list[int]) -> int:
    """The agent's exit status for the exit codes of the workers that failed (not 0).

    Once one worker has exited, the agent SIGTERMs the others; one that was already past its
    checkpoint and in interpreter shutdown (its handlers gone) dies of it, and torch reports
    -15. Those are not the run's outcome and are left out. Of the rest: their common code when
    they agree and it is a plain exit status (75 when all stopped for a requeue, the others
    having finished with 0); 1 otherwise (mixed codes, killed by another signal, or nothing but
    SIGTERMs).
    """
    codes = {code for code in worker_exit_codes if code != -signal.SIGTERM}
    if len(codes) == 1 and (code := codes.pop()) > 0:
        return code
    return EXIT_CRASH


def requeue_line(failures: Iterable[ProcessFailure], notes: Path) -> str:
    """What the workers that exited 75 (``failures``: torch's, of the workers that failed) did:
    saved a checkpoint, or, all of them, stopped before training started with nothing saved
    (during start-up or the trainer's setup; each left a note in ``notes``, named by its pid:
    ``exit_codes.STOPPED_BEFORE_TRAINING_DIR``)."""
    requeued = [f for f in failures if f.exitcode == EXIT_REQUEUE]
    if requeued and all((notes / str(f.pid)).exists() for f in requeued):
        return (
            "the workers stopped before training started (exit 75): nothing was saved, the "
            "newest checkpoint, if any, stays"
        )
    return "the workers saved a checkpoint and stopped early (exit 75)"


def slurm_node_args(module: str, args: list[str], env: Mapping[str, str]) -> list[str]:
    """torchrun's arguments for this node of a SLURM job: every node of the job, a c10d
    rendezvous on the node that hosts the store, ``python -m module *args`` workers, per-rank logs
    under ``$OMNIMOE_LOG_DIR/<module>/node<N>/`` (rank 0's output also on the console).

    Reads SLURM's ``SLURM_JOB_NUM_NODES``, ``SLURM_JOB_ID``, ``SLURM_NODEID`` (0 hosts the
    store) and the launcher's ``OMNIMOE_RDZV_HOST``, ``OMNIMOE_RDZV_PORT`` (the first node of the
    allocation, a port from the job id), ``OMNIMOE_NPROC_PER_NODE``, ``OMNIMOE_LOG_DIR``.

    Raises:
        KeyError: one of these variables (but ``SLURM_NODEID``) is not set; the name.
    """
    node = env.get("SLURM_NODEID", "0")
    return [
        "--nnodes", env["SLURM_JOB_NUM_NODES"],
        "--nproc-per-node", env["OMNIMOE_NPROC_PER_NODE"],
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{env['OMNIMOE_RDZV_HOST']}:{env['OMNIMOE_RDZV_PORT']}",
        "--rdzv-id", env["SLURM_JOB_ID"],
        # Which node hosts the store, said explicitly: the nodes' names may all resolve to one
        # address, and torch would otherwise guess from the host name.
        "--rdzv-conf", f"is_host={int(node == '0')}",
        "--max-restarts", "0",
        "--log-dir", f"{env['OMNIMOE_LOG_DIR']}/{module}/node{node}",
        "--redirects", "3", "--tee", "3", "--local-ranks-filter", "0",
        "-m", module, *args,
    ]  # fmt: skip


TRAIN_MODULE = "omnimoe_train.cli"
ERROR_MARK = ": error: "  # the one-line usage errors: "omnimoe-train: error: <key>: <rule>"


def _check_config(args) -> None:  # noqa: ANN001 - torchrun's argparse namespace
    """Validate the training config once, here, before any rank starts (exits 2 with one line).
    Otherwise every rank fails on its own, and the console (rank 0 only) may show nothing but
    torchrun's lines when another rank's failure got rank 0 SIGTERMed before it printed."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    if not (args.module and args.training_script == TRAIN_MODULE):
        return
    min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
    if min_nodes != max_nodes:  # elastic: the world size is not known yet
        return
    from omnimoe_train import cli

    try:
        local_world_size = determine_local_world_size(args.nproc_per_node)
    except ValueError as exc:  # e.g. "gpu" without a GPU
        print(f"omnimoe torchrun: error: --nproc-per-node: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    cli.check_before_launch(list(args.training_script_args), max_nodes * local_world_size)


def _announce_output_dir(args) -> None:  # noqa: ANN001 - torchrun's argparse namespace
    """``launch/torchrun.sh`` (it sets ``OMNIMOE_LAUNCHER``) chose the run or sweep directory
    whose ``logs/`` is ``--log-dir``: say where it is, now that the config has passed."""
    if args.log_dir and "OMNIMOE_LAUNCHER" in os.environ:
        out_dir = Path(args.log_dir).parent
        print(f"output dir: {out_dir} (per-rank logs in {args.log_dir})", file=sys.stderr)


def check_config_only(argv: list[str]) -> int:
    """``--check-config WORLD_SIZE [ARGS...]``: 0 when ``omnimoe-train ARGS`` is valid for
    ``WORLD_SIZE`` ranks; otherwise its one line is printed and the process exits 2."""
    if not argv or not argv[0].isdigit() or int(argv[0]) < 1:
        print(
            f"omnimoe torchrun: error: {CHECK_CONFIG}: needs the world size, a positive integer, "
            f"then the omnimoe-train overrides (got {argv[:1]})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from omnimoe_train import cli

    cli.check_before_launch(argv[1:], int(argv[0]))
    return 0


def failed_rank_errors(log_dir: str | None, first_local_rank: int) -> list[str]:
    """The usage-error lines of the first failed worker that the console has not shown (it shows
    local rank 0's output): those in its ``stderr.log`` but not in rank 0's, newest attempt."""

    def lines(rank: int) -> list[str]:
        logs = sorted(Path(log_dir).glob(f"*/attempt_*/{rank}/stderr.log"), key=_mtime)
        text = logs[-1].read_text(errors="replace") if logs else ""
        return [line.strip() for line in text.splitlines() if ERROR_MARK in line]

    if log_dir is None or first_local_rank == 0:
        return []
    shown = set(lines(0))
    return [line for line in lines(first_local_rank) if line not in shown]


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _hosts_multinode_rendezvous(args) -> bool:  # noqa: ANN001 - torchrun's argparse namespace
    return str(args.nnodes) not in ("1", "1:1") and "is_host=1" in (args.rdzv_conf or "")


class _QuietOwnStops(logging.Filter):
    """Drops two lines of torch elastic's process context (``torch.distributed.elastic.
    multiprocessing.api``) that add nothing to the one line a stop prints: "Sending process N
    closing signal SIGTERM" (the agent ending the workers that are left once one exited: routine
    cleanup, said for every exit), and "failed (exitcode: 75|2) ..." (a worker stopped with our
    own code: it printed its line, and this wrapper prints the run's line after). A crash's
    lines stay, with torchrun's summary."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Sending process") and "closing signal" in message:
            return False
        ours = record.args and record.args[0] in (EXIT_REQUEUE, EXIT_USAGE)  # type: ignore[index]
        return not (message.startswith("failed (exitcode: %s)") and ours)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHECK_CONFIG]:
        return check_config_only(argv[1:])
    if argv[:1] == [SLURM_NODE]:
        if len(argv) < 2:
            print(f"usage: omnimoe_train.torchrun {SLURM_NODE} MODULE [ARGS...]", file=sys.stderr)
            return EXIT_USAGE
        try:
            argv = slurm_node_args(argv[1], argv[2:], os.environ)
        except KeyError as exc:
            print(
                f"omnimoe torchrun: {SLURM_NODE}: {exc.args[0]} is not set (run it in a SLURM job "
                "step, from launch/slurm.sbatch or with its OMNIMOE_* variables)",
                file=sys.stderr,
            )
            return EXIT_USAGE
    args = parse_args(argv)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietOwnStops())
    _check_config(args)
    _announce_output_dir(args)
    signal.signal(signal.SIGUSR1, _forward_to_workers)
    args.signals_to_handle = _without_sigterm(args.signals_to_handle)
    signal.signal(signal.SIGTERM, _on_sigterm)
    notes = tempfile.TemporaryDirectory(prefix="omnimoe-agent-")
    previous_notes = os.environ.get(STOPPED_BEFORE_TRAINING_DIR)
    os.environ[STOPPED_BEFORE_TRAINING_DIR] = notes.name  # the workers inherit it
    try:
        run(args)
    except ChildFailedError as exc:
        if _hosts_multinode_rendezvous(args):
            time.sleep(HOST_LINGER_S)
        codes = [failure.exitcode for failure in exc.failures.values()]
        status = exit_status(codes)
        if status == EXIT_REQUEUE:
            print(
                f"omnimoe torchrun: {requeue_line(exc.failures.values(), Path(notes.name))}; "
                + resume_command(args.training_script_args, os.environ),
                file=sys.stderr,
            )
        elif status == EXIT_USAGE:
            first = exc.get_first_failure()[1]
            for line in failed_rank_errors(args.log_dir, first.local_rank):
                print(f"[rank {first.local_rank}] {line}", file=sys.stderr)
        else:
            print(exc.format_msg(), file=sys.stderr)
            if args.log_dir:
                print(f"omnimoe torchrun: per-rank logs under {args.log_dir}", file=sys.stderr)
        return status
    except SignalException as exc:
        print(f"omnimoe torchrun: stopped by {exc.sigval.name}", file=sys.stderr)
        return 128 + int(exc.sigval)
    finally:
        notes.cleanup()
        if previous_notes is None:
            os.environ.pop(STOPPED_BEFORE_TRAINING_DIR, None)
        else:
            os.environ[STOPPED_BEFORE_TRAINING_DIR] = previous_notes
    return 0


if __name__ == "__main__":
    sys.exit(main())
