"""Bad parallel layouts stop in the single validation step: one line, exit 2, no process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from omnimoe_train.validation import ConfigError, validate
from tests.cli_helpers import assert_usage_error, run_train_cli
from tests.train.conftest import compose_config


@pytest.mark.parametrize(
    ("overrides", "world_size", "key", "fragment"),
    [
        # The world size is the launcher's: the key named is the parallel one the user set.
        (
            ["parallel.tp=3"],
            1,
            "parallel.tp",
            "parallel.tp*parallel.pp = 3*1 = 3 must divide the world size (the number of "
            "processes: 1); start a multiple of 3 processes or lower parallel.tp",
        ),
        (["parallel=tp2"], 3, "parallel.tp", "= 2*1 = 2 must divide the world size"),
        (["parallel.pp=2"], 1, "parallel.pp", "= 1*2 = 2 must divide the world size"),
        (
            ["parallel.tp=2", "parallel.pp=2"],
            6,
            "parallel.tp",
            "start a multiple of 4 processes or lower parallel.tp or parallel.pp",
        ),
        (
            ["parallel=tp2", "model.num_attention_heads=2", "model.num_query_groups=1"],
            2,
            "parallel.tp",
            "num_query_groups=1",
        ),
        (["parallel.tp=3"], 3, "parallel.tp", "num_attention_heads=4"),
        (["parallel.pp=3"], 3, "parallel.pp", "num_layers=4"),
        (["parallel.pp=8"], 8, "parallel.pp", "num_layers=4"),  # PP > layers
        (["parallel.ep=3", "parallel.expert_table_sharding=rows"], 3, "parallel.ep", "n = sqrt"),
        (["model.num_experts=4", "model.top_k=2", "parallel.ep=4"], 4, "parallel.ep", "<= n"),
        (
            ["parallel=tp2_ep2", "parallel.sequence_parallel=false"],
            4,
            "parallel.sequence_parallel",
            "needs sequence_parallel",
        ),
        (
            ["parallel=pp2_vpp2", "data.micro_batch_size=8", "data.global_batch_size=8"],
            2,
            "data.global_batch_size",
            "multiple of parallel.pp=2",
        ),
    ],
)
def test_bad_layout_is_one_config_error(
    overrides: list[str], world_size: int, key: str, fragment: str
) -> None:
    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world_size)
    message = str(info.value)
    assert info.value.key == key and fragment in message, message
    assert "\n" not in message


def test_init_runtime_validates_before_any_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    from omnimoe_train.distributed import init_runtime

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"^parallel\.tp: .* must divide the world size"):
        init_runtime(compose_config("parallel=tp2", "trainer.device=cpu"))
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("overrides", "world_size", "key"),
    [
        (["parallel=ep2_rows"], 3, "parallel.ep"),
        (["parallel.tp=3"], 1, "parallel.tp"),  # was "world_size: ..."
        (["parallel=mixed4", "model.num_layers=3"], 4, "parallel.pp"),
    ],
)
def test_cli_exits_2_with_one_line(
    tmp_path: Path, overrides: list[str], world_size: int, key: str
) -> None:
    result = run_train_cli(overrides, cache=tmp_path, world_size=world_size, timeout=120)
    assert_usage_error(result, f"omnimoe-train: error: {key}: invalid parallel layout", tmp_path)
