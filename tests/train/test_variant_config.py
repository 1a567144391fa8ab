"""Config rules of the MLP variants and ablations (one-line ``ConfigError`` naming the key), and
the ready-made experiments: their sweeps expand to the intended jobs and are validated before any
run."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnimoe_train.cli import _sweep_combinations, _sweeper_params
from omnimoe_train.validation import ConfigError, validate
from tests.cli_helpers import run_train_cli
from tests.train.conftest import compose_config


@pytest.mark.parametrize(
    ("overrides", "world_size", "key", "rule"),
    [
        (["model.mlp=moe"], 1, "model.mlp", "must be one of"),
        (["model.router=sparse"], 1, "model.router", "must be one of"),
        (["model.mlp=peer", "model.router=dense"], 1, "model.router", "ablation of"),
        (["model.mlp=pkm", "model.execution=token"], 1, "model.execution", "atomic experts"),
        (
            ["model.execution=token", "parallel=ep2_rows", "data.micro_batch_size=8"],
            2,
            "model.execution",
            "parallel.ep=1",
        ),
        (["model.mlp=peer", "model.peer_heads=3"], 1, "model.top_k", "multiple of"),
        (["model.mlp=pkm", "model.pkm_key_dim=7"], 1, "model.pkm_key_dim", "even"),
        (["model.mlp=pkm", "model.num_experts=1000"], 1, "model.num_experts", "product-key"),
        (["model.mlp=gshard", "model.moe_top_k=9"], 1, "model.moe_top_k", "moe_num_experts=8"),
        (
            ["model.mlp=gshard", "model.moe_num_experts=5", "parallel=ep2_rows"],
            2,
            "model.moe_num_experts",
            "parallel.ep=2",
        ),
        (["model.mlp=deepseekmoe"], 1, "model.moe_shared_ffn_hidden_size", "shared experts"),
        (
            ["model.mlp=gshard", "model.moe_shared_ffn_hidden_size=64"],
            1,
            "model.moe_shared_ffn_hidden_size",
            "null",
        ),
        (
            ["model.mlp=gshard", "model.moe_aux_loss_coeff=-1"],
            1,
            "model.moe_aux_loss_coeff",
            ">= 0",
        ),
        (["model.mlp=gshard", "parallel=tp2"], 2, "parallel.sequence_parallel", "megatron"),
    ],
)
def test_variant_rules(overrides: list[str], world_size: int, key: str, rule: str) -> None:
    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world_size)
    assert err.value.key == key and rule in err.value.rule
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=a80m_gshard", "parallel=tp2_ep2"],
        ["model=a80m_deepseekmoe", "parallel=ep2_rows"],
        ["model=a80m_peer", "parallel=ep2_rows"],
        ["model=a80m_pkm", "parallel=tp2_sp"],
    ],
)
def test_matched_baselines_accept_parallel_layouts(overrides: list[str]) -> None:
    cfg = compose_config(*overrides)
    validate(cfg, world_size=4)


def test_experiments_expand_to_the_papers_tables() -> None:
    table1, swept = _sweep_combinations(_sweeper_params(["+experiment=table1_a200m"]))
    assert swept == ["model"]
    mlps = [compose_config(*combo, "+experiment=table1_a200m").model.mlp for combo in table1]
    assert mlps == ["dense", "gshard", "deepseekmoe", "pkm", "peer", "omnimoe"]
    table3, swept = _sweep_combinations(_sweeper_params(["+experiment=table3_a80m"]))
    assert swept == ["+ablation"]
    models = [compose_config(*combo, "+experiment=table3_a80m").model for combo in table3]
    assert [(m.shared_expert, m.router, m.execution) for m in models] == [
        (True, "cartesian", "expert"),
        (False, "cartesian", "expert"),
        (True, "dense", "expert"),
        (True, "cartesian", "token"),
    ]
    assert {m.name for m in models} == {"a80m"}


def test_experiment_sweep_is_validated_before_any_run(tmp_path: Path) -> None:
    # deepseekmoe's and gshard's top-6 / top-2 of 3 experts: the gshard job is fine, deepseekmoe's
    # is not; nothing may run.
    args = [
        "-m",
        "+experiment=table1_a80m",
        "model.moe_num_experts=3",
        f"hydra.sweep.dir={tmp_path}/s",
    ]
    result = run_train_cli(args, cache=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "omnimoe-train: error: model.moe_top_k: must be in [1, model.moe_num_experts=3] (got 6)"
    ]
    assert not (tmp_path / "s").exists()
