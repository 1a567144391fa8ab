"""The error every configuration rule raises, and the two helpers the rule modules share."""

from __future__ import annotations

from omnimoe_train.config import RootConfig


class ConfigError(ValueError):
    """An invalid configuration value: ``key`` and the ``rule`` it breaks."""

    def __init__(self, key: str, rule: str) -> None:
        super().__init__(f"{key}: {rule}")
        self.key = key
        self.rule = rule


def config_value(cfg: RootConfig, dotted: str) -> object:
    """The value of a dotted key (``"data.seq_len"``) of the root config."""
    node: object = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def require(ok: bool, key: str, rule: str) -> None:
    """Raise :class:`ConfigError` (``key``, ``rule``) unless ``ok``."""
    if not ok:
        raise ConfigError(key, rule)
