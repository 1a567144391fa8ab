"""Shared pytest setup.

- GPU tests are marked ``gpu`` and skipped only when no CUDA device exists.
- ``tests/kernels/conftest.py`` turns on Triton's CPU interpreter while the kernel tests are
  collected and run; after collection the variable goes back to what the user had, so every other
  test sees ``backend="auto"`` choose what a user's run would choose.
"""

from __future__ import annotations

import os

import pytest
import torch

_USER_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_collection_finish(session: pytest.Session) -> None:
    if _USER_TRITON_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _USER_TRITON_INTERPRET


@pytest.fixture(scope="module")
def cli_registered() -> None:
    """What ``omnimoe-train``'s ``main`` registers before its pre-check (the schema, our
    resolvers and launcher plugin): for tests that call ``cli.precheck`` in this process
    (``pytestmark = pytest.mark.usefixtures("cli_registered")``)."""
    from omnimoe_train import cli

    cli._register()
