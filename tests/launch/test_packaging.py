"""The package list in pyproject.toml names every Python package of the source folders.

setuptools installs only the packages listed there. A package left out still imports from a
source checkout (editable install, tests run at the repository root), but is missing from a
wheel and from jobs that import the installed package elsewhere: the SLURM and torchrun sweep
jobs failed that way when ``omnimoe_train/validation/`` was new.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_source_package_is_listed() -> None:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders = set(tool["packages"]), tool["package-dir"]
    found = set()
    for name, folder in folders.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            if any(part.startswith(".") or part == "__pycache__" for part in init.parts):
                continue
            relative = init.parent.relative_to(root).parts
            found.add(".".join((name, *relative)))
    assert found - listed == set(), "packages missing from pyproject.toml [tool.setuptools]"
