"""On-disk format of a prepared token dataset.

A dataset folder holds::

    tokenizer.json           the tokenizer (``tokenizers`` format)
    train-000000.tar ...     training shards
    val-000000.tar ...       held-out shards (may be absent for a tiny corpus)
    manifest.json            written last; its presence marks a complete dataset

Each shard is a plain POSIX tar file in the webdataset layout: one member per sample,
named ``<key>.tokens.u16`` (or ``.tokens.u32``), where ``<key>`` is the sample's
zero-padded index within its split. A member's payload is the raw little-endian token
ids of one sample, exactly ``seq_len + 1`` of them: the model reads ``[:-1]`` as inputs
and ``[1:]`` as labels. Token ids are ``uint16`` when the vocabulary has at most 65535
entries, else ``uint32``. Tar headers carry fixed metadata (mtime 0, uid 0, mode 0644),
so the same input always gives byte-identical shards and sha256 sums.

Shards are written to a hidden ``.<name>.tmp`` file and renamed once complete, so a
crash never leaves a half-written file under a shard's final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from .corpus import DataError

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def sample_extension(dtype: np.dtype) -> str:
    return f"tokens.u{np.dtype(dtype).itemsize * 8}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ShardWriter:
    """Writes the samples of one split into numbered shards of ``samples_per_shard``.

    Use as a context manager: on an exception the shard in progress is deleted.
    """

    def __init__(self, out_dir: Path, split: str, *, samples_per_shard: int, dtype: np.dtype):
        self.out_dir = Path(out_dir)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.dtype = np.dtype(dtype)
        self.extension = sample_extension(self.dtype)
        self.shards: list[dict] = []
        self.samples = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def write(self, sample: np.ndarray) -> None:
        if self._tar is None:
            self._open()
        payload = np.ascontiguousarray(sample, dtype=self.dtype).tobytes()
        info = tarfile.TarInfo(f"{self.samples:09d}.{self.extension}")
        info.size = len(payload)
        info.mode = 0o644
        info.mtime = 0
        self._tar.addfile(info, io.BytesIO(payload))
        self.samples += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish()

    def close(self) -> list[dict]:
        """Completes the last (possibly short) shard; returns one record per shard."""
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Deletes the shard in progress; finished shards stay (each one is complete)."""
        try:
            if self._tar is not None:
                self._tar.close()
        finally:
            self._tar = None
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
                self._tmp = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _open(self) -> None:
        final = self.out_dir / shard_name(self.split, len(self.shards))
        self._tmp = temp_path(final)
        # Stays open across write() calls; closed by _finish() or abort().
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._in_shard = 0

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self.out_dir / shard_name(self.split, len(self.shards))
        digest = sha256_file(self._tmp)
        size = self._tmp.stat().st_size
        os.replace(self._tmp, final)
        self.shards.append(
            {"name": final.name, "samples": self._in_shard, "bytes": size, "sha256": digest}
        )
        self._tar = None
        self._tmp = None


def read_shard(
    path: Path, *, dtype: np.dtype, sample_len: int, start: int = 0, stop: int | None = None
) -> np.ndarray:
    """Reads samples ``[start, stop)`` of a shard as a ``[n, sample_len]`` array.

    The tar is read as a stream (members in order), so shards on slow or remote file
    systems are never seeked.
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    extension = "." + sample_extension(dtype)
    nbytes = sample_len * dtype.itemsize
    rows: list[np.ndarray] = []
    try:
        with tarfile.open(path, "r|") as tar:
            for index, member in enumerate(tar):
                if stop is not None and index >= stop:
                    break
                if index < start:
                    continue
                if not member.isfile() or not member.name.endswith(extension):
                    raise DataError(f"{path}: member {member.name!r} is not a {extension} sample")
                if member.size != nbytes:
                    raise DataError(
                        f"{path}: member {member.name!r} has {member.size} bytes, "
                        f"expected {nbytes} ({sample_len} tokens)"
                    )
                rows.append(np.frombuffer(tar.extractfile(member).read(), dtype=dtype))
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"{path}: cannot read shard ({err})") from err
    want = (stop if stop is not None else start + len(rows)) - start
    if len(rows) != want:
        raise DataError(f"{path}: has too few samples (wanted {start}..{start + want})")
    if not rows:
        return np.empty((0, sample_len), dtype=dtype)
    return np.stack(rows)


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path}: not found; prepare the data first (omnimoe-data prepare)"
        ) from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read manifest ({err})") from err
