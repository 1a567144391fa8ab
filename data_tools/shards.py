"""On-disk format of a prepared token dataset, written and read through ``webdataset``.

A dataset folder (or URL prefix, see :mod:`omnimoe_data.source`) holds::

    tokenizer.json           the tokenizer (``tokenizers`` format)
    train-000000.tar ...     training shards
    val-000000.tar ...       held-out shards (may be absent for a tiny corpus)
    manifest.json            written last; its presence marks a complete dataset

Each shard is a POSIX tar file in the webdataset layout, written by
``webdataset.TarWriter``: one member per sample, named ``<key>.tokens.u16`` (or
``.tokens.u32``). A member's payload is the raw little-endian token ids of one sample,
exactly ``seq_len + 1`` of them: the model reads ``[:-1]`` as inputs and ``[1:]`` as
labels. Token ids are ``uint16`` when the vocabulary has at most 65535 entries, else
``uint32``. Tar headers carry fixed metadata (mtime 0, mode 0644, empty user), so the same
input always gives byte-identical shards and sha256 sums.

The manifest lists every shard with its sample count, byte size and sha256: readers map a
split's global sample id to (shard, position) from the counts, and check each shard's
sha256 when they first read it (:func:`index_shard`). Shards are written to a hidden
``.<name>.tmp`` file and renamed once complete, so a crash never leaves a half-written
file under a shard's final name.
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
FORMAT_NAME = "omnimoe-tokens"
FORMAT_VERSION = 2
# Version 1 (hand-written tar files) has the same shard layout and manifest fields that a
# reader needs; it is still read.
READABLE_VERSIONS = (1, 2)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def sample_extension(dtype: np.dtype) -> str:
    return f"tokens.u{np.dtype(dtype).itemsize * 8}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def file_in_the_way(folder: Path) -> Path | None:
    """The existing file (not a folder) at ``folder`` or above it that stops ``folder`` from
    being made, or None (everything that exists on the way is a folder)."""
    for path in (folder, *folder.parents):
        if path.exists():  # False below a file (pathlib treats ENOTDIR as absent)
            return None if path.is_dir() else path
    return None


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def replace_atomically(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temp file and renames it over ``path``: readers never see half."""
    tmp = temp_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ShardWriter:
    """Writes the samples of one split into numbered shards of ``samples_per_shard``.

    Each shard is a ``webdataset.TarWriter`` stream into a temp file, renamed when complete.
    :meth:`close` ends the shard in progress (a later :meth:`write` starts the next one).
    Use as a context manager: on an exception the shard in progress is deleted.
    """

    def __init__(self, out_dir: Path, split: str, *, samples_per_shard: int, dtype: np.dtype):
        self.out_dir = Path(out_dir)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.extension = sample_extension(self.dtype)
        self.shards: list[dict] = []
        self.samples = 0
        self._tar = None  # webdataset.TarWriter of the shard in progress
        self._file = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def write(self, sample: np.ndarray) -> None:
        if self._tar is None:
            self._open()
        payload = np.ascontiguousarray(sample, dtype=self.dtype).tobytes()
        self._tar.write({"__key__": f"{self.samples:09d}", self.extension: payload})
        self.samples += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish()

    def write_rows(self, rows_NL: np.ndarray) -> None:
        """Writes every row of a ``[N, sample_len]`` array, in order."""
        for row in rows_NL:
            self.write(row)

    def close(self) -> list[dict]:
        """Completes the shard in progress (possibly short); returns one record per shard."""
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Deletes the shard in progress; finished shards stay (each one is complete)."""
        try:
            if self._tar is not None:
                self._tar.close()
            if self._file is not None:
                self._file.close()
        finally:
            self._tar = self._file = None
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
                self._tmp = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _open(self) -> None:
        import webdataset as wds

        final = self.out_dir / shard_name(self.split, len(self.shards))
        self._tmp = temp_path(final)
        # Stays open across write() calls; closed by _finish() or abort().
        self._file = open(self._tmp, "wb")  # noqa: SIM115
        # An integer mtime: a float one makes tarfile add a PAX header to every member.
        self._tar = wds.TarWriter(self._file, user="", group="", mode=0o644, encoder=False, mtime=0)
        self._in_shard = 0

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None and self._file is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.out_dir / shard_name(self.split, len(self.shards))
        digest = sha256_file(self._tmp)
        size = self._tmp.stat().st_size
        os.replace(self._tmp, final)
        self.shards.append(
            {"name": final.name, "samples": self._in_shard, "bytes": size, "sha256": digest}
        )
        self._tar = self._file = self._tmp = None


def index_shard(data: bytes, record: dict, *, dtype: np.dtype, sample_len: int) -> np.ndarray:
    """Checks one shard's bytes against its manifest ``record`` and returns the byte offset
    of every sample's payload (``int64 [samples]``), for random access into the same bytes.

    Raises :class:`ValueError` with the reason (size, sha256, member names or sizes, count).
    """
    if len(data) != record["bytes"]:
        raise ValueError(f"has {len(data)} bytes, the manifest says {record['bytes']}")
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ValueError("sha256 does not match the manifest")
    dtype = np.dtype(dtype)
    extension = "." + sample_extension(dtype)
    nbytes = sample_len * dtype.itemsize
    regular = _regular_offsets(data, record["samples"], nbytes, extension)
    if regular is not None:
        return regular
    offsets = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(extension):
                    raise ValueError(f"member {member.name!r} is not a {extension} sample")
                if member.size != nbytes:
                    raise ValueError(
                        f"member {member.name!r} has {member.size} bytes, expected {nbytes} "
                        f"({sample_len} tokens)"
                    )
                offsets.append(member.offset_data)
    except tarfile.TarError as err:
        raise ValueError(f"not a readable tar file ({err})") from err
    if len(offsets) != record["samples"]:
        raise ValueError(f"has {len(offsets)} samples, the manifest says {record['samples']}")
    return np.asarray(offsets, dtype=np.int64)


def _regular_offsets(data: bytes, count: int, nbytes: int, extension: str) -> np.ndarray | None:
    """Offsets of a shard in the layout our writer produces (one 512-byte header per member,
    payload padded to 512 bytes, zero blocks after the last member), checked on all headers
    at once; ``None`` if the shard is laid out otherwise (then tarfile parses it). Why: a
    per-member tarfile parse costs ~100 ms per 1024-sample shard, this ~1 ms."""
    stride = 512 + -(-nbytes // 512) * 512
    if count == 0 or len(data) < count * stride or data[count * stride :].strip(b"\0"):
        return None
    headers = np.frombuffer(data, np.uint8, count=count * stride).reshape(count, stride)[:, :512]
    size_field = np.frombuffer(f"{nbytes:011o}\0".encode(), np.uint8)
    if not (headers[:, 124:136] == size_field).all() or not (headers[:, 156] == ord("0")).all():
        return None
    name_len = np.argmin(headers[:, :100] != 0, axis=1)  # first NUL of the name field
    ext = np.frombuffer(extension.encode(), np.uint8)
    if (name_len <= len(ext)).any():
        return None
    tails = headers[np.arange(count)[:, None], name_len[:, None] - len(ext) + np.arange(len(ext))]
    if not (tails == ext).all():
        return None
    # The header checksum (bytes 148:156, octal): the sum of the header with that field as
    # spaces; tarfile checks it too, so a shard passing here also passes a tarfile read.
    checksum = headers.astype(np.int64).sum(axis=1) - headers[:, 148:156].sum(axis=1) + 8 * 32
    stored = [int(bytes(h[148:154]), 8) if bytes(h[148:154]).strip() else -1 for h in headers]
    if not np.array_equal(checksum, np.asarray(stored)):
        return None
    return np.arange(count, dtype=np.int64) * stride + 512


def read_shard(
    path: str | Path, *, dtype: np.dtype, sample_len: int, start: int = 0, stop: int | None = None
) -> np.ndarray:
    """Reads samples ``[start, stop)`` of a shard as a ``[n, sample_len]`` array, through
    webdataset's tar iterator (no manifest needed; the loader uses :func:`index_shard`)."""
    import webdataset as wds
    from webdataset.tariterators import tar_file_iterator

    dtype = np.dtype(dtype).newbyteorder("<")
    extension = "." + sample_extension(dtype)
    nbytes = sample_len * dtype.itemsize
    rows: list[np.ndarray] = []
    try:
        with wds.gopen(str(path), "rb") as stream:
            for index, member in enumerate(tar_file_iterator(stream)):
                if stop is not None and index >= stop:
                    break
                if index < start:
                    continue
                name, payload = member["fname"], member["data"]
                if not name.endswith(extension):
                    raise DataError(f"{path}: member {name!r} is not a {extension} sample")
                if len(payload) != nbytes:
                    raise DataError(
                        f"{path}: member {name!r} has {len(payload)} bytes, "
                        f"expected {nbytes} ({sample_len} tokens)"
                    )
                rows.append(np.frombuffer(payload, dtype=dtype))
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"{path}: cannot read shard ({err})") from err
    want = (stop if stop is not None else start + len(rows)) - start
    if len(rows) != want:
        raise DataError(f"{path}: has too few samples (wanted {start}..{start + want})")
    if not rows:
        return np.empty((0, sample_len), dtype=dtype)
    return np.stack(rows)


def check_manifest(manifest: object, where: str) -> dict:
    """The fields every reader relies on, or a :class:`DataError` naming what is wrong."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{where}: not an {FORMAT_NAME} manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise DataError(
            f"{where}: manifest version {manifest.get('version')!r} is not readable "
            f"(this version reads {', '.join(map(str, READABLE_VERSIONS))}); prepare it again"
        )
    try:
        for key in ("seq_len", "sample_len", "dtype", "vocab_size"):
            manifest[key]  # noqa: B018 - presence check
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                shard["name"], shard["samples"], shard["bytes"], shard["sha256"]  # noqa: B018
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{where}: manifest lacks {err}") from None
    return manifest


def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of a local dataset folder (see :func:`omnimoe_data.source.DataSource`
    for URLs)."""
    path = Path(data_dir) / MANIFEST_NAME
    try:
        return check_manifest(json.loads(path.read_text()), str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path}: not found; prepare the data first (omnimoe-data prepare)"
        ) from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read manifest ({err})") from err
