"""``python -m omnimoe_train.torchrun``: torchrun with the signals and exit status that a
preemptible job needs. Takes torchrun's arguments unchanged (``launch/torchrun.sh`` and
``launch/slurm_node.sh`` call it).

torchrun's agent (``torch.distributed.run``) leaves SIGUSR1 at its default action, so the signal
SLURM sends before the time limit (``--signal=USR1@<s>``; slurmstepd signals every process of the
job step, the agent included) would kill the agent and, with it, its workers before they save.
And the agent exits with 1 whenever a worker fails, whatever the worker's exit code. Here:

- SIGUSR1 reaching the agent is passed on to its workers (the trainer finishes its step, saves
  and exits with ``EXIT_REQUEUE`` = 75). Under SLURM the workers also get it from slurmstepd;
  the trainer's handler only sets a flag, so twice is the same as once.
- When every failed worker exited with the same code (leaving out those the agent's own SIGTERM
  ended, see ``exit_status``), the agent exits with it: 75 (one line, no
  traceback) tells the batch script that the run stopped early with a checkpoint, so it
  requeues; 2 is a usage error the workers have already printed in one line. Other failures
  print torchrun's usual summary and exit 1; a signal that stopped the agent (SIGTERM on
  ``scancel``) exits 128 + its number.

Why our own wrapper: torchrun has ``--signals-to-handle`` (add SIGUSR1), but an agent handling a
signal shuts its workers down and exits 1 without their exit codes, which is the part we need.
"""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType

import psutil

EXIT_CRASH = 1
EXIT_USAGE = 2  # the trainer printed one line naming the bad key
EXIT_REQUEUE = 75  # the trainer's "stopped early with a checkpoint saved; rerun to continue"
# After its workers failed, the node hosting the rendezvous store keeps it up this long, so the
# other nodes' agents close the rendezvous cleanly instead of printing a C++ stack trace.
HOST_LINGER_S = 3.0


def _forward_to_workers(signum: int, _frame: FrameType | None) -> None:
    """Send ``signum`` to the agent's direct children: the worker processes it started."""
    for child in psutil.Process().children(recursive=False):
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            continue


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


def _hosts_multinode_rendezvous(args) -> bool:  # noqa: ANN001 - torchrun's argparse namespace
    return str(args.nnodes) not in ("1", "1:1") and "is_host=1" in (args.rdzv_conf or "")


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGUSR1, _forward_to_workers)
    try:
        run(args)
    except ChildFailedError as exc:
        if _hosts_multinode_rendezvous(args):
            time.sleep(HOST_LINGER_S)
        codes = [failure.exitcode for failure in exc.failures.values()]
        status = exit_status(codes)
        if status == EXIT_REQUEUE:
            print(
                "omnimoe torchrun: the workers saved a checkpoint and stopped early (exit 75); "
                "rerun the same command to continue",
                file=sys.stderr,
            )
        elif status != EXIT_USAGE:
            print(exc.format_msg(), file=sys.stderr)
            if args.log_dir:
                print(f"omnimoe torchrun: per-rank logs under {args.log_dir}", file=sys.stderr)
        return status
    except SignalException as exc:
        print(f"omnimoe torchrun: stopped by {exc.sigval.name}", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
