"""DeepSpeed's own bool keys (``deepspeed.*``, free-form in our schema) take only true / false,
as ours do: pydantic's lax mode took ``yes``, ``on`` and ``1``. Which keys are bools comes from
DeepSpeed's config models (``engine.deepspeed_bools``). From the command line and from a YAML
file (a user's preset through ``hydra.searchpath``, where YAML 1.1 reads ``yes`` as true)."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnimoe_train.validation import ConfigError, validate
from tests.cli_helpers import precheck_line
from tests.train.conftest import compose_config

pytest.importorskip("deepspeed")

ZERO = "DeepSpeedZeroConfig"


@pytest.mark.parametrize(
    ("overrides", "key", "rule"),
    [
        (
            ["+deepspeed.zero_optimization.overlap_comm=yes"],
            "deepspeed.zero_optimization.overlap_comm",
            f"a bool key of DeepSpeed's {ZERO}: must be true, false or null (got 'yes')",
        ),
        (
            ["+deepspeed.zero_optimization.overlap_comm=1"],
            "deepspeed.zero_optimization.overlap_comm",
            f"a bool key of DeepSpeed's {ZERO}: must be true, false or null (got 1)",
        ),
        (  # an alias (the field is gather_16bit_weights_on_model_save)
            [
                "deepspeed=zero3",
                "+deepspeed.zero_optimization.stage3_gather_16bit_weights_on_model_save=2",
            ],
            "deepspeed.zero_optimization.stage3_gather_16bit_weights_on_model_save",
            f"a bool key of DeepSpeed's {ZERO}: must be true or false (got 2)",
        ),
        (  # a nested model
            [
                "deepspeed=zero2_offload",
                "deepspeed.zero_optimization.offload_optimizer.pin_memory=on",
            ],
            "deepspeed.zero_optimization.offload_optimizer.pin_memory",
            "a bool key of DeepSpeed's DeepSpeedZeroOffloadOptimizerConfig: must be true or false "
            "(got 'on')",
        ),
        (
            ["+deepspeed.wandb.enabled='true'"],
            "deepspeed.wandb.enabled",
            "a bool key of DeepSpeed's WandbConfig: must be true or false (got 'true')",
        ),
    ],
)
def test_deepspeed_bool_keys_are_strict(overrides: list[str], key: str, rule: str) -> None:
    cfg = compose_config("trainer.engine=deepspeed", *overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg, 1)
    assert (info.value.key, info.value.rule) == (key, rule)


def test_bools_and_null_pass() -> None:
    cfg = compose_config(
        "trainer.engine=deepspeed",
        "+deepspeed.zero_optimization.overlap_comm=null",
        "+deepspeed.zero_optimization.contiguous_gradients=False",
    )
    validate(cfg, 1)


@pytest.mark.usefixtures("cli_registered")
def test_a_bool_in_a_users_deepspeed_preset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    preset = tmp_path / "deepspeed"
    preset.mkdir()
    (preset / "mine.yaml").write_text("zero_optimization:\n  stage: 2\n  overlap_comm: yes\n")
    argv = [f"hydra.searchpath=[file://{tmp_path}]", "deepspeed=mine", "trainer.engine=deepspeed"]
    assert precheck_line(argv, capsys) == (
        "deepspeed.zero_optimization.overlap_comm: a bool key of DeepSpeed's "
        f"{ZERO}: must be true, false or null (got 'yes'); set in deepspeed/mine.yaml"
    )
