"""The single-node launcher: ``omnimoe_train.torchrun`` (signals, exit status) and
``launch/torchrun.sh`` running a ``-m`` sweep; no SLURM needed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from omnimoe_train.torchrun import (
    exit_status,
    failed_rank_errors,
    resume_command,
    slurm_node_args,
)
from tests.launch.conftest import REPO, TINY, job_env


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([75, 75], 75),  # every failed worker saved for a requeue
        ([75], 75),  # the others finished with 0
        ([2, 2], 2),  # a usage error, already printed by the workers
        ([75, -15], 75),  # the agent's own SIGTERM caught a worker already past its save
        ([75, 1], 1),  # one crashed: not a clean stop
        ([1, -15], 1),
        ([-9, -9], 1),  # killed by a signal
        ([-15], 1),
        ([], 1),
    ],
)
def test_exit_status(codes: list[int], expected: int) -> None:
    assert exit_status(codes) == expected


def test_slurm_node_args_put_the_store_on_the_first_node() -> None:
    env = {
        "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "41", "SLURM_NODEID": "1",
        "OMNIMOE_RDZV_HOST": "node-a", "OMNIMOE_RDZV_PORT": "20082",
        "OMNIMOE_NPROC_PER_NODE": "8", "OMNIMOE_LOG_DIR": "runs/x/logs/41.0",
    }  # fmt: skip
    args = slurm_node_args("omnimoe_train.cli", ["model=a80m"], env)
    pairs = dict(zip(args[:-3:2], args[1:-3:2]))
    assert pairs["--nnodes"] == "2" and pairs["--nproc-per-node"] == "8"
    assert pairs["--rdzv-endpoint"] == "node-a:20082" and pairs["--rdzv-id"] == "41"
    assert pairs["--rdzv-conf"] == "is_host=0"  # node 1 joins; node 0 hosts
    assert pairs["--log-dir"] == "runs/x/logs/41.0/omnimoe_train.cli/node1"
    assert args[-3:] == ["-m", "omnimoe_train.cli", "model=a80m"]
    first = slurm_node_args("m", [], {**env, "SLURM_NODEID": "0"})
    assert first[first.index("--rdzv-conf") + 1] == "is_host=1"


def test_slurm_node_outside_a_job_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in job_env(tmp_path).items() if not k.startswith(("SLURM", "OMNIMOE_R"))}
    result = subprocess.run(
        [sys.executable, "-m", "omnimoe_train.torchrun", "--slurm-node", "omnimoe_train.cli"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "omnimoe torchrun: --slurm-node: SLURM_JOB_NUM_NODES is not set (run it in a SLURM job "
        "step, from launch/slurm.sbatch or with its OMNIMOE_* variables)"
    ]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["usr1", "term"])
def test_signal_to_the_agent_reaches_the_workers_and_75_comes_back(
    sig: signal.Signals, tmp_path: Path
) -> None:
    """torchrun's own agent would die of SIGUSR1 (exit 1), and SIGTERMs its workers and exits
    143 on SIGTERM, losing their 75; ours passes either on, returns 75 and says how to continue."""
    env = job_env(tmp_path, OMNIMOE_LAUNCHER="launch/torchrun.sh 2", OMNIMOE_RUN_DIR="runs/a b")
    agent = subprocess.Popen(
        [
            sys.executable, "-m", "omnimoe_train.torchrun", "--standalone",
            "--nproc-per-node", "2", "-m", "tests.launch.usr1_worker", str(tmp_path),
        ],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready_*"))) < 2 and time.monotonic() < deadline:
            assert agent.poll() is None, agent.communicate()
            time.sleep(0.1)
        os.kill(agent.pid, sig)
        _, err = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 75, err
    assert "saved a checkpoint and stopped early (exit 75)" in err
    assert (
        f"to continue: OMNIMOE_RUN_DIR='runs/a b' launch/torchrun.sh 2 {tmp_path}"
        in err.splitlines()[-1]
    ), err
    assert "Traceback" not in err


def test_second_sigterm_kills_the_workers_at_once(tmp_path: Path) -> None:
    """The first SIGTERM asks the workers to save and stop; when that stop hangs, a second one
    kills them and their children at once. torch's agent would SIGTERM them again (taken as
    the same stop request) and SIGKILL only after its shutdown timeout: set to 10 minutes
    here, so the old behaviour runs into this test's timeout."""
    env = job_env(tmp_path, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="600")
    agent = subprocess.Popen(
        [
            sys.executable, "-m", "omnimoe_train.torchrun", "--standalone",
            "--nproc-per-node", "2", "-m", "tests.launch.hung_stop_worker", str(tmp_path),
        ],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    pids: list[int] = []
    try:
        _wait_for(tmp_path, "pids_*", agent)
        pids = [int(p) for f in tmp_path.glob("pids_*") for p in f.read_text().split()]
        os.kill(agent.pid, signal.SIGTERM)
        _wait_for(tmp_path, "stopping_*", agent)  # both took it as a stop request
        os.kill(agent.pid, signal.SIGTERM)
        _, err = agent.communicate(timeout=60)
    finally:
        agent.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert agent.returncode == 143, err
    assert err.strip().splitlines()[-1] == "omnimoe torchrun: stopped by SIGTERM", err
    assert len(pids) == 4
    for pid in pids:  # the workers and the processes they started
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", pid


def test_usr1_while_the_workers_start_comes_back_as_75(tmp_path: Path) -> None:
    """SLURM's USR1 ahead of the time limit, passed on while the workers were still starting
    (before the trainer's handler): they died of it (138) and the agent exited 1, so the job
    was not requeued. Now each stops in one line with 75, and so does the agent, saying that
    nothing was saved."""
    runs = tmp_path / "runs"
    for rank in (0, 1):
        (runs / f"rank{rank}" / ".hydra").mkdir(parents=True)
        # Holds the worker in Hydra's job setup (tests/checkpoint/test_fault_tolerance.py).
        os.mkfifo(runs / f"rank{rank}" / ".hydra" / "hydra.yaml")
    agent = subprocess.Popen(
        [
            sys.executable, "-m", "omnimoe_train.torchrun", "--standalone",
            "--nproc-per-node", "2", "-m", "omnimoe_train.cli", *TINY,
            f"hydra.run.dir={runs}/rank${{oc.env:RANK,0}}",  # one FIFO each
        ],
        cwd=REPO, env=job_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        _wait_for(runs, "rank*/.hydra/config.yaml", agent)
        os.kill(agent.pid, signal.SIGUSR1)
        _, err = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 75, err
    assert "stop requested (SIGUSR1) before training started" in err, err
    assert "Traceback" not in err
    # The agent's own line said "the workers saved a checkpoint": none had trained.
    assert "saved a checkpoint" not in err, err
    assert err.strip().splitlines()[-1] == (
        "omnimoe torchrun: the workers stopped before training started (exit 75): "
        "nothing was saved, the newest checkpoint, if any, stays; rerun the same command to "
        "continue"
    ), err
    status = json.loads((runs / "rank0" / "exit_status.json").read_text())
    assert status["exit_code"] == 75, status


def _wait_for(folder: Path, pattern: str, agent: subprocess.Popen) -> None:
    """Until the two workers have written ``pattern`` files (the agent must still run)."""
    deadline = time.monotonic() + 60
    while len(list(folder.glob(pattern))) < 2:
        assert agent.poll() is None, agent.communicate()
        assert time.monotonic() < deadline, f"no {pattern} from both workers in 60 s"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["a=1"], {"OMNIMOE_RUN_DIR": "o/r", "OMNIMOE_LAUNCHER": "l 2"},
         "to continue: OMNIMOE_RUN_DIR=o/r l 2 a=1"),
        (["-m", "a=1,2"], {"OMNIMOE_SWEEP_DIR": "m/s", "OMNIMOE_LAUNCHER": "l 2"},
         "to continue: OMNIMOE_SWEEP_DIR=m/s l 2 -m a=1,2"),
        (["a=1"], {"OMNIMOE_RUN_DIR": "o/r"}, "to continue, run the same command with OMNIMOE_RUN_DIR=o/r"),
        (["a=1"], {}, "rerun the same command to continue"),
    ],
)  # fmt: skip
def test_resume_command(args: list[str], env: dict[str, str], expected: str) -> None:
    assert resume_command(args, env) == expected


def test_sigterm_stop_under_torchrun_sh_says_the_command_that_resumes(
    tmp_path: Path, tiny_cache: Path
) -> None:
    """The tester's case: launch/torchrun.sh without OMNIMOE_RUN_DIR, SIGTERM, exit 75; the
    printed command (run as printed) resumes in the same run directory, not at step 0."""
    command = ["bash", str(REPO / "launch" / "torchrun.sh"), "2", *TINY, "trainer.max_steps=30"]
    env = job_env(tiny_cache)
    env.pop("OMNIMOE_RUN_DIR", None)
    launcher = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert launcher.poll() is None, launcher.communicate()
            metrics = list(tmp_path.glob("outputs/torchrun/*/metrics.jsonl"))
            if metrics and '"step": 2,' in metrics[0].read_text():
                break
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 75, err[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "torchrun").iterdir()
    stopped = json.loads((run_dir / "summary.json").read_text())["last_train"]["step"]
    assert stopped < 30
    hint = err.strip().splitlines()[-1]
    assert f"OMNIMOE_RUN_DIR=outputs/torchrun/{run_dir.name} " in hint, hint
    resumed = subprocess.run(
        ["bash", "-c", hint.split("to continue: ", 1)[1]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in (tmp_path / "outputs" / "torchrun").iterdir()] == [run_dir.name]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumes = [r for r in records if "resumed_from" in r]
    assert resumes == [{"step": stopped, "resumed_from": f"step_{stopped:08d}"}], resumes
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 31)), steps


def test_config_error_is_refused_once_before_any_rank_starts(
    tmp_path: Path, tiny_cache: Path
) -> None:
    """The layout rule broken here used to reach the console only when rank 0 printed it before
    torchrun SIGTERMed it; now the launcher checks the config for all ranks first."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            "bash", str(REPO / "launch" / "torchrun.sh"), "2", *TINY,
            "parallel=ep2_rows", "model.execution=token",
        ],
        cwd=tmp_path, env=job_env(tiny_cache, OMNIMOE_RUN_DIR=str(run_dir)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    # Only the error: the "output dir:" line a started run prints came before it.
    assert result.stderr.strip().splitlines() == [
        "omnimoe-train: error: model.execution: execution=token gathers from whole local tables: "
        "needs parallel.ep=1 (got 2)"
    ]
    assert result.stdout == ""
    assert not run_dir.exists()  # no rank started (their logs would be in run/logs)


def test_failed_rank_errors_repeats_the_line_the_console_did_not_show(tmp_path: Path) -> None:
    error = "omnimoe-train: error: data.dir: no shards"
    for rank, text in ((0, "step 1\n"), (1, f"loading\n{error}\n")):
        log = tmp_path / "run_x" / "attempt_0" / str(rank) / "stderr.log"
        log.parent.mkdir(parents=True)
        log.write_text(text)
    assert failed_rank_errors(str(tmp_path), 1) == [error]
    assert failed_rank_errors(str(tmp_path), 0) == []  # rank 0's output is on the console
    (tmp_path / "run_x" / "attempt_0" / "0" / "stderr.log").write_text(error + "\n")
    assert failed_rank_errors(str(tmp_path), 1) == []  # shown already
    assert failed_rank_errors(None, 1) == []


def test_sweep_under_torchrun_runs_every_job_in_one_sweep_dir(
    tmp_path: Path, tiny_cache: Path
) -> None:
    """The issue's repro: the second job used to hang (process group created twice)."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            "bash", str(REPO / "launch" / "torchrun.sh"), "2", "-m", *TINY,
            "trainer.max_steps=2", "trainer.seed=1,2",
        ],
        cwd=tmp_path, env=job_env(tiny_cache, OMNIMOE_SWEEP_DIR=str(sweep)),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.startswith(f"output dir: {sweep} (per-rank logs in {sweep}/logs)\n")
    jobs = sorted(p.name for p in sweep.iterdir() if p.name[0].isdigit())
    assert jobs == ["0_trainer.seed=1", "1_trainer.seed=2"]
    for job in jobs:
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["last_train"]["step"] == 2, summary
        steps = [json.loads(line)["step"] for line in (sweep / job / "metrics.jsonl").open()]
        assert steps[-1] == 2
    # Both ranks' output, per rank, under the sweep dir; the console showed rank 0 only.
    rank_logs = {p.parent.name for p in (sweep / "logs").rglob("stderr.log")}
    assert rank_logs == {"0", "1"}
    assert "[default1]" not in result.stdout + result.stderr


def test_sbatch_outside_slurm_says_how_to_submit(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), "model=tiny"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        "not inside a SLURM job" in result.stderr and "sbatch launch/slurm.sbatch" in result.stderr
    )
    assert not any(tmp_path.iterdir())
