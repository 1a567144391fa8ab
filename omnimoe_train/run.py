"""One training run inside a run directory: set up, train, evaluate, save, tear down."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from omegaconf import OmegaConf

from omnimoe_train.checkpoint.disk_full import FULL_ERRNOS
from omnimoe_train.config import RootConfig
from omnimoe_train.exit_codes import (
    EXIT_INTERRUPTED,
    EXIT_IO_ERROR,
    EXIT_OK,
    EXIT_REQUEUE,
    EXIT_TERMINATED,
    EXIT_USAGE,
    STOPPED_BEFORE_TRAINING_DIR,
    resume_hint,
)

if TYPE_CHECKING:
    from omnimoe_train.checkpoint.signals import StoppedBeforeTraining

EXIT_STATUS = "exit_status.json"
# A write the disk refused (full, over quota, read-only, failing): exit 74, one line.
DISK_ERRNOS = FULL_ERRNOS | {errno.EROFS, errno.EIO, errno.EFBIG}
SIGTERM_BEFORE_TRAINING = (
    "terminated (SIGTERM) before training started: stopped at once, nothing was saved (the "
    "newest complete checkpoint, if any, stays)"
)
SIGUSR1_BEFORE_TRAINING = (
    "stop requested (SIGUSR1) before training started: stopped at once, nothing was saved (the "
    "newest complete checkpoint, if any, stays)"
)

NOTHING_NEW = (
    "before the first step: stopped, nothing new to save (the newest complete checkpoint, if "
    "any, stays)"
)
STOP_AFTER_TRAINING = (
    "after training finished: nothing left to stop or save, the run is complete (exit code 0)"
)


def _write_exit_status(run_dir: Path, code: int, message: str) -> None:
    """``<run_dir>/exit_status.json``: how this process ended, for launchers that cannot see
    the exit code (torchrun exits 1 whenever a worker exits non-zero). Removed as each run
    starts (:func:`clear_exit_status`), so its absence after a run means a crash."""
    from omnimoe_train.checkpoint.atomic import write_json_atomic

    # Best effort: on a full disk the status cannot be written (the temp file is removed), and
    # the one line on stderr and the exit code still tell how the run ended.
    with contextlib.suppress(OSError):
        write_json_atomic(run_dir / EXIT_STATUS, {"exit_code": code, "message": message})


def clear_exit_status(run_dir: Path) -> None:
    """Remove the ``exit_status.json`` an earlier process left in ``run_dir``, as a run starts
    there (rank 0: ``$RANK`` unset or 0; the process group may not exist yet): whatever ends
    this one, an earlier status must not pass for its own. A path that cannot hold one (a file
    in the way, a name too long) is left to the check or the run that names it."""
    if not _env_rank0():
        return
    with contextlib.suppress(OSError):
        (run_dir / EXIT_STATUS).unlink(missing_ok=True)


def _env_rank0() -> bool:
    """Rank 0 as its launcher says (``$RANK`` unset or 0), before the process group exists."""
    return os.environ.get("RANK", "0") == "0"


def _say(line: str) -> None:
    """One line on stderr in one write: ranks that share the stream (torchrun without log
    files) stop at the same moment, and ``print`` writes the text and its newline separately,
    so two ranks' lines could run together on one line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _fail(message: str, code: int, *, show: bool, run_dir: Path | None = None) -> NoReturn:
    """Print the one line and exit with ``code``. Every rank prints it into its own output
    (under torchrun, its log file; the console shows rank 0, and the launcher repeats the line
    of a failed rank the console did not show); ``show`` (rank 0) also records it in
    ``exit_status.json``."""
    kind = "stopped" if code in (EXIT_REQUEUE, EXIT_INTERRUPTED, EXIT_TERMINATED) else "error"
    _say(f"omnimoe-train: {kind}: {message}")
    if show and run_dir is not None:
        _write_exit_status(run_dir, code, message)
    raise SystemExit(code)


def stopped_before_training(stop: StoppedBeforeTraining) -> NoReturn:
    """A stop signal before the trainer's handler was installed (``signals.StartupStop``): the
    one line, ``exit_status.json`` when the run directory exists (rank 0: ``$RANK`` unset or 0;
    the process group may not exist yet), and the exit code: SIGTERM
    :data:`~omnimoe_train.exit_codes.EXIT_TERMINATED`; SIGUSR1 (time is nearly up)
    :data:`~omnimoe_train.exit_codes.EXIT_REQUEUE`, so that the launcher requeues and the rerun
    resumes from the newest checkpoint, if any."""
    run_dir = stop.run_dir if stop.run_dir is not None and stop.run_dir.is_dir() else None
    if stop.signal == signal.SIGUSR1:
        hint = "rerun the same command to continue" if run_dir is None else resume_hint(run_dir)
        code = EXIT_REQUEUE
        message = f"{SIGUSR1_BEFORE_TRAINING}; exit code {code} ({hint})"
    else:
        code, message = EXIT_TERMINATED, SIGTERM_BEFORE_TRAINING
    _note_for_agent(stop.signal.name)
    _fail(message, code, show=_env_rank0(), run_dir=run_dir)


def _note_for_agent(signal_name: str | None) -> None:
    """For ``omnimoe_train.torchrun``'s line (it sees only exit codes): this worker stops
    before training, nothing saved (``exit_codes.STOPPED_BEFORE_TRAINING_DIR``)."""
    if folder := os.environ.get(STOPPED_BEFORE_TRAINING_DIR):
        with contextlib.suppress(OSError):
            Path(folder, str(os.getpid())).write_text(signal_name or "")


def _stop_before_first_step(
    why: str, signal_name: str | None, *, show: bool, run_dir: Path
) -> NoReturn:
    """Exit 75 in one line for a stop agreed on before the first step (``why``: its cause).
    Nothing trained: the summary, metrics and config of the run stay as they are."""
    message = f"{why} {NOTHING_NEW}; exit code {EXIT_REQUEUE} ({resume_hint(run_dir)})"
    _note_for_agent(signal_name)
    _fail(message, EXIT_REQUEUE, show=show, run_dir=run_dir)


def say_stop_after_training(noted: str | None) -> None:
    """The one line for a stop signal that came once training had finished (``noted``: its
    name, from ``StartupStop.hand_over``; None: no line): the run ends as finished, exit 0."""
    if noted is not None:
        _say(f"omnimoe-train: received {noted} {STOP_AFTER_TRAINING}")


def run(cfg: RootConfig, run_dir: Path) -> dict[str, Any]:
    """Train in ``run_dir``; exits the process with a code of ``exit_codes`` unless it is 0.

    Bad input (data, an unusable checkpoint) prints one line and exits 2; a checkpoint that
    cannot be written exits 74; an early stop (signal, time limit) exits 75 with a checkpoint
    saved; divergence exits 65 with a checkpoint of the last good weights.
    """
    from omnimoe_data.prepare import DataError
    from omnimoe_train.checkpoint.atomic import write_json_atomic
    from omnimoe_train.checkpoint.compat import RunAlreadyComplete
    from omnimoe_train.checkpoint.files import CheckpointCorrupt
    from omnimoe_train.checkpoint.manager import CheckpointWriteError
    from omnimoe_train.checkpoint.session import CheckpointLoadError
    from omnimoe_train.checkpoint.signals import startup_sigterm_paused
    from omnimoe_train.distributed import init_runtime, shutdown_runtime
    from omnimoe_train.metrics import MetricsSink
    from omnimoe_train.model.cuda_graphs import release_graphs
    from omnimoe_train.model.fusions import fused_swiglu_enabled
    from omnimoe_train.parallel.setup import ep_overlap_enabled
    from omnimoe_train.trainer import StoppedBeforeFirstStep, Trainer
    from omnimoe_train.validation import ConfigError

    quiet_libraries()
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_exit_status(run_dir)  # before the rendezvous, which may fail or wait
    started = time.perf_counter()
    with startup_sigterm_paused():  # the rendezvous blocks in C++ until every rank joins
        runtime = init_runtime(cfg)
    try:
        main = runtime.is_main
        try:
            trainer = Trainer(cfg, runtime, run_dir, started=started)
        except (ConfigError, DataError) as exc:  # the data or a rule against it: one line
            _fail(str(exc), EXIT_USAGE, show=main, run_dir=run_dir)
        except (CheckpointCorrupt, CheckpointLoadError) as exc:
            _fail(f"checkpoint.resume: {exc}", EXIT_USAGE, show=main, run_dir=run_dir)
        except RunAlreadyComplete as exc:
            # Nothing to train: the run's summary, metrics and config stay as they are.
            if main:
                _say(f"omnimoe-train: {exc}")
                _write_exit_status(run_dir, EXIT_OK, str(exc))
            return _previous_summary(run_dir)
        except StoppedBeforeFirstStep as stop:  # a stop signal while the data was prepared
            _stop_before_first_step(stop.why, stop.signal_name, show=main, run_dir=run_dir)
        if (why := trainer.stop_before_first_step()) is not None:  # collective
            _stop_before_first_step(why, trainer.stop.signal_name, show=main, run_dir=run_dir)
        resolved = OmegaConf.structured(cfg)
        resolved.model.vocab_size = trainer.vocab_size
        derived = {
            "device": str(runtime.device),
            "precision": "bf16" if runtime.bf16 else "fp32",
            "world_size": runtime.world_size,
            "dp": runtime.dp_size,
            "num_microbatches": trainer.num_microbatches,
            # the null (automatic) switches as this run resolved them
            "fused_swiglu": fused_swiglu_enabled(
                cfg.model.fused_swiglu, cfg.trainer.cuda_graphs, cfg.model.mlp
            ),
            "ep_overlap": ep_overlap_enabled(cfg.parallel.ep_overlap, cfg.trainer.cuda_graphs),
            "data_dir": str(trainer.data_dir),
            "data": trainer.data.record(),  # each dataset (a mixture: with its weight), samples
        }
        if runtime.is_main:
            (run_dir / "config.yaml").write_text(
                OmegaConf.to_yaml(resolved, resolve=True)
                + "\n# derived\n"
                + OmegaConf.to_yaml({"derived": derived})
            )
        sink = MetricsSink(
            run_dir,
            cfg.logging.wandb,
            {**OmegaConf.to_container(resolved, resolve=True), "derived": derived},
            enabled=runtime.is_main,
            max_steps=cfg.trainer.max_steps,
            progress=cfg.trainer.progress,
        )
        if runtime.is_main:
            sink.console.log(
                f"{cfg.model.name} ({cfg.model.mlp}), {trainer.num_parameters() / 1e6:.2f}M parameters "
                f"per rank; {runtime.device} {derived['precision']}, world {runtime.world_size}; "
                f"run dir {run_dir}"
            )
        try:
            try:
                summary = trainer.fit(sink)
            except BaseException:
                # Before any line below: stopping the progress bar draws it once more, and
                # after an error line it hid that line as the console's last (a bad shard's).
                # Closing may fail as the training did (a full disk: the metrics' last line
                # cannot be flushed): that error is the one already on its way.
                with contextlib.suppress(OSError):
                    sink.close()
                raise
            sink.close()
        except DataError as exc:  # e.g. a shard found corrupt mid-run, or a resume onto other data
            _fail(str(exc), EXIT_USAGE, show=main, run_dir=run_dir)
        except CheckpointLoadError as exc:
            _fail(f"checkpoint.resume: {exc}", EXIT_USAGE, show=main, run_dir=run_dir)
        except CheckpointWriteError as exc:
            _fail(f"checkpoint.dir: {exc}", EXIT_IO_ERROR, show=main, run_dir=run_dir)
        except OSError as exc:  # after CheckpointWriteError, an OSError too
            if exc.errno not in DISK_ERRNOS:
                raise
            _fail(_disk_message(run_dir, exc), EXIT_IO_ERROR, show=main, run_dir=run_dir)
        # The whole run's wall time (earlier processes up to the checkpoint each next one
        # resumed from, plus this one) and this process's alone.
        summary["wall_s"] = trainer.state.total_wall_s()
        summary["segment_wall_s"] = trainer.state.segment_wall_s()
        if trainer.resume is not None:
            summary["resumed_from"] = trainer.resume.name
        if main:
            try:  # atomic: a summary.json is complete; a diverged run's NaN loss is null
                write_json_atomic(run_dir / "summary.json", summary, default=str, finite=True)
            except OSError as exc:
                if exc.errno not in DISK_ERRNOS:
                    raise
                message = _disk_message(run_dir, exc, "summary.json")
                _fail(message, EXIT_IO_ERROR, show=main, run_dir=run_dir)
            _report(sink, summary)
        if summary["exit_code"] != EXIT_OK:
            _fail(summary["message"], summary["exit_code"], show=main, run_dir=run_dir)
        if main:
            _write_exit_status(run_dir, EXIT_OK, "finished")
        return summary
    except KeyboardInterrupt:
        # Ctrl-C: one line, not a traceback from wherever the step was (as omnimoe-data does).
        _fail(
            "interrupted (SIGINT): stopped at once, without saving a checkpoint (the newest "
            "complete one stays; SIGTERM or SIGUSR1 save first)",
            EXIT_INTERRUPTED,
            show=main,
            run_dir=run_dir,
        )
    finally:
        try:
            release_graphs()  # before any communicator goes (model/cuda_graphs.py)
        finally:
            shutdown_runtime(keep_process_group=True)  # the next job of a -m sweep reuses it


def quiet_libraries() -> None:
    """Keep the console for training progress.

    megatron-core logs every parameter and its optimizer config at INFO and warns at import about
    optional packages (TransformerEngine, apex) and a deprecation we cannot act on; torch warns
    that no CUDA toolkit is present on CPU machines. Called before anything imports them.
    """
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for noisy in ("megatron.core.models.gpt.gpt_model", "torch.utils.cpp_extension"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"megatron\.")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
    warnings.filterwarnings("ignore", category=SyntaxWarning)
    # torch.distributed.checkpoint under megatron's dist_checkpointing, on every load.
    warnings.filterwarnings("ignore", message=".*(DTensor instead|argument order of load)")
    # DeepSpeed: its INFO config dumps, the compiler probes of its op builders (logged through
    # the root logger Hydra configures), and torch's deprecation notices for the collectives it
    # calls.
    for noisy in ("DeepSpeed", "compilers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def _disk_message(run_dir: Path, exc: OSError, name: str | None = None) -> str:
    """The one line of a write to the run directory that the disk refused (full, quota);
    ``name``: the file being written, where the error does not say."""
    what = f"{exc.filename or name}: " if exc.filename or name else ""
    return (
        f"hydra.run.dir: cannot write to {run_dir} ({what}[Errno {exc.errno}] {exc.strerror}); "
        f"free space and run the same command again to resume from the newest checkpoint, if any"
    )


def _previous_summary(run_dir: Path) -> dict[str, Any]:
    """The ``summary.json`` an earlier process of this run wrote ({} if none or unreadable)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _report(sink: Any, summary: dict[str, Any]) -> None:
    first, last = summary.get("initial_val_loss"), summary.get("final_val_loss")
    if first and last is not None:  # evaluation on (data.val_fraction > 0), a nonzero start
        drop = 100.0 * (1.0 - last / first)
        took = f"in {summary['wall_s']:.0f}s"
        if "resumed_from" in summary:
            took += (
                f" ({summary['segment_wall_s']:.0f}s since resuming from {summary['resumed_from']})"
            )
        change = f"{abs(drop):.1f}% {'lower' if drop >= 0 else 'higher'}"  # not "-0.9% lower"
        sink.console.log(f"val_loss {first:.3f} -> {last:.3f} ({change}) {took}")


__all__ = ["run"]
