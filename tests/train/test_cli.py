"""``omnimoe-train`` end to end in a subprocess: config errors, a short run, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from omnimoe_train.checkpoint.files import find_problem
from tests.cli_helpers import assert_usage_error, run_train_cli

SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=128",
    "model.num_experts=256",
    "model.top_k=8",
    "data.vocab_size=512",
    "data.max_bytes=300000",
    "data.seq_len=64",
    "data.micro_batch_size=8",
    "data.global_batch_size=16",
    "optim.warmup_steps=4",
    "trainer.log_interval=5",
    "trainer.eval_interval=10",
    "trainer.eval_iters=4",
    "trainer.progress=false",
]


def omnimoe_train(args: list[str], cache: Path, timeout: int = 300):  # noqa: ANN201
    return run_train_cli(args, cache=cache, timeout=timeout)


@pytest.mark.parametrize(
    ("overrides", "world_size", "key"),
    [
        (["model.no_such_key=1"], 1, "model.no_such_key"),
        (["model.num_experts=1000"], 1, "model.num_experts"),
        (["model.top_k=0"], 1, "model.top_k"),
        (["model.top_k=2000"], 1, "model.top_k"),
        (["model.top_k=many"], 1, "model.top_k"),
        (["parallel.tp=8"], 8, "parallel.tp"),  # 4 heads do not split over 8 TP ranks
        (["data.micro_batch_size=8", "data.global_batch_size=12"], 1, "data.global_batch_size"),
        (["data.global_batch_size=8"], 2, "data.global_batch_size"),  # 8 % (8 * dp=2)
        (["logging.wandb.mode=sometimes"], 1, "logging.wandb.mode"),
        # Both once passed the rules and ended in a traceback from megatron / torch's AdamW.
        (["model.num_query_groups=0"], 1, "model.num_query_groups"),
        (["optim.beta2=1.5"], 1, "optim.beta2"),
    ],
)
def test_invalid_config_exits_2_with_one_line(
    tmp_path: Path, overrides: list[str], world_size: int, key: str
) -> None:
    result = run_train_cli(overrides, cache=tmp_path, world_size=world_size, timeout=120)
    assert_usage_error(result, f"omnimoe-train: error: {key}:", tmp_path)


def test_sweep_is_validated_before_any_run(tmp_path: Path) -> None:
    result = omnimoe_train(
        ["-m", "model.top_k=4,4096", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path
    )
    assert result.returncode == 2
    assert "model.top_k: must be in [1, model.num_experts=1024] (got 4096)" in result.stderr
    assert not (tmp_path / "sweep").exists()


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_short_run_trains_logs_checkpoints_and_resumes_exactly(tmp_path: Path) -> None:
    cache, run_a, run_b = tmp_path / "cache", tmp_path / "a", tmp_path / "b"
    common = [*SMALL, "trainer.max_steps=20", "checkpoint.interval=10", "checkpoint.keep=3"]
    a = omnimoe_train([*common, f"hydra.run.dir={run_a}", "logging.wandb.mode=offline"], cache)
    assert a.returncode == 0, a.stderr[-3000:]

    records = _records(run_a)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert [r["step"] for r in evals] == [0, 10, 20]
    for r in train:
        for key in (
            "step",
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "expert_usage",
            "unevenness",
            "router_entropy",
        ):
            assert isinstance(r[key], (int, float)), key
        assert 0.0 < r["expert_usage"] <= 1.0 and r["unevenness"] >= 0.0 and r["router_entropy"] > 0
    assert train[-1]["loss"] < train[0]["loss"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]

    assert (run_a / "config.yaml").read_text().count("vocab_size: 512") >= 1
    derived = yaml.safe_load((run_a / "config.yaml").read_text())["derived"]
    assert derived["fused_swiglu"] is False and derived["ep_overlap"] is False  # CPU: no graphs
    ckpts = sorted(p.name for p in (run_a / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000010", "step_00000020"]
    assert find_problem(run_a / "checkpoints" / "step_00000020") is None  # meta.json, checksums
    assert list((run_a / "wandb").glob("offline-run-*")), "no offline W&B run"
    assert (run_a / "wandb_run_id").read_text().strip()  # a rerun here continues this W&B run

    # Resume from step 10 in a fresh run directory: steps 15 and 20 must match run A exactly.
    resume = run_a / "checkpoints" / "step_00000010"
    b = omnimoe_train(
        [*common, f"hydra.run.dir={run_b}", f"checkpoint.resume={resume}", "logging=disabled"],
        cache,
    )
    assert b.returncode == 0, b.stderr[-3000:]
    b_train = {r["step"]: r["loss"] for r in _records(run_b) if "loss" in r}
    assert b_train == {r["step"]: r["loss"] for r in train if r["step"] > 10}


def test_help_names_the_command_and_its_usage(tmp_path: Path) -> None:
    """``--help`` leads with our name, usage and docs, not Hydra's generic banner."""
    result = run_train_cli(["--help"], cache=tmp_path / "cache", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("omnimoe-train: pretrain"), result.stdout[:200]
    assert "powered by Hydra" not in result.stdout
    assert "Usage: omnimoe-train" in result.stdout and "== Configuration groups ==" in result.stdout
    assert "parallel: dp2_distopt" in result.stdout
