"""Engines: how one optimizer step runs (see ``base.Engine``); ``trainer.py`` holds the loop."""

from omnimoe_train.engine.base import Engine

__all__ = ["Engine"]
