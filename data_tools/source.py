"""Where a prepared dataset lives: a local folder or a webdataset URL.

``location`` is one of

* a local folder: ``data/mycorpus`` (files ``data/mycorpus/<name>``);
* a URL prefix with a scheme webdataset opens (``http://``, ``https://``, ``gs://``,
  ``ais://``, ``file://`` ...): the files are ``<prefix>/<name>``;
* a pattern containing ``{name}``, replaced by each file's name, e.g.
  ``pipe:aws s3 cp s3://bucket/corpus/{name} -`` or ``pipe:cat /mnt/corpus/{name}``.

Every file (``manifest.json`` beside the shards, then the shards themselves) is opened with
``webdataset.gopen``, so any URL scheme or ``pipe:`` command webdataset supports works. A
shard that cannot be opened or read gives a :class:`DataError` naming its URL.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

from .corpus import DataError
from .shards import MANIFEST_NAME, check_manifest
from .urls import NAME_FIELD, is_url

__all__ = ["DataSource", "is_url"]


class DataSource:
    """One prepared dataset: its manifest, and its files by name (local path or URL)."""

    def __init__(self, location: str | Path):
        text = str(location)
        self.location = text
        self.is_local = not is_url(text)
        if not self.is_local and NAME_FIELD not in text and text.startswith("pipe:"):
            raise DataError(
                f"{text}: a pipe: location must contain {NAME_FIELD} (replaced by each file "
                f"name, e.g. 'pipe:cat /data/corpus/{NAME_FIELD}')"
            )
        self.root = Path(text).expanduser() if self.is_local else None

    def __repr__(self) -> str:
        return f"DataSource({self.location!r})"

    def url(self, name: str) -> str:
        """The path (local) or URL that webdataset opens for file ``name``."""
        if self.root is not None:
            return str(self.root / name)
        if NAME_FIELD in self.location:
            return self.location.replace(NAME_FIELD, name)
        return self.location.rstrip("/") + "/" + name

    def local_path(self, name: str) -> Path | None:
        return None if self.root is None else self.root / name

    def read_bytes(self, name: str) -> bytes:
        """The whole file, through ``webdataset.gopen``; ``OSError``/``ValueError`` on failure."""
        import webdataset as wds

        with wds.gopen(self.url(name), "rb") as stream:
            return stream.read()

    @cached_property
    def manifest(self) -> dict:
        url = self.url(MANIFEST_NAME)
        if self.root is not None and not (self.root / MANIFEST_NAME).is_file():
            raise DataError(f"{url}: not found; prepare the data first (omnimoe-data prepare)")
        try:
            data = self.read_bytes(MANIFEST_NAME)
        except Exception as err:  # noqa: BLE001 - gopen raises OSError, ValueError, IOError
            raise DataError(f"{url}: cannot read manifest ({_reason(err)})") from None
        try:
            manifest = json.loads(data)
        except ValueError as err:
            raise DataError(f"{url}: cannot read manifest ({err})") from None
        return check_manifest(manifest, url)


# webdataset's gopen reports a failed pipe: command as "(('cmd',), {kwargs}): exit N (read) {}".
_PIPE_FAILED = re.compile(r"^\(\((['\"])(.*?)\1,\), \{.*\}\): exit (-?\d+)")


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    if text and (pipe := _PIPE_FAILED.match(text[0])):
        return f"the command '{pipe.group(2)}' exited with status {pipe.group(3)}"
    return text[0] if text else type(err).__name__
