"""Raw text input: finding input files and reading documents from pieces of them.

Supported inputs (files, or folders walked recursively in sorted order):

* ``.txt``: the whole file is one document (a leading UTF-8 byte-order mark is dropped).
* ``.jsonl``: one JSON object per line; the document is the value of the text field. A
  leading byte-order mark is dropped; a large file is read in byte ranges (``Piece``), each
  holding the lines that start inside it, so no file is ever read whole.
* ``.parquet``: one document per row of the text-field column, read by row groups.

Other files in a folder are passed over, except compressed ones (``.gz``, ``.zst`` ...),
which are refused: they would be corpus silently left out.

Every document is checked to be encodable as UTF-8 (a JSON ``\\ud83d`` escape without its
pair is not) before it reaches the tokenizer.

Bad input that only spoils part of the corpus (an unreadable or non-UTF-8 file, a jsonl
line without the field, an empty document) is skipped and counted in a :class:`SkipLog`,
so one bad file does not stop a long run; the counts are reported at the end and kept in
the manifest. Input that cannot be used at all raises :class:`DataError`.

The embedded default corpus is the Python standard library's own source, which every
Python installation carries, so a fresh machine can prepare data without a download.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Compressed files are not read; in a folder they are refused rather than passed over like
# other files (a README), since a corpus.jsonl.gz is corpus a user expects to be read.
COMPRESSED_SUFFIXES = (
    ".gz",
    ".tgz",
    ".zst",
    ".zstd",
    ".bz2",
    ".xz",
    ".lz4",
    ".lzma",
    ".zip",
    ".7z",
)
BOM = b"\xef\xbb\xbf"

# ~6 MB of stdlib source prepares in a few seconds on a 2-core CPU and is plenty for the
# tiny models of a smoke run.
DEFAULT_CORPUS_MAX_BYTES = 6_000_000

# Test suites and IDLE are skipped (large, repetitive fixtures), installed packages are
# not the stdlib, and `encodings` is generated codec tables rather than code.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "encodings"}
)
_READ_CHUNK = 1 << 20


class DataError(Exception):
    """A problem with the user's data or options, reported as one line without a traceback.

    ``option``: the :func:`~omnimoe_data.prepare.prepare` argument at fault (``"inputs"``,
    ``"tokenizer"``, ``"out_dir"``, ``"seq_len"`` ...), where one is: a caller with its own
    names for them (the trainer's ``data.*`` keys) names it in its message."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class PreparationStopped(Exception):
    """``prepare`` stopped between two units of work (blocks) because its ``should_stop``
    said so (a stop signal to the process that prepares). What it had written is removed:
    the folder holds no dataset (no manifest), and the next ``prepare`` starts again."""


@dataclass
class SkipLog:
    """Counts skipped input by reason and keeps the first few messages as examples."""

    max_examples: int = 20
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    def merge(self, other: SkipLog) -> None:
        self.counts.update(other.counts)
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "nothing skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total} ({parts})"

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "by_reason": dict(sorted(self.counts.items())),
            "examples": list(self.examples),
        }

    @classmethod
    def from_dict(cls, data: dict) -> SkipLog:
        return cls(counts=Counter(data["by_reason"]), examples=list(data["examples"]))


@dataclass(frozen=True)
class Piece:
    """A part of one input file: ``.txt`` whole; ``.jsonl`` the lines starting in bytes
    ``[start, stop)``; ``.parquet`` row groups ``[start, stop)``. ``size`` is its byte size
    (for parquet, the row groups' uncompressed size), used to plan blocks."""

    path: str
    kind: str
    start: int
    stop: int
    size: int


def resolve_inputs(inputs: Iterable[str | Path], not_read: list[Path] | None = None) -> list[Path]:
    """Expands folders into their supported files; every named path must exist. A leading
    ``~`` is the home folder (as for ``data.dir`` and ``data.tokenizer``). ``not_read``, if
    given, receives the other files found in those folders (a README, a .csv), which the
    preparation counts as skipped instead of passing over them in silence."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            walked = list(_walk(path))
            compressed = [p for p in walked if p.suffix.lower() in COMPRESSED_SUFFIXES]
            if compressed:
                raise DataError(
                    f"{compressed[0]}: compressed input is not read ({len(compressed)} such "
                    f"file(s) under {path}); decompress them, or move them out of the folder",
                    option="inputs",
                )
            found = sorted(p for p in walked if p.suffix.lower() in SUPPORTED_SUFFIXES)
            _refuse_special_files(found)
            if not_read is not None:
                not_read.extend(p for p in walked if p.suffix.lower() not in SUPPORTED_SUFFIXES)
            if not found:
                raise DataError(
                    f"{path}: folder holds no {', '.join(SUPPORTED_SUFFIXES)} files",
                    option="inputs",
                )
            files.extend(found)
        elif path.exists() or path.is_symlink():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise DataError(
                    f"{path}: unsupported input type {path.suffix or '(no extension)'!r}; "
                    f"expected one of {', '.join(SUPPORTED_SUFFIXES)}",
                    option="inputs",
                )
            _refuse_special_files([path])
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder", option="inputs")
    if not files:
        raise DataError("no input files given", option="inputs")
    # A file named twice (or named and inside a folder named, or reached again through a
    # link) was read twice: its documents trained on twice as often as the rest, silently.
    seen: dict[str, Path] = {}
    for path in files:
        key = os.path.realpath(path)
        if key in seen:
            named = os.path.abspath(seen[key]) != os.path.abspath(path)
            also = f" (also as {seen[key]})" if named else ""
            raise DataError(
                f"{path}: given more than once (a file also named directly, inside another "
                f"folder given, or through a link){also}; name each input once",
                option="inputs",
            )
        seen[key] = path
    return files


def _refuse_special_files(paths: list[Path]) -> None:
    """A named pipe, socket or device among the inputs is refused: opening a pipe with no
    writer blocked the preparation forever, deaf to stop signals, and ``/dev/zero`` would be
    read without end; each input is read more than once (tokenizer, encoding) and in byte
    ranges, which only a regular file allows. A dangling link is left to the reading (a
    counted skip, as any unreadable file)."""
    for path in paths:
        if path.exists() and not path.is_file():
            raise DataError(
                f"{path}: not a regular file (a named pipe, socket or device, which cannot be "
                "read twice nor in byte ranges); copy its text to a file, or move it out",
                option="inputs",
            )


def _walk(root: Path) -> Iterator[Path]:
    """Every file under ``root`` in sorted order. Symlinked folders are followed (a corpus
    assembled from links was read without their files, silently), each real folder once, so
    a link to a folder above does not loop."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath, name)


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(max_bytes: int) -> list[Path]:
    """The stdlib ``.py`` files in sorted path order, up to ``max_bytes`` in total.

    Sorted order and a prefix cut make the selection deterministic for a given Python
    version, so repeated runs prepare identical data.
    """
    root = default_corpus_root()
    candidates: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
        candidates.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    candidates.sort()
    selected: list[Path] = []
    total = 0
    for path in candidates:
        size = path.stat().st_size
        if size == 0:
            continue  # empty package markers (__init__.py) are not documents
        if total + size > max_bytes:
            break
        selected.append(path)
        total += size
    if not selected:
        raise DataError(
            f"default corpus: no stdlib source files under {root} fit in max_bytes={max_bytes}",
            option="max_bytes",
        )
    return selected


def read_piece(piece: Piece, text_field: str, skips: SkipLog) -> Iterator[tuple[str, str, bytes]]:
    """Yields ``(where, text, text as UTF-8)`` for the non-empty documents of ``piece``."""
    if piece.kind == "jsonl":
        docs = _read_jsonl(piece, text_field, skips)
    elif piece.kind == "parquet":
        docs = _read_parquet(piece, text_field, skips)
    else:
        docs = _read_text(Path(piece.path), skips)
    for where, text in docs:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as err:
            # Only a JSON \u escape (four hex digits) can produce a lone surrogate: decoded bytes cannot.
            skips.skip(
                "unpaired_surrogate",
                f"{where}: text holds an unpaired UTF-16 surrogate "
                f"(U+{ord(text[err.start]):04X} at character {err.start})",
            )
            continue
        if not text.strip():
            skips.skip("empty", f"{where}: empty document")
            continue
        yield where, text, data


def _read_text(path: Path, skips: SkipLog) -> Iterator[tuple[str, str]]:
    try:
        data = path.read_bytes()
    except OSError as err:
        skips.skip("unreadable", f"{path}: cannot read file ({err.strerror or err})")
        return
    offset = len(BOM) if data.startswith(BOM) else 0
    try:
        yield str(path), data[offset:].decode("utf-8")
    except UnicodeDecodeError as err:
        skips.skip("non_utf8", f"{path}: not valid UTF-8 (byte offset {err.start + offset})")


def _jsonl_lines(piece: Piece) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, line)`` for each line that starts in ``[piece.start, piece.stop)``."""
    with open(piece.path, "rb") as f:
        pos = piece.start
        if pos > 0:  # the line containing byte start-1 belongs to the previous piece
            f.seek(pos - 1)
            f.readline()
            pos = f.tell()
        while pos < piece.stop:
            line = f.readline()
            if not line:
                return
            yield pos, line
            pos += len(line)


def _read_jsonl(piece: Piece, text_field: str, skips: SkipLog) -> Iterator[tuple[str, str]]:
    path = piece.path
    try:
        lines = _jsonl_lines(piece)
        lineno = 0
        for offset, raw in lines:
            lineno += 1
            # Line numbers are exact in the file's first piece; later pieces name the byte.
            where = f"{path}:{lineno}" if piece.start == 0 else f"{path}:byte {offset}"
            if offset == 0 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                skips.skip("non_utf8", f"{where}: not valid UTF-8 (byte offset {err.start})")
                continue
            except json.JSONDecodeError as err:
                skips.skip("invalid_json", f"{where}: invalid JSON ({err.msg})")
                continue
            if not isinstance(record, dict) or text_field not in record:
                skips.skip("missing_field", f"{where}: no {text_field!r} field")
                continue
            text = record[text_field]
            if not isinstance(text, str):
                skips.skip("not_text", f"{where}: field {text_field!r} is not a string")
                continue
            yield where, text
    except OSError as err:
        skips.skip("unreadable", f"{path}: cannot read file ({err.strerror or err})")


def parquet_row_groups(path: str | Path) -> list[int] | None:
    """Uncompressed byte size of each row group, or ``None`` if the file is unreadable
    (reading it then records the skip)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
        return [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
    except (OSError, pa.ArrowException):
        return None


def _read_parquet(piece: Piece, text_field: str, skips: SkipLog) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = piece.path
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(piece.start))
    except (OSError, pa.ArrowException) as err:
        skips.skip("unreadable", f"{path}: cannot read parquet file ({err})")
        return
    if text_field not in schema.names:
        if piece.start == 0:  # one skip per file, not per piece
            skips.skip("missing_field", f"{path}: no {text_field!r} column")
        return
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        if piece.start == 0:
            skips.skip("not_text", f"{path}: column {text_field!r} has type {column_type}")
        return
    binary = pa.large_binary() if pa.types.is_large_string(column_type) else pa.binary()
    row = first_row
    groups = list(range(piece.start, min(piece.stop, parquet.num_row_groups)))
    try:
        for batch in parquet.iter_batches(columns=[text_field], row_groups=groups):
            # Read as bytes and decode row by row: Arrow does not validate UTF-8 on read,
            # and one bad value must cost one skipped row, not the file.
            for value in batch.column(0).view(binary).to_pylist():
                where = f"{path}: row {row}"
                row += 1
                if value is None:
                    skips.skip("missing_field", f"{where}: {text_field!r} is null")
                    continue
                try:
                    yield where, value.decode("utf-8")
                except UnicodeDecodeError as err:
                    skips.skip("non_utf8", f"{where}: not valid UTF-8 (byte offset {err.start})")
    except (OSError, pa.ArrowException) as err:
        skips.skip("unreadable", f"{path}: cannot read parquet file after row {row} ({err})")
