"""``trainer.profile_step=N``: one whole optimizer step under ``torch.profiler``.

Why a whole step, not one layer: the benchmarks profile a layer in isolation, but where a
training step's time goes (expert-parallel exchanges against data-parallel all-reduces, the
optimizer, the host waiting between micro-batches) shows only in a real step of a real run, like
torchtitan's ``profiling.enable_profiling`` or Megatron-LM's ``--profile``. PyTorch's profiler
(Kineto; CUPTI for the CUDA kernels) does the measuring; this module only brackets the step and
writes what it saw.

Every rank profiles the same step and writes, in ``<run dir>/profile/``:

* ``step{N}_rank{r}.json``: the chrome trace (``profile.export_chrome_trace``); open it in
  Perfetto (ui.perfetto.dev) or chrome://tracing;
* ``step{N}_rank{r}_kernels.txt``: the device activities (CUDA kernels, memcpy, memset) by total
  time, top :data:`TOP_ROWS` (on a CPU-only run: the CPU operators by self time), under a header
  line with the totals and the step's wall time.

Each file is written under a temporary name and renamed when complete: a run killed while
writing leaves no file that looks whole. Files that cannot be written (a full disk) cost a
warning line, not the run and not the measurement: the step's line and record still come, and
neither of its two files is left without the other.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

PROFILE_DIR = "profile"
TOP_ROWS = 40
NAME_CHARS = 100  # kernel names are whole C++ template signatures; the start names them
#: Kineto (the profiler's tracer) prints lines of its own at every trace: "profiler_start" and
#: "profiler_stop" (its level 5, USDT, the highest) and, on a machine without a GPU, "ERROR ...
#: gpuGetDeviceCount failed". Level 6 silences all of them, so the console keeps one line per
#: logged step; Kineto reads the variable at its first trace. A value already in the
#: environment wins (KINETO_LOG_LEVEL=4 shows its errors again).
KINETO_LOG_LEVEL = "6"


@dataclass(frozen=True)
class StepProfile:
    """What one rank's profile of one step measured.

    ``on_device``: the totals are the device's (CUDA kernels, memcpy and memset: ``busy_ms`` the
    sum of their durations, ``calls`` their launches); else the CPU operators' (``busy_ms`` the
    sum of their self times, ``calls`` their calls). ``wall_ms``: the step from its first
    micro-batch to the end of its update (CUDA synchronised), under the profiler, so a little
    slower than an unprofiled step. ``overhead_s``: the time around the step spent starting and
    stopping the profiler and writing the files, which the loop leaves out of its throughput.
    ``out_dir``: where the files went; None when they could not be written.
    """

    step: int
    on_device: bool
    busy_ms: float
    calls: int
    wall_ms: float
    overhead_s: float
    out_dir: Path | None

    def record(self) -> dict[str, Any]:
        """The step's ``metrics.jsonl`` record (rank 0's numbers)."""
        if self.on_device:
            busy = {"profile_kernel_ms": self.busy_ms, "profile_launches": self.calls}
        else:  # not kernels: named apart, so a plot of kernel time never mixes in CPU time
            busy = {"profile_cpu_op_ms": self.busy_ms, "profile_cpu_op_calls": self.calls}
        return {"step": self.step, **busy, "profile_step_wall_ms": self.wall_ms}

    def line(self) -> str:
        """The console line, e.g. ``profile of step 5: 412.3 ms of kernels in 8,431 launches
        (step 530.1 ms) -> <run dir>/profile``."""
        what = "kernels" if self.on_device else "CPU op self time"
        unit = "launches" if self.on_device else "op calls"
        # No kernels at all on a CUDA run: CUPTI, the profiler's kernel tracer, did not run.
        hint = (
            " (no kernels recorded: is CUPTI available?)"
            if self.on_device and not self.calls
            else ""
        )
        where = f"-> {self.out_dir}" if self.out_dir is not None else "(files not written)"
        return (
            f"profile of step {self.step}: {self.busy_ms:,.1f} ms of {what} in {self.calls:,} "
            f"{unit} (step {self.wall_ms:,.1f} ms under the profiler){hint} {where}"
        )


class StepProfiler:
    """Profiles step ``step`` (1-based; None: none) of this rank into ``out_dir``.

    The loop enters :meth:`around` for every step and, after it, :meth:`take` hands back the
    :class:`StepProfile` of the step just profiled (once; None otherwise).
    """

    def __init__(self, step: int | None, out_dir: Path, *, rank: int, device: torch.device) -> None:
        self.step, self.out_dir, self.rank, self.device = step, out_dir, rank, device
        self._done: StepProfile | None = None

    @contextmanager
    def around(self, step: int) -> Iterator[None]:
        """Run the body (one optimizer step) under ``torch.profiler.profile`` if ``step`` is
        the one to profile, else plainly. Files that cannot be written (a full disk) cost a
        warning line on this rank, not the run nor the measurement."""
        if step != self.step:
            yield
            return
        cuda = self.device.type == "cuda"
        entered = time.perf_counter()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_LOG_LEVEL)
        # The previous step's update kernels may still run: they are not this step's.
        self._synchronize()
        with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
            started = time.perf_counter()
            yield
            self._synchronize()  # every kernel of the step finishes inside the trace
            wall_s = time.perf_counter() - started
        busy_ms, calls, written = self._write(prof, step, cuda, wall_s * 1e3)
        overhead_s = time.perf_counter() - entered - wall_s
        out_dir = self.out_dir if written else None
        self._done = StepProfile(step, cuda, busy_ms, calls, wall_s * 1e3, overhead_s, out_dir)

    def take(self) -> StepProfile | None:
        """The profile of the step :meth:`around` just ran (once), or None."""
        done, self._done = self._done, None
        return done

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _write(
        self, prof: profile, step: int, cuda: bool, wall_ms: float
    ) -> tuple[float, int, bool]:
        """(busy ms, calls, whether both files were written)."""
        table, busy_ms, calls = kernel_table(prof.key_averages(), on_device=cuda)
        totals = (
            f"device kernel ms {busy_ms:.3f}, launches {calls}"
            if cuda
            else f"cpu op self ms {busy_ms:.3f}, op calls {calls}"
        )
        header = f"step {step}, rank {self.rank}: {totals}, step wall ms {wall_ms:.3f}"
        stem = self.out_dir / f"step{step}_rank{self.rank}"
        files = (Path(f"{stem}_kernels.txt"), Path(f"{stem}.json"))
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _write_complete(files[0], lambda p: p.write_text(header + "\n" + table))
            _write_complete(files[1], lambda p: prof.export_chrome_trace(str(p)))
        except OSError as exc:  # a full disk costs the files, not the run or the numbers
            print(
                f"omnimoe-train: warning: profile of step {step} (rank {self.rank}) not "
                f"written to {self.out_dir}: {exc}",
                file=sys.stderr,
                flush=True,
            )
            for path in files:  # a table without its trace would look like a whole profile
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            return busy_ms, calls, False
        return busy_ms, calls, True


def kernel_table(events: Any, *, on_device: bool, top: int = TOP_ROWS) -> tuple[str, float, int]:
    """The table of ``events`` (``profile.key_averages()``) for one step, and its totals.

    ``on_device``: the device activities (``DeviceType.CUDA``, user annotations left out: they
    span kernels, they are not ones) by total duration; else the CPU operators by self time
    (annotations left out too: their self time is the gaps between the operators they span).
    Rows: total ms, calls, % of the total, the name cut to :data:`NAME_CHARS`; the ``top``
    longest. Returns (table text, total ms, total calls).
    """
    device_type = DeviceType.CUDA if on_device else DeviceType.CPU
    rows = [
        e
        for e in events
        if e.device_type == device_type and not getattr(e, "is_user_annotation", False)
    ]

    def self_us(e: Any) -> float:
        return float(e.self_device_time_total if on_device else e.self_cpu_time_total)

    rows.sort(key=self_us, reverse=True)
    total_us = sum(self_us(e) for e in rows)
    calls = sum(int(e.count) for e in rows)
    what = "device activity" if on_device else "CPU operator (self time)"
    lines = [f"{'total ms':>12} {'calls':>9} {'%':>7}  {what}"]
    for e in rows[:top]:
        share = 100.0 * self_us(e) / total_us if total_us > 0 else 0.0
        name = " ".join(str(e.key).split())[:NAME_CHARS]
        lines.append(f"{self_us(e) / 1e3:12.3f} {int(e.count):9d} {share:6.1f}%  {name}")
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more names")
    return "\n".join(lines) + "\n", total_us / 1e3, calls


def _write_complete(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: the name appears only when complete."""
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
