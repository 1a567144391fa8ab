"""Random access to one split's samples by global sample id, with each shard verified once.

A split's samples are numbered ``0..N-1`` across its shards in manifest order; the manifest's
per-shard sample counts map an id to ``(shard, position)``. The first time a process touches
a shard, the whole shard is read once through ``webdataset.gopen`` and checked against the
manifest (size, sha256, member names and sizes: :func:`omnimoe_data.shards.index_shard`),
which also gives the byte offset of every sample. After that, samples are sliced out of a
read-only memory map of the file:

* **local shards** are mapped in place: memory is the OS page cache (shared by every rank
  and worker on the machine and given back under pressure), IO is one sequential read per
  shard per process for the check, then only the pages the order touches;
* **remote shards** (http, object stores, ``pipe:``) are copied once, verified, into a
  content-addressed disk cache ``<cache_dir>/<sha256>.tar`` (shared by the processes of a
  machine and by later runs), then mapped the same way. A global shuffle touches every shard
  early in the first epoch, so the cache grows to the dataset's size: keep the cache on a
  local disk with room for it. Streaming without a local copy would need a shard-local
  shuffle, which mixes batches less.

A shard that is missing or fails its check raises :class:`DataError` naming it; with
``skip_bad_shards`` it is reported once per process on stderr, counted in
:attr:`ShardStore.bad`, and the caller replaces its samples (see ``loader``).
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .corpus import DataError
from .shards import index_shard
from .source import DataSource

# Open memory maps kept per process (each holds one file descriptor).
_MAX_OPEN_MAPS = 64


class ShardStore:
    """The samples of split ``split`` of ``source``, by global sample id."""

    def __init__(
        self,
        source: DataSource,
        split: str,
        *,
        cache_dir: str | Path | None = None,
        skip_bad_shards: bool = False,
    ):
        manifest = source.manifest
        splits = manifest["splits"]
        if split not in splits:
            raise DataError(f"{source.location}: no split {split!r} (have {', '.join(splits)})")
        self.source = source
        self.split = split
        self.records: list[dict] = list(splits[split]["shards"])
        counts = np.array([r["samples"] for r in self.records], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_samples = int(self.starts[-1])
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.sample_len = int(manifest["sample_len"])
        self.skip_bad_shards = skip_bad_shards
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if not source.is_local and self.cache_dir is None:
            raise DataError(f"{source.location}: a remote dataset needs a shard cache folder")
        self.bad: dict[int, str] = {}  # shard index -> reason, found by this process
        self._offsets: dict[int, np.ndarray] = {}
        self._paths: dict[int, Path] = {}
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        if source.is_local:
            self._check_local_files()

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn get a copy without open maps.
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        return state

    def _check_local_files(self) -> None:
        """Cheap up-front check (stat only) so a missing or truncated local shard is named
        before training starts; the sha256 is checked when the shard is first read."""
        for i, record in enumerate(self.records):
            path = self.source.local_path(record["name"])
            try:
                size = path.stat().st_size
            except OSError:
                self._bad(i, "missing")
                continue
            if size != record["bytes"]:
                self._bad(i, f"has {size} bytes, the manifest says {record['bytes']}")

    def _bad(self, shard: int, reason: str) -> None:
        url = self.source.url(self.records[shard]["name"])
        if not self.skip_bad_shards:
            raise DataError(
                f"{url}: bad shard ({reason}); data.skip_bad_shards=true skips bad shards"
            )
        if shard not in self.bad:
            self.bad[shard] = reason
            print(
                f"omnimoe-data: warning: skipping bad shard {url} ({reason}); its samples are "
                f"replaced by later samples of the order",
                file=sys.stderr,
            )

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, ids, side="right") - 1

    def usable(self, shard: int) -> bool:
        """Verifies the shard on first use; ``False`` if it is bad (with skipping on)."""
        if shard in self.bad:
            return False
        if shard in self._offsets:
            return True
        record = self.records[shard]
        try:
            path, data = self._fetch(record)
            offsets = index_shard(data, record, dtype=self.dtype, sample_len=self.sample_len)
            if path is None:
                path = self._store_in_cache(record, data)
        except (OSError, ValueError) as err:
            self._bad(shard, _reason(err))
            return False
        self._offsets[shard] = offsets
        self._paths[shard] = path
        return True

    def read(self, ids: np.ndarray) -> np.ndarray:
        """``[len(ids), sample_len]`` rows for global sample ids whose shards are usable."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.sample_len), dtype=self.dtype)
        shards = self.shard_of(ids)
        nbytes = self.sample_len * self.dtype.itemsize
        for shard in np.unique(shards):
            if not self.usable(int(shard)):
                raise DataError(f"{self.records[shard]['name']}: read from a bad shard")
            rows = np.flatnonzero(shards == shard)
            mm = self._map(int(shard))
            offsets = self._offsets[int(shard)][ids[rows] - self.starts[shard]]
            for row, offset in zip(rows, offsets):
                out[row] = mm[offset : offset + nbytes].view(self.dtype)
        return out

    # -- internals ----------------------------------------------------------------------------
    def _fetch(self, record: dict) -> tuple[Path | None, bytes]:
        """(local path or None, bytes) of one shard: the file itself, or the disk cache copy
        when it is there, else a download through webdataset."""
        local = self.source.local_path(record["name"])
        if local is not None:
            return local, local.read_bytes()
        cached = self.cache_dir / f"{record['sha256']}.tar"
        if cached.is_file():
            return cached, cached.read_bytes()
        return None, self.source.read_bytes(record["name"])

    def _store_in_cache(self, record: dict, data: bytes) -> Path:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        final = self.cache_dir / f"{record['sha256']}.tar"
        # Several processes may fetch one shard at once: each writes its own temp file and
        # the renames are atomic, so the cache only ever holds verified, complete copies.
        tmp = self.cache_dir / f".{record['sha256']}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, final)
        return final

    def _map(self, shard: int) -> np.memmap:
        mm = self._maps.pop(shard, None)
        if mm is None:
            mm = np.memmap(self._paths[shard], dtype=np.uint8, mode="r")
            if len(self._maps) >= _MAX_OPEN_MAPS:
                self._maps.popitem(last=False)
        self._maps[shard] = mm
        return mm


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
