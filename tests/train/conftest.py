from __future__ import annotations

from collections.abc import Iterator

import pytest
from hydra import compose, initialize_config_module

from omnimoe_train.cli import to_root_config
from omnimoe_train.config import RootConfig, register_configs

# A 2-layer GPT with a 64-expert OmniMoE MLP: the in-process model tests' default shape.
TINY_MODEL = (
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=96",
    "model.num_experts=64",
    "model.top_k=8",
    "data.seq_len=16",
)


def compose_config(*overrides: str) -> RootConfig:
    register_configs()
    with initialize_config_module(config_module="omnimoe_conf", version_base="1.3"):
        return to_root_config(compose(config_name="config", overrides=list(overrides)))


@pytest.fixture(scope="module")
def single_rank() -> Iterator[None]:
    """A one-process gloo world with megatron's parallel state (CPU patches if no GPU)."""
    from omnimoe_train.distributed import init_runtime, shutdown_runtime

    init_runtime(compose_config("trainer.device=cpu"))
    yield
    shutdown_runtime()
