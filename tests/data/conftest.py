"""Fixtures for the data-tool tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import make_docs, write_txt_folder


@pytest.fixture
def txt_corpus(tmp_path: Path) -> Path:
    return write_txt_folder(tmp_path / "corpus", make_docs(60))
