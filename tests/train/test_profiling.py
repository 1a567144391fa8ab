"""``trainer.profile_step`` (omnimoe_train/profiling.py): one whole step under torch.profiler.

A tiny CPU run profiles step 2 with either engine and writes rank 0's chrome trace and CPU-op
table, logs one line and one metrics record; under torchrun (gloo) each rank writes its own
files; the rule refuses steps the run never reaches, in one line. On a GPU the table lists the
step's CUDA kernels (eager and with the MLPs replayed from CUDA graphs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnimoe_train.profiling import StepProfiler
from omnimoe_train.validation import ConfigError, validate
from tests.cli_helpers import assert_usage_error, run_train_cli, tiny
from tests.train.conftest import compose_config

HEADER = re.compile(
    r"step (\d+), rank (\d+): (device kernel ms|cpu op self ms) ([\d.]+), "
    r"(launches|op calls) (\d+), step wall ms ([\d.]+)$"
)
ROW = re.compile(r"^\s*([\d.]+)\s+(\d+)\s+([\d.]+)%  (\S.*)$")


def _check_files(profile_dir: Path, step: int, rank: int, *, device: bool) -> list[str]:
    """Both files of ``rank`` exist, the trace is chrome's JSON, the table's header totals are
    positive and its rows are consistent with them; returns the rows' names."""
    trace = json.loads((profile_dir / f"step{step}_rank{rank}.json").read_text())
    assert trace["traceEvents"], "empty trace"
    lines = (profile_dir / f"step{step}_rank{rank}_kernels.txt").read_text().splitlines()
    header = HEADER.match(lines[0])
    assert header is not None, lines[0]
    assert (int(header[1]), int(header[2])) == (step, rank)
    assert header[3] == ("device kernel ms" if device else "cpu op self ms")
    busy_ms, calls, wall_ms = float(header[4]), int(header[6]), float(header[7])
    assert busy_ms > 0 and calls > 0 and wall_ms > 0
    rows = [ROW.match(line) for line in lines[2:] if not line.startswith("...")]
    assert rows and all(rows), lines[:5]
    assert len(rows) <= 40
    assert sum(float(r[1]) for r in rows) <= busy_ms + 0.01 * len(rows)  # top rows of the total
    assert all(int(r[2]) >= 1 and len(r[4]) <= 100 for r in rows)
    return [r[4] for r in rows]


def _profile_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if any(k.startswith("profile_") for k in r)]


@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_profiled_step_writes_trace_table_line_and_record(tmp_path: Path, engine: str) -> None:
    run_dir = tmp_path / "run"
    args = tiny(
        trainer__device="cpu", trainer__max_steps=3, trainer__profile_step=2,
        trainer__engine=engine,
    )  # fmt: skip
    result = run_train_cli([*args, f"hydra.run.dir={run_dir}"], cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    profile_dir = run_dir / "profile"
    assert sorted(p.name for p in profile_dir.iterdir()) == [
        "step2_rank0.json",
        "step2_rank0_kernels.txt",
    ]  # one step, one rank, no half-written leftovers
    names = _check_files(profile_dir, 2, 0, device=False)
    assert any(name.startswith("aten::") for name in names), names
    lines = [line for line in result.stderr.splitlines() if "profile of step" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    assert re.search(
        r"profile of step 2: [\d,.]+ ms of CPU op self time in [\d,]+ op calls", lines[0]
    )
    (record,) = _profile_records(run_dir)
    assert record["step"] == 2
    assert record["profile_cpu_op_ms"] > 0 and record["profile_cpu_op_calls"] > 0
    assert record["profile_step_wall_ms"] > 0


def test_a_resume_past_the_profiled_step_says_so_in_one_line(tmp_path: Path) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    first = tiny(trainer__device="cpu", trainer__max_steps=3)
    result = run_train_cli([*first, f"hydra.run.dir={run_dir}"], cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    again = tiny(trainer__device="cpu", trainer__max_steps=5, trainer__profile_step=2)
    result = run_train_cli([*again, f"hydra.run.dir={run_dir}"], cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "trainer.profile_step=2" in line]
    assert notes == [
        "trainer.profile_step=2: this run resumes after it (step 3), so no step is profiled"
    ]
    assert not (run_dir / "profile").exists()


def test_profiled_step_under_torchrun_writes_every_ranks_files(tmp_path: Path) -> None:
    """Two gloo ranks (data parallel): each profiles step 1 and writes its own files."""
    run_dir = tmp_path / "run"
    args = tiny(
        trainer__device="cpu", trainer__max_steps=2, trainer__profile_step=1,
        data__global_batch_size=8,
    )  # fmt: skip
    env = {**os.environ, "OMNIMOE_CACHE": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "omnimoe_train.cli", *args, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        _check_files(run_dir / "profile", 1, rank, device=False)
    assert len(_profile_records(run_dir)) == 1  # rank 0 writes the metrics


def test_only_the_chosen_step_is_profiled_and_an_unwritable_folder_costs_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    x = torch.randn(64, 64)
    profiler = StepProfiler(2, tmp_path / "profile", rank=3, device=torch.device("cpu"))
    with profiler.around(1):
        x @ x
    assert profiler.take() is None and not (tmp_path / "profile").exists()
    with profiler.around(2):
        x @ x
    done = profiler.take()
    assert done is not None and done.step == 2 and done.calls >= 1 and profiler.take() is None
    _check_files(tmp_path / "profile", 2, 3, device=False)

    blocked = StepProfiler(1, tmp_path / "a_file", rank=0, device=torch.device("cpu"))
    (tmp_path / "a_file").write_text("not a folder")
    with blocked.around(1):
        x @ x
    lost = blocked.take()  # the numbers survive the files
    assert lost is not None and lost.out_dir is None and lost.calls >= 1 and lost.busy_ms > 0
    assert lost.line().endswith("(files not written)") and lost.overhead_s >= 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("omnimoe-train: warning: profile of step 1 (rank 0) not written")


def test_a_trace_that_cannot_be_written_leaves_no_table_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The disk fills between the two files: the table already written goes too, so no step
    looks profiled without its trace; the step's numbers still come back."""
    from omnimoe_train import profiling

    real = profiling._write_complete

    def full_disk_for_traces(path: Path, write) -> None:
        if path.suffix == ".json":
            raise OSError(28, "No space left on device")
        real(path, write)

    monkeypatch.setattr(profiling, "_write_complete", full_disk_for_traces)
    profiler = StepProfiler(1, tmp_path / "profile", rank=0, device=torch.device("cpu"))
    with profiler.around(1):
        torch.randn(32, 32) @ torch.randn(32, 32)
    done = profiler.take()
    assert done is not None and done.out_dir is None and done.calls >= 1
    assert list((tmp_path / "profile").iterdir()) == []
    assert "No space left on device" in capsys.readouterr().err


@pytest.mark.parametrize("value", [0, 4, -1, "2", 2.5, True])
def test_profile_step_outside_the_run_is_refused(value: object) -> None:
    cfg = compose_config("trainer.max_steps=3", "optim.warmup_steps=1")
    cfg.trainer.profile_step = value  # type: ignore[assignment]  # as a hand-made config may
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    assert err.value.key == "trainer.profile_step"
    assert "[1, trainer.max_steps=3]" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value", [None, 1, 3])
def test_profile_step_off_or_within_the_run_passes(value: int | None) -> None:
    cfg = compose_config("trainer.max_steps=3", "optim.warmup_steps=1")
    cfg.trainer.profile_step = value
    validate(cfg, world_size=1)


@pytest.mark.parametrize("value", ["0", "4", "abc"])
def test_cli_refuses_a_bad_profile_step_in_one_line(tmp_path: Path, value: str) -> None:
    result = run_train_cli(
        ["trainer.max_steps=3", "optim.warmup_steps=1", f"trainer.profile_step={value}"],
        cache=tmp_path,
        timeout=120,
    )
    assert_usage_error(result, "omnimoe-train: error: trainer.profile_step:", tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", ["none", "mlp"])
def test_profiled_step_lists_cuda_kernels_gpu(tmp_path: Path, graphs: str) -> None:
    """Step 2 (after step 1's CUDA-graph capture with ``mlp``): the table is of device kernels
    and the metrics record has the kernel totals."""
    run_dir = tmp_path / "run"
    args = tiny(
        trainer__device="cuda", trainer__max_steps=3, trainer__profile_step=2,
        trainer__cuda_graphs=graphs, data__global_batch_size=8,
    )  # fmt: skip
    result = run_train_cli([*args, f"hydra.run.dir={run_dir}"], cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    names = _check_files(run_dir / "profile", 2, 0, device=True)
    assert not any(name.startswith("aten::") for name in names), names  # kernels, not ops
    (record,) = _profile_records(run_dir)
    assert record["profile_kernel_ms"] > 0 and record["profile_launches"] > 0
    lines = [line for line in result.stderr.splitlines() if "profile of step 2" in line]
    assert len(lines) == 1 and "ms of kernels in" in lines[0], result.stderr[-3000:]


def test_profiled_step_prints_nothing_of_the_tracers_own(tmp_path: Path) -> None:
    """Kineto's own lines ("profiler_start", "profiler_stop", and on a machine without a GPU
    "ERROR ... gpuGetDeviceCount failed") would break the console's one line per logged step:
    a fresh process (Kineto reads its log level at its first trace) prints nothing at all."""
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from omnimoe_train.profiling import StepProfiler\n"
        "p = StepProfiler(1, Path(sys.argv[1]), rank=0, device=torch.device('cpu'))\n"
        "with p.around(1):\n"
        "    torch.ones(8) @ torch.ones(8)\n"
        "assert p.take() is not None\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "profile")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == "" and result.stdout == "", result.stderr
