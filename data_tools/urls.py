"""Telling a dataset URL from a local path (no heavy imports: the CLI's config pre-check uses it).

A location is a URL when it holds ``{name}`` (a pattern such as ``pipe:cat /data/{name}``) or
starts with a scheme of two or more letters (``https:``, ``gs:``, ``pipe:``, ``file:`` ...; one
letter would be a Windows drive).
"""

from __future__ import annotations

import re
from pathlib import Path

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
NAME_FIELD = "{name}"


def is_url(location: str | Path) -> bool:
    text = str(location)
    return NAME_FIELD in text or bool(_SCHEME.match(text))
