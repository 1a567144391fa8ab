"""Engines: how one optimizer step runs (see ``base.Engine``); ``trainer.py`` holds the loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omnimoe_train.config import RootConfig
    from omnimoe_train.distributed import Runtime
    from omnimoe_train.engine.base import Engine


def __getattr__(name: str) -> Any:
    # ``Engine`` (and with it torch) is imported on first use: config validation imports
    # ``engine.deepspeed_config``, which runs this ``__init__`` first, and the CLI's start (its
    # SIGTERM handler, a usage error's one line) would otherwise wait seconds for torch.
    if name == "Engine":
        from omnimoe_train.engine.base import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_engine(cfg: RootConfig, runtime: Runtime, vocab_size: int) -> Engine:
    """The one place that maps ``trainer.engine`` to an engine (validated before this)."""
    if cfg.trainer.engine == "deepspeed":
        from omnimoe_train.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, runtime, vocab_size)
    from omnimoe_train.engine.megatron import MegatronEngine

    return MegatronEngine(cfg, runtime, vocab_size)


__all__ = ["Engine", "build_engine"]
