"""Where metrics go: ``metrics.jsonl`` in the run directory, W&B (offline by default), and the
terminal (a rich progress bar with loss and tokens/s). Only the main rank writes.

A run directory is one run: a resumed run appends to its ``metrics.jsonl`` and continues its W&B
run, whose id is kept in ``wandb_run_id`` next to it (``wandb.init(id=..., resume="allow")``).
W&B ignores steps at or below the last one it has; the JSON file keeps every line (a step logged
again after a resume supersedes the earlier line).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from omnimoe_train.config import WandbConfig

METRICS_FILE = "metrics.jsonl"


def console_format(key: str, value: Any) -> str:
    """Compact console form of a metric: rates as integers, the learning rate always in
    scientific form (its column keeps one shape through warm-up and decay, as megatron logs
    it), other small values in scientific form. A non-finite value reads ``nan`` / ``inf`` (a
    bad step's loss); None, a value the window does not have (the loss of a logging window
    whose steps were all skipped), reads ``n/a``, never ``None``."""
    if value is None:
        return "n/a"
    if not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return str(value)  # nan, inf, -inf
    if key.endswith("tokens_per_s"):
        return f"{value:,.0f}"
    if key == "lr":
        return f"{value:.2e}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null marks the bad value
    return value


def logged_initial_val_loss(path: Path) -> float | None:
    """The step-0 ``val_loss`` of the newest fresh start logged in ``path`` (a
    ``metrics.jsonl``), or None. For resumes from checkpoints that do not record it."""
    found = None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a killed run's half-written line
            continue
        if isinstance(record, dict) and record.get("step") == 0 and "val_loss" in record:
            found = record["val_loss"]
    return found if isinstance(found, float) else None


class OneLineConsole(Console):
    """rich's console whose :meth:`log` writes one physical line per message, whatever the
    terminal width: ``[HH:MM:SS] message``. rich's own ``log`` lays a message out in a table as
    wide as the terminal (80 columns in a log file or a launcher's per-rank output), wrapping a
    long notice over several lines that a person or a grep then reads in pieces."""

    def log(self, *objects: Any, **_: Any) -> None:  # type: ignore[override]
        """``objects`` joined by spaces as plain text (no markup: paths hold ``[...]``);
        rich's other ``log`` arguments (``log_locals``, ...) are not used here."""
        text = " ".join(str(o) for o in objects)
        self.print(
            f"[dim]\\[{time.strftime('%H:%M:%S')}][/dim] {escape(text)}",
            soft_wrap=True,
            highlight=False,
        )


class MetricsSink:
    """Appends one JSON object per logged step and mirrors it to W&B."""

    def __init__(
        self,
        run_dir: Path,
        wandb_cfg: WandbConfig,
        run_config: dict[str, Any],
        *,
        enabled: bool,
        max_steps: int,
        progress: bool,
    ) -> None:
        self.enabled = enabled
        self.console = OneLineConsole(stderr=True)
        self._wandb_run = None
        self._progress: Progress | None = None
        if not enabled:
            return
        self.path = run_dir / METRICS_FILE
        self._file = self.path.open("a", buffering=1)
        if self._file.tell() > 0 and not self.path.read_bytes().endswith(b"\n"):
            self._file.write("\n")  # a killed run's half-written line stays on a line of its own
        if wandb_cfg.mode != "disabled":
            self._wandb_run = _init_wandb(run_dir, wandb_cfg, run_config)
        if progress:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=max_steps, loss="-", tps="-")
            self._progress.start()

    def advance(
        self, step: int, loss: float | None = None, tokens_per_s: float | None = None
    ) -> None:
        if self._progress is None:
            return
        fields: dict[str, str] = {}
        if loss is not None:
            fields["loss"] = f"{loss:.3f}"
        if tokens_per_s is not None:
            fields["tps"] = f"{tokens_per_s:,.0f}"
        self._progress.update(self._task, completed=step, **fields)

    def log(self, record: dict[str, Any], *, line: str | None = None) -> None:
        """Append ``record`` (it has a ``"step"``) and show it on the console: as ``line`` when
        given (a record that reads better as a sentence, e.g. a step's profile), else as its
        keys and values."""
        if not self.enabled:
            return
        # The console shows the values as measured (a bad step's loss: nan); the file and W&B
        # get null for a non-finite one (JSON has no NaN).
        shown = line or "  ".join(f"{k} {console_format(k, v)}" for k, v in record.items())
        record = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(
                {k: v for k, v in record.items() if k != "step"}, step=record["step"]
            )
        self.console.log(shown)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory, created on first use (8 characters of [a-z0-9],
    the form W&B generates)."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    path.write_text(run_id + "\n")
    return run_id


def _init_wandb(run_dir: Path, cfg: WandbConfig, run_config: dict[str, Any]):  # noqa: ANN202
    import wandb

    # Offline runs never touch the network or need an account; `wandb sync` uploads them later.
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name or run_dir.name,
        tags=list(cfg.tags),
        mode=cfg.mode,
        dir=str(run_dir),
        config=run_config,
        id=wandb_run_id(run_dir),
        resume="allow",
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
