"""``trainer.engine=deepspeed``: ZeRO 0-3 train like the megatron engine; bad configs exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnimoe_train.validation import ConfigError, validate
from tests.cli_helpers import assert_usage_error, run_train_cli
from tests.train.conftest import compose_config

from .deepspeed_checks import (
    check_skip_and_norm,
    check_zero_stages,
    in_sequence,
    resume_and_continue,
    resume_in_other_precision,
    resume_with_a_failing_conversion,
    resume_with_a_shard_failing_on_rank1,
    save_and_continue,
)
from .distributed import run_distributed


def test_zero_stages_match_megatron_engine_at_dp2() -> None:
    run_distributed(check_zero_stages, 2, ["zero0", "zero1", "zero2", "zero3"], timeout_s=600)


def test_cpu_offload_matches_megatron_engine_at_dp2() -> None:
    run_distributed(check_zero_stages, 2, ["zero2_offload", "zero3_offload"], timeout_s=600)


def test_grad_norm_before_the_step_and_skipped_steps() -> None:
    runs = [("zero0", "fp32"), ("zero2", "fp32"), ("zero3_offload", "fp32")]
    runs += [("zero0", "bf16"), ("zero1", "bf16"), ("zero3", "bf16")]
    run_distributed(check_skip_and_norm, 2, runs, timeout_s=600)


@pytest.mark.parametrize(
    ("preset", "other_stage"),
    [("zero0", None), ("zero2", "zero3"), ("zero3", "zero1"), ("zero3_offload", "zero2")],
)
def test_checkpoint_resumes_bitwise_and_at_another_dp_size(
    tmp_path: Path, preset: str, other_stage: str | None
) -> None:
    """Saved at dp 2; loaded at dp 2 (DeepSpeed's files as they are), at dp 1 (through a
    universal checkpoint; ZeRO-0's files as they are) and at dp 1 under another ZeRO family
    (1-2 <-> 3: the universal checkpoint rewritten for it; an offloaded run's CPU Adam into
    torch's AdamW); in bf16 on its own layout; the consolidated weights equal the live ones."""
    from omnimoe_train.checkpoint.cli import BUFFER_SUFFIXES
    from omnimoe_train.engine.deepspeed_checkpoint import consolidate, tensor_sizes

    # Saved in one world; loaded in fresh processes (nothing of the saving run's memory): the
    # loads of each world size share one spawn.
    run_distributed(save_and_continue, 2, preset, tmp_path, timeout_s=600)
    at_dp2 = [(resume_and_continue, (preset, tmp_path))]
    at_dp2 += [(resume_in_other_precision, (preset, tmp_path, "bf16"))]
    run_distributed(in_sequence, 2, *at_dp2, timeout_s=600)
    at_dp1 = [(resume_and_continue, (preset, tmp_path))]
    if other_stage is not None:
        at_dp1 += [(resume_and_continue, (other_stage, tmp_path, preset))]
    run_distributed(in_sequence, 1, *at_dp1, timeout_s=600)
    live = torch.load(tmp_path / "reference.pt", weights_only=False)["live"]
    weights = consolidate(tmp_path / "step_00000002")
    assert set(live) <= set(weights)  # plus the router's BatchNorm statistics (buffers)
    for name, value in live.items():
        assert torch.equal(weights[name], value), name
    # omnimoe-ckpt inspect's counts (ZeRO-3: from the recorded shapes, not the placeholders).
    sizes = tensor_sizes(tmp_path / "step_00000002", BUFFER_SUFFIXES)
    assert sizes["model_parameters"] == sum(v.numel() for v in live.values())
    assert sizes["model_tensors"] == len(live)
    statistics = [v for k, v in weights.items() if k.endswith(BUFFER_SUFFIXES)]
    assert statistics and sizes["model_buffer_values"] == sum(v.numel() for v in statistics)


def test_a_failing_conversion_stops_every_rank_in_one_line(tmp_path: Path) -> None:
    """A dp-2 ZeRO-2 checkpoint loaded at ZeRO-3 (a conversion on rank 0) whose conversion
    fails: both ranks raise the same one-line error (exit 2 in a run), none hangs."""
    run_distributed(save_and_continue, 2, "zero2", tmp_path, timeout_s=600)
    run_distributed(resume_with_a_failing_conversion, 2, "zero3", tmp_path, timeout_s=120)


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_a_shard_failing_on_one_rank_stops_every_rank_in_one_line(
    tmp_path: Path, preset: str
) -> None:
    """A dp-2 checkpoint loaded on its own layout whose rank-1 partition fails on rank 1 alone
    (inside DeepSpeed's load; missing or corrupt before it): both ranks raise the same
    one-line error naming rank 1's cause (exit 2 in a run), none hangs or carries on."""
    run_distributed(save_and_continue, 2, preset, tmp_path, timeout_s=600)
    run_distributed(resume_with_a_shard_failing_on_rank1, 2, preset, tmp_path, timeout_s=180)


@pytest.mark.parametrize(
    ("overrides", "world_size", "key", "rule"),
    [
        (["parallel=tp2"], 2, "trainer.engine", "data parallel only"),
        (["parallel=pp2"], 2, "trainer.engine", "parallel.pp=2"),
        (["parallel=ep2_rows"], 2, "trainer.engine", "parallel.ep=2"),
        (["parallel=pp2_vpp2"], 2, "trainer.engine", "parallel.pp=2"),
        (["parallel=dp2_distopt"], 2, "trainer.engine", "shards the optimizer with ZeRO"),
        (["deepspeed.zero_optimization.stage=4"], 1, "deepspeed.zero_optimization.stage", "0, 1"),
        (
            ["deepspeed.zero_optimization.stage=true"],
            1,
            "deepspeed.zero_optimization.stage",
            "0, 1",
        ),
        (["deepspeed.zero_optimization.stage=2.0"], 1, "deepspeed.zero_optimization.stage", "0, 1"),
        (
            ["deepspeed=zero3_offload", "deepspeed.zero_optimization.stage=2"],
            1,
            "deepspeed.zero_optimization.offload_param",
            "needs ZeRO stage 3",
        ),
        (
            ["deepspeed=zero0", "+deepspeed.zero_optimization.offload_optimizer.device=cpu"],
            1,
            "deepspeed.zero_optimization.offload_optimizer",
            "stage 1, 2 or 3",
        ),
        (
            ["deepspeed=zero2_offload", "deepspeed.zero_optimization.offload_optimizer.device=gpu"],
            1,
            "deepspeed.zero_optimization.offload_optimizer.device",
            "cpu, nvme, none",
        ),
        (
            [
                "deepspeed=zero2_offload",
                "deepspeed.zero_optimization.offload_optimizer.device=nvme",
            ],
            1,
            "deepspeed.zero_optimization.offload_optimizer.device",
            "nvme needs ZeRO stage 3",
        ),
        (
            ["deepspeed=zero3_offload", "deepspeed.zero_optimization.offload_param.device=nvme"],
            1,
            "deepspeed.zero_optimization.offload_param.nvme_path",
            "is needed with device nvme",
        ),
        (["+deepspeed.train_batch_size=64"], 1, "deepspeed.train_batch_size", "data.global_batch"),
        (["+deepspeed.gradient_clipping=2.0"], 1, "deepspeed.gradient_clipping", "optim.clip_grad"),
        (["+deepspeed.fp16.enabled=true"], 1, "deepspeed.fp16", "trainer.precision"),
        (["+deepspeed.scheduler.type=WarmupLR"], 1, "deepspeed.scheduler", "WSD"),
        # Checked with DeepSpeed's own config models: a misspelt key, a bad value, a section.
        # At the top level (no DeepSpeed schema): a near miss of a key DeepSpeed reads.
        (
            ["+deepspeed.wall_clock_breakdwn=true"],
            1,
            "deepspeed.wall_clock_breakdwn",
            "did you mean deepspeed.wall_clock_breakdown?",
        ),
        (
            ["+deepspeed.activation_checkpointng.partition_activations=true"],
            1,
            "deepspeed.activation_checkpointng",
            "did you mean deepspeed.activation_checkpointing?",
        ),
        (
            ["+deepspeed.zero_optimization.stagee=2"],
            1,
            "deepspeed.zero_optimization.stagee",
            "unknown key (not in DeepSpeed's DeepSpeedZeroConfig)",
        ),
        (
            [
                "deepspeed=zero2_offload",
                "+deepspeed.zero_optimization.offload_optimizer.pin_memry=1",
            ],
            1,
            "deepspeed.zero_optimization.offload_optimizer.pin_memry",
            "unknown key",
        ),
        (
            ["+deepspeed.zero_optimization.overlap_comm=sometimes"],
            1,
            "deepspeed.zero_optimization.overlap_comm",
            "must be true, false or null (got 'sometimes')",
        ),
        (["+deepspeed.tensorboard.enabledd=true"], 1, "deepspeed.tensorboard.enabledd", "unknown"),
        # Sections DeepSpeed reads key by key (no pydantic model): checked against its constants.
        (
            ["+deepspeed.flops_profiler.enabeld=false"],
            1,
            "deepspeed.flops_profiler.enabeld",
            "did you mean deepspeed.flops_profiler.enabled?",
        ),
        (
            ["+deepspeed.activation_checkpointing.partition_activatons=true"],
            1,
            "deepspeed.activation_checkpointing.partition_activatons",
            "unknown key",
        ),
        (["+deepspeed.flops_profiler=true"], 1, "deepspeed.flops_profiler", "mapping"),
        # data_types.grad_accum_dtype: DeepSpeed raised these once the model was built.
        (
            ["+deepspeed.data_types.grad_accum_dtype=int8"],
            1,
            "deepspeed.data_types.grad_accum_dtype",
            "must be one of fp32, bf16, fp16 (got 'int8')",
        ),
        (
            ["deepspeed=zero0", "+deepspeed.data_types.grad_accum_dtype=fp16"],
            1,
            "deepspeed.data_types.grad_accum_dtype",
            "without ZeRO (deepspeed.zero_optimization.stage is 0) DeepSpeed accumulates "
            "gradients only in the model's dtype, fp32",
        ),
        (
            [
                "deepspeed=zero0",
                "trainer.precision=bf16",
                "+deepspeed.data_types.grad_accum_dtype=float32",
            ],
            1,
            "deepspeed.data_types.grad_accum_dtype",
            "only in the model's dtype, bf16 (trainer.precision; got 'float32')",
        ),
    ],
)
def test_deepspeed_config_rules(overrides: list[str], world_size: int, key: str, rule: str) -> None:
    cfg = compose_config("trainer.engine=deepspeed", *overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size)
    assert info.value.key == key and rule in info.value.rule, str(info.value)


def test_nvme_offload_needs_deepspeeds_async_io_op_on_this_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without it (no libaio) the engine failed with a RuntimeError traceback after the model
    was built; ``omnimoe-params`` (not this machine's run) does not ask."""
    import omnimoe_train.validation.engine as rules

    cfg = compose_config(
        "trainer.engine=deepspeed",
        "deepspeed=zero3_offload",
        "deepspeed.zero_optimization.offload_param.device=nvme",
        "+deepspeed.zero_optimization.offload_param.nvme_path=/nvme",
    )
    monkeypatch.setattr(rules, "_async_io_available", lambda: False)
    with pytest.raises(ConfigError) as info:
        validate(cfg, 1)
    assert info.value.key == "deepspeed.zero_optimization.offload_param.device"
    assert "async_io" in info.value.rule
    validate(cfg, 1, this_machine=False)
    monkeypatch.setattr(rules, "_async_io_available", lambda: True)
    validate(cfg, 1)


def test_presets_and_megatron_layouts_stay_valid() -> None:
    for preset in ("zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"):
        validate(compose_config("trainer.engine=deepspeed", f"deepspeed={preset}"), 1)
    # Valid keys DeepSpeed reads that no preset sets, at the top level and in a section.
    validate(
        compose_config(
            "trainer.engine=deepspeed",
            "+deepspeed.steps_per_print=10",
            "+deepspeed.wall_clock_breakdown=true",
            "+deepspeed.flops_profiler.enabled=false",
            "+deepspeed.flops_profiler.profile_step=2",
            "+deepspeed.activation_checkpointing.partition_activations=false",
        ),
        1,
    )
    # The deepspeed section is the DeepSpeed engine's only: megatron runs ignore it.
    validate(compose_config("parallel=tp2", "+deepspeed.train_batch_size=64"), 2)


def test_model_parallel_layout_exits_2_before_any_work(tmp_path: Path) -> None:
    result = run_train_cli(
        ["trainer.engine=deepspeed", "parallel=tp2"], cache=tmp_path, world_size=2, timeout=120
    )
    assert_usage_error(result, "omnimoe-train: error: trainer.engine: deepspeed is", tmp_path)


def test_grad_accum_dtype_that_passes_and_the_fp16_warning() -> None:
    """The model's dtype without ZeRO, any known dtype under ZeRO; fp16 under ZeRO is allowed
    with a one-line warning at the start (the engine prints it on the main rank)."""
    from omnimoe_train.engine.deepspeed_config import build_deepspeed_config, grad_accum_warning

    key = "+deepspeed.data_types.grad_accum_dtype"
    for overrides in (
        ["deepspeed=zero0", f"{key}=fp32"],
        ["deepspeed=zero0", "trainer.precision=bf16", f"{key}=bfloat16"],
        ["deepspeed=zero2", f"{key}=fp16"],
        ["deepspeed=zero3", "trainer.precision=bf16", f"{key}=fp32"],
    ):
        validate(compose_config("trainer.engine=deepspeed", *overrides), 1)
    cfg = compose_config("trainer.engine=deepspeed", "deepspeed=zero2", f"{key}=half")
    warning = grad_accum_warning(build_deepspeed_config(cfg, dp_size=1, bf16=False))
    assert warning is not None and "\n" not in warning
    assert warning.startswith("warning: deepspeed.data_types.grad_accum_dtype=half: ")
    for overrides in (["deepspeed=zero2"], ["deepspeed=zero2", f"{key}=fp32"]):
        ds = build_deepspeed_config(compose_config(*overrides), dp_size=1, bf16=True)
        assert grad_accum_warning(ds) is None
