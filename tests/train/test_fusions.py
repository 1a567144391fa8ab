"""Throughput levers on CPU (model/fusions.py): each gives the baseline's losses over three SGD
steps of a tiny model, and bad combinations are one-line config errors.

``trainer.compile`` is CUDA-only in a run; here the layers are compiled with the ``aot_eager``
backend, which checks dynamo's graph capture of megatron's layers and the numerics without
inductor's code generation (tests/train/test_fusions_gpu.py runs inductor on a GPU).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from omnimoe_train.model.fusions import LigerLossGPTModel, transformer_config_fusions
from omnimoe_train.validation import ConfigError, validate
from tests.train.conftest import compose_config
from tests.train.fusion_helpers import losses_in_subprocess, sgd_losses

# float32 on CPU: the fused paths reorder a few float operations (their first-step losses agree
# to ~1e-7); after two large SGD steps the OmniMoE router's top-K turns that into ~1e-5.
RTOL = 1e-4


@pytest.fixture(scope="module")
def baselines(single_rank: None) -> dict[str, list[float]]:
    return {mlp: sgd_losses(f"model.mlp={mlp}") for mlp in ("dense", "omnimoe")}


@pytest.mark.parametrize("mlp", ["dense", "omnimoe"])
@pytest.mark.parametrize("lever", ["model.fused_swiglu=true", "model.fused_cross_entropy=megatron"])
def test_megatron_fusions_match_baseline(
    baselines: dict[str, list[float]], mlp: str, lever: str
) -> None:
    losses = sgd_losses(f"model.mlp={mlp}", lever)
    assert losses == pytest.approx(baselines[mlp], rel=RTOL)
    assert losses[-1] < losses[0]  # it trains


def test_fusion_fields_reach_megatron() -> None:
    m = compose_config("model.fused_swiglu=true", "model.fused_cross_entropy=megatron").model
    assert transformer_config_fusions(m, "none") == {
        "bias_activation_fusion": True,
        "cross_entropy_loss_fusion": True,
        "cross_entropy_fusion_impl": "native",
    }
    defaults = transformer_config_fusions(compose_config().model, "none")
    assert not defaults["bias_activation_fusion"] and not defaults["cross_entropy_loss_fusion"]


@pytest.mark.parametrize(
    ("value", "mlp", "cuda_graphs", "fused"),
    [
        ("null", "omnimoe", "none", False),
        ("null", "omnimoe", "mlp", True),
        ("null", "dense", "mlp", False),
        ("false", "omnimoe", "mlp", False),
        ("true", "dense", "none", True),
    ],
)
def test_fused_swiglu_default_is_where_it_was_measured_to_pay(
    value: str, mlp: str, cuda_graphs: str, fused: bool
) -> None:
    """null (the default) fuses the OmniMoE MLP's shared SwiGLU exactly when the MLPs are
    graphed; true / false force it. The model is built from the resolved value."""
    from omnimoe_train.model.gpt import transformer_config

    cfg = compose_config(f"model.fused_swiglu={value}", f"model.mlp={mlp}")
    assert cfg.model.fused_swiglu is {"null": None, "true": True, "false": False}[value]
    cfg.trainer.cuda_graphs = cuda_graphs  # CUDA only: set past the config check
    assert transformer_config(cfg, bf16=False).bias_activation_fusion is fused


def test_fused_swiglu_rejects_non_booleans() -> None:
    cfg = compose_config()
    cfg.model.fused_swiglu = "yes"  # a config built in code: no typed schema in the way
    with pytest.raises(ConfigError, match="model.fused_swiglu: must be true, false or null"):
        validate(cfg, world_size=1, this_machine=False)


@pytest.mark.parametrize("mlp", ["dense", "omnimoe"])
def test_compiled_layers_match_baseline(baselines: dict[str, list[float]], mlp: str) -> None:
    torch._dynamo.reset()
    losses = sgd_losses(f"model.mlp={mlp}", "model.fused_swiglu=true", compile_backend="aot_eager")
    assert losses == pytest.approx(baselines[mlp], rel=RTOL)


def test_liger_cross_entropy_matches_baseline(baselines: dict[str, list[float]]) -> None:
    # The liger extra is part of the documented install (launch/setup_env.sh): a missing
    # package fails here rather than skipping the check.
    assert importlib.util.find_spec("liger_kernel") is not None, "pip install -e '.[liger]'"
    from omnimoe_train.model.gpt import build_model, transformer_config

    cfg = compose_config("model.fused_cross_entropy=liger", "trainer.device=cpu")
    model = build_model(cfg, transformer_config(cfg, bf16=False), vocab_size=128)
    assert isinstance(model, LigerLossGPTModel)
    # Liger's Triton kernels through Triton's CPU interpreter, which must be on before Triton
    # is first imported: a fresh process.
    losses = losses_in_subprocess(
        "model.mlp=dense", "model.fused_cross_entropy=liger", env={"TRITON_INTERPRET": "1"}
    )
    assert losses == pytest.approx(baselines["dense"], rel=RTOL)


@pytest.mark.parametrize(
    ("overrides", "world", "key"),
    [
        (("trainer.compile=layers", "trainer.device=cpu"), 1, "trainer.compile"),
        (("trainer.compile=fullgraph",), 1, "trainer.compile"),
        (("model.fused_cross_entropy=fused",), 1, "model.fused_cross_entropy"),
        (("model.fused_cross_entropy=liger", "parallel=tp2"), 2, "model.fused_cross_entropy"),
    ],
)
def test_bad_lever_settings_are_config_errors(
    overrides: tuple[str, ...], world: int, key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(*overrides), world_size=world)
    assert err.value.key == key and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "rule"),
    [
        (("trainer.engine=deepspeed",), "trainer.engine=megatron"),
        (("parallel=tp2",), "parallel.tp=1"),
        (("model.mlp=gshard",), "MoE layer"),
    ],
)
def test_compile_refuses_untraced_paths(
    monkeypatch: pytest.MonkeyPatch, overrides: tuple[str, ...], rule: str
) -> None:
    # As on a GPU machine: the CUDA rule passes, the next one must name the problem.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    world = 2 if "parallel=tp2" in overrides else 1
    with pytest.raises(ConfigError, match=rule) as err:
        validate(compose_config("trainer.compile=layers", *overrides), world_size=world)
    assert err.value.key == "trainer.compile"
