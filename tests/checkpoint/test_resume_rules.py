"""Rerunning a run directory whose checkpoint does not call for training as is.

- A finished run (or one asked for fewer steps than its checkpoint has) prints one line and
  exits 0, leaving ``summary.json``, ``metrics.jsonl`` and ``config.yaml`` as they were.
- A checkpoint of another model shape or another engine: exit 2 with one line naming the key,
  before the model is built; layout and other non-shape keys may change. A checkpoint that does
  not record its config fails in the loader, also with one line.
- A changed learning-rate schedule (``trainer.max_steps``, ``optim.warmup_steps``...) is
  allowed, with one warning line naming the step from which it applies.
- A resumed run's summary keeps the run's initial val_loss and its total wall time.
- A helper process forked by the checkpoint writer dies with a kill -9 of the trainer.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from omnimoe_train.checkpoint.compat import (
    RunAlreadyComplete,
    check_data_order,
    check_resumable,
    schedule_change,
)
from omnimoe_train.checkpoint.session import CheckpointLoadError, data_order
from omnimoe_train.config import ModelConfig, OptimConfig
from omnimoe_train.metrics import logged_initial_val_loss
from tests.checkpoint.test_fault_tolerance import TINY, _cmd, _wait_for, records
from tests.cli_helpers import cli_env, run_train_cli

CKPT = Path("run/checkpoints/step_00000090")


def _meta(step: int = 90, engine: str | None = "megatron", **model: object) -> dict:
    saved = {**vars(ModelConfig(num_experts=64)), **model}
    return {"step": step, "engine": engine, "config": {"model": saved}}


def _check(meta: dict, *, engine: str = "megatron", max_steps: int = 100, **model: object) -> None:
    cfg = ModelConfig(**{"num_experts": 64, **model})
    check_resumable(CKPT, meta, engine=engine, model=cfg, max_steps=max_steps)


def test_model_shape_mismatch_names_the_key_and_both_values() -> None:
    with pytest.raises(CheckpointLoadError) as exc:
        _check(_meta(), num_experts=256)
    assert str(exc.value) == (
        f"checkpoint {CKPT} was written with model.num_experts=64, this run asks 256 "
        "(start a new run dir or match the model)"
    )
    with pytest.raises(CheckpointLoadError, match=r"model\.mlp=omnimoe, this run asks dense"):
        _check(_meta(), mlp="dense")
    with pytest.raises(
        CheckpointLoadError,
        match=r"model\.num_layers=4, model\.hidden_size=128, this run asks "
        r"model\.num_layers=2, model\.hidden_size=64",
    ):
        _check(_meta(), num_layers=2, hidden_size=64)


def test_non_shape_keys_and_other_mlps_keys_may_change() -> None:
    # top_k, the kernels, init and the keys of MLPs this model does not use shape nothing here.
    _check(_meta(), top_k=2, execution="token", init_std=0.1, pkm_heads=2, moe_num_experts=4)
    # moe_ffn_hidden_size None means ffn_hidden_size: the same width.
    _check(_meta(mlp="gshard", moe_ffn_hidden_size=None), mlp="gshard", moe_ffn_hidden_size=256)
    with pytest.raises(CheckpointLoadError, match=r"model\.moe_num_experts=8, this run asks 4"):
        _check(_meta(mlp="gshard"), mlp="gshard", moe_num_experts=4)


def test_another_data_seed_is_named_and_a_meta_without_it_is_not_refused() -> None:
    meta = {**_meta(), "config": {**_meta()["config"], "data": {"seed": 3}}}
    with pytest.raises(CheckpointLoadError) as exc:
        check_resumable(CKPT, meta, engine="megatron", model=ModelConfig(num_experts=64),
                        max_steps=100, data_seed=4)  # fmt: skip
    assert str(exc.value) == (
        f"checkpoint {CKPT} was written with data.seed=3, this run asks 4 "
        "(the data order depends on it: start a new run dir or match it)"
    )
    for same in (3, None):
        check_resumable(CKPT, meta, engine="megatron", model=ModelConfig(num_experts=64),
                        max_steps=100, data_seed=same)  # fmt: skip
    check_resumable(CKPT, _meta(), engine="megatron", model=ModelConfig(num_experts=64),
                    max_steps=100, data_seed=4)  # fmt: skip


def test_other_data_is_named_from_meta_and_an_older_meta_is_left_to_the_loader() -> None:
    state = {"data_ids": ["aa"], "weights": (1.0,), "seed": 0, "consumed_samples": 5}
    meta = {"data": data_order(state)}
    check_data_order(CKPT, meta, {**state, "consumed_samples": 0})  # the position may differ
    check_data_order(CKPT, {}, {**state, "seed": 9})  # no "data" in meta.json: not compared
    for key, value, name in (
        ("data_ids", ["bb"], "the datasets (data.dir / data.dirs / data.inputs)"),
        ("weights", [0.5, 0.5], "data.weights"),
        ("seed", 9, "data.seed"),
    ):
        with pytest.raises(CheckpointLoadError) as exc:
            check_data_order(CKPT, meta, {**state, key: value})
        assert str(exc.value).startswith(
            f"checkpoint {CKPT} was written reading other data: {name} differ ({key} "
        )


def test_other_engine_is_named() -> None:
    with pytest.raises(CheckpointLoadError) as exc:
        _check(_meta(engine="deepspeed"))
    assert str(exc.value) == (
        f"checkpoint {CKPT} was written by trainer.engine=deepspeed; "
        "set trainer.engine=deepspeed (or start a new run dir)"
    )


def test_zero0_against_a_zero_stage_is_named_and_stages_1_to_3_may_change() -> None:
    def meta(stage: int) -> dict:
        return {**_meta(engine="deepspeed"), "layout": {"engine": "deepspeed", "zero_stage": stage}}

    def check(saved: int, stage: int | None) -> None:
        check_resumable(CKPT, meta(saved), engine="deepspeed", model=ModelConfig(num_experts=64),
                        max_steps=100, zero_stage=stage)  # fmt: skip

    with pytest.raises(CheckpointLoadError) as exc:
        check(2, 0)
    assert str(exc.value) == (
        f"checkpoint {CKPT} was written with deepspeed.zero_optimization.stage=2, this run asks "
        "0: DeepSpeed converts only between stages 1-3 (or ZeRO-0 at any data-parallel size); "
        "set deepspeed=zero2 (or start a new run dir)"
    )
    with pytest.raises(CheckpointLoadError, match=r"stage=0, this run asks 3: .*deepspeed=zero0"):
        check(0, 3)
    for saved, stage in ((1, 3), (3, 2), (0, 0), (2, None)):
        check(saved, stage)


def test_zero0_in_another_precision_is_named_and_zero_1_to_3_may_change_it() -> None:
    def check(stage: int, saved_bf16: bool | None, bf16: bool) -> None:
        layout = {"engine": "deepspeed", "zero_stage": stage}
        if saved_bf16 is not None:
            layout["bf16"] = saved_bf16
        meta = {**_meta(engine="deepspeed"), "layout": layout}
        check_resumable(CKPT, meta, engine="deepspeed", model=ModelConfig(num_experts=64),
                        max_steps=100, zero_stage=stage, bf16=bf16)  # fmt: skip

    with pytest.raises(CheckpointLoadError) as exc:
        check(0, False, True)
    assert str(exc.value) == (
        f"checkpoint {CKPT} was written by ZeRO-0 in fp32, this run trains in bf16: ZeRO-0's "
        "files load only in the precision they were written in; set trainer.precision=fp32 "
        "(or start a new run dir)"
    )
    for stage, saved_bf16, bf16 in ((0, True, True), (0, None, True), (2, False, True)):
        check(stage, saved_bf16, bf16)


def test_old_meta_without_engine_or_config_is_not_refused() -> None:
    _check({"step": 10})
    _check({"step": 10, "engine": None, "config": {}}, num_experts=256)


@pytest.mark.parametrize(("step", "max_steps"), [(90, 90), (90, 60)])
def test_checkpoint_at_or_past_max_steps_is_complete(step: int, max_steps: int) -> None:
    with pytest.raises(RunAlreadyComplete) as exc:
        _check(_meta(step=step), max_steps=max_steps)
    assert str(exc.value) == (
        f"run already complete at step {step} >= trainer.max_steps={max_steps}; nothing to do"
    )
    _check(_meta(step=step), max_steps=step + 1)


def _schedule_meta(max_steps: int = 100, **optim: object) -> dict:
    return {
        "step": 90,
        "config": {"trainer": {"max_steps": max_steps}, "optim": {**vars(OptimConfig()), **optim}},
    }


def test_a_changed_schedule_is_one_warning_line_naming_the_step() -> None:
    assert schedule_change(CKPT, _schedule_meta(), optim=OptimConfig(), max_steps=100) is None
    # Old checkpoints (no config, or no optim section) have nothing to compare with.
    assert schedule_change(CKPT, {"step": 90}, optim=OptimConfig(), max_steps=200) is None
    longer = schedule_change(CKPT, _schedule_meta(), optim=OptimConfig(), max_steps=200)
    # WSD's stable phase ends at max_steps - max(1, int(decay_fraction * max_steps)).
    assert longer == (
        "warning: learning-rate schedule changes from step 90 on: trainer.max_steps 100 -> 200 "
        "(checkpoint step_00000090 was written with the old schedule); "
        "WSD decay now starts after step 160 (was 80)"
    )
    both = schedule_change(
        CKPT,
        _schedule_meta(warmup_steps=10),
        optim=OptimConfig(warmup_steps=30, decay_fraction=0.5),
        max_steps=100,
    )
    assert both is not None and "\n" not in both
    assert both.startswith(
        "warning: learning-rate schedule changes from step 90 on: "
        "optim.warmup_steps 10 -> 30, optim.decay_fraction 0.2 -> 0.5 "
    )
    assert both.endswith("WSD decay now starts after step 50 (was 80)")
    peak = schedule_change(CKPT, _schedule_meta(lr=1e-3), optim=OptimConfig(), max_steps=100)
    assert peak is not None and "optim.lr 0.001 -> 0.002" in peak and "WSD" not in peak


def test_the_resume_checks_import_neither_megatron_nor_triton() -> None:
    """The kernel tests' conftest sets TRITON_INTERPRET before Triton is first imported; a test
    module collected earlier that imports these checks must not import it first."""
    code = (
        "import sys, omnimoe_train.checkpoint.compat; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'triton')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_logged_initial_val_loss_takes_the_newest_fresh_start(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert logged_initial_val_loss(path) is None
    path.write_text(
        '{"step": 0, "val_loss": 7.5}\n{"step": 4, "loss": 7.0}\n{"step": 0, "val_loss": 6.25}\n'
        '{"step": 8, "val_lo'  # a killed run's half-written last line
    )
    assert logged_initial_val_loss(path) == 6.25


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, bytes]]:
    """A run of 8 steps (checkpoints at 4 and 8): its cache, its folder and its files."""
    cache, run = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("finished")
    first = run_train_cli([*_args(run), "trainer.max_steps=8"], cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    kept = {n: (run / n).read_bytes() for n in ("summary.json", "metrics.jsonl", "config.yaml")}
    return cache, run, kept


def _args(run: Path) -> list[str]:
    return [*TINY, "checkpoint.interval=4", f"hydra.run.dir={run}"]


def _files(run: Path, kept: dict[str, bytes]) -> dict[str, bytes]:
    return {n: (run / n).read_bytes() for n in kept}


@pytest.mark.parametrize("max_steps", [8, 4])
def test_rerun_of_a_finished_run_does_nothing(finished, max_steps: int) -> None:  # noqa: ANN001
    cache, run, kept = finished
    again = run_train_cli([*_args(run), f"trainer.max_steps={max_steps}"], cache=cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _one_line(again) == (
        f"omnimoe-train: run already complete at step 8 >= trainer.max_steps={max_steps}; "
        "nothing to do"
    )
    assert _files(run, kept) == kept  # summary, metrics and config untouched


@pytest.mark.parametrize(
    ("override", "phrase"),
    [
        ("model.num_experts=256", "model.num_experts=64, this run asks 256"),
        ("trainer.engine=deepspeed", "trainer.engine=megatron; set trainer.engine=megatron"),
        # Was taken silently: megatron's embedding load allows a shape mismatch (for padding)
        # and started the new rows at zero (a 1.79M -> 2.79M parameter model, a higher loss).
        ("model.vocab_size=1024", "model.vocab_size=512 (padded), this run asks 1024"),
        # Was refused by the loader only after the data and the model, without the key.
        ("data.seed=7", "data.seed=0, this run asks 7 (the data order depends on it"),
    ],
)
def test_resume_with_another_model_or_engine_is_one_line(finished, override, phrase) -> None:  # noqa: ANN001
    cache, run, kept = finished
    refused = run_train_cli([*_args(run), "trainer.max_steps=12", override], cache=cache)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = _one_line(refused)
    ckpt = run / "checkpoints" / "step_00000008"
    assert line.startswith(f"omnimoe-train: error: checkpoint.resume: checkpoint {ckpt} ")
    assert phrase in line
    assert _files(run, kept) == kept


def test_resume_onto_other_data_is_one_line_before_the_model(finished) -> None:  # noqa: ANN001
    """Was refused by the loader only after the model was built, without naming the key (and
    a progress bar line after the error)."""
    cache, run, kept = finished
    args = [*_args(run), "trainer.max_steps=12", "data.val_fraction=0.1"]  # other prepared data
    refused = run_train_cli(args, cache=cache)
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert lines[0].startswith("prepared ") and len(lines) == 2, refused.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_00000008"
    assert lines[1].startswith(
        f"omnimoe-train: error: checkpoint.resume: checkpoint {ckpt} was written reading other "
        "data: the datasets (data.dir / data.dirs / data.inputs) differ (data_ids ["
    )
    assert _files(run, kept) == kept


def test_a_checkpoint_without_its_config_still_fails_in_one_line(finished, tmp_path: Path) -> None:  # noqa: ANN001
    """An older ``meta.json`` (no ``config``) skips the shape check; the loader's error (torch's
    CheckpointException, not an ``Exception``) still becomes one line and exit 2."""
    cache, done, _ = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    meta_path = run / "checkpoints" / "step_00000008" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]
    meta_path.write_text(json.dumps(meta))
    refused = run_train_cli(
        [*_args(run), "trainer.max_steps=12", "model.num_experts=256"], cache=cache
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if "omnimoe-train: error:" in line]
    assert len(errors) == 1, refused.stderr[-3000:]
    assert "step_00000008 does not fit this run: Global shape mismatch" in errors[0]
    assert "decoder.layers.mlp.up_ND" in errors[0]


def test_continued_run_summary_covers_the_whole_run(finished, tmp_path: Path) -> None:  # noqa: ANN001
    cache, done, kept = finished
    run = tmp_path / "run"
    shutil.copytree(done, run)
    summary = json.loads(kept["summary.json"])
    # Another logging interval (not a shape key) is allowed.
    more = run_train_cli(
        [*_args(run), "trainer.max_steps=12", "trainer.log_interval=2"], cache=cache
    )
    assert more.returncode == 0, more.stderr[-3000:]
    # A longer run (torchtitan and Megatron allow it) is said once, at resume.
    schedule = [line for line in more.stderr.splitlines() if "learning-rate schedule" in line]
    assert schedule == [
        "warning: learning-rate schedule changes from step 8 on: trainer.max_steps 8 -> 12 "
        "(checkpoint step_00000008 was written with the old schedule); "
        "WSD decay now starts after step 10 (was 7)"
    ], more.stderr[-3000:]
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["initial_val_loss"] == summary["initial_val_loss"]
    assert resumed["resumed_from"] == "step_00000008"
    assert resumed["last_train"]["step"] == 12 and "final_val_loss" in resumed
    # The first process's time up to its step-8 checkpoint is counted too.
    assert resumed["wall_s"] > resumed["segment_wall_s"] > 0
    first_loss, last_loss = summary["initial_val_loss"], resumed["final_val_loss"]
    assert f"val_loss {first_loss:.3f} -> {last_loss:.3f}" in more.stderr
    assert [r["resumed_from"] for r in records(run) if "resumed_from" in r] == ["step_00000008"]


def test_kill_9_leaves_no_checkpoint_helper_behind(tmp_path: Path) -> None:
    cache, run = tmp_path / "cache", tmp_path / "run"
    args = [*TINY, "trainer.max_steps=100000", "checkpoint.interval=1", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(_cmd(*args), env=cli_env(cache), stderr=subprocess.DEVNULL)
    try:
        _wait_for(run / "checkpoints" / "step_00000001", proc)
        helpers = psutil.Process(proc.pid).children(recursive=True)
        assert helpers, "the checkpoint writer started no helper process (nothing to test)"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    alive = helpers
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.1)
    survivors = [p.pid for p in alive]
    for p in alive:  # do not leave them to the next test either
        p.kill()
    assert not survivors, f"helper processes outlived the trainer: {survivors}"


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
