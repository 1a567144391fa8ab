"""Raw text input: finding input files and reading documents from them.

Supported inputs (files, or folders walked recursively in sorted order):

* ``.txt``: the whole file is one document.
* ``.jsonl``: one JSON object per line; the document is the value of the text field.
* ``.parquet``: one document per row of the text-field column.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")

# ~6 MB of stdlib source prepares in a few seconds on a 2-core CPU and is plenty for the
# tiny models of a smoke run.
DEFAULT_CORPUS_MAX_BYTES = 6_000_000

# Test suites and IDLE are skipped (large, repetitive fixtures), installed packages are
# not the stdlib, and `encodings` is generated codec tables rather than code.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "encodings"}
)


class DataError(Exception):
    """A problem with the user's data or options, reported as one line without a traceback."""


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


def resolve_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Expands folders into their supported files; every named path must exist."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in _walk(path) if p.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise DataError(f"{path}: folder holds no {', '.join(SUPPORTED_SUFFIXES)} files")
            files.extend(found)
        elif path.exists() or path.is_symlink():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise DataError(
                    f"{path}: unsupported input type {path.suffix or '(no extension)'!r}; "
                    f"expected one of {', '.join(SUPPORTED_SUFFIXES)}"
                )
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError("no input files given")
    return files


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
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
            f"default corpus: no stdlib source files under {root} fit in max_bytes={max_bytes}"
        )
    return selected


def iter_documents(
    files: Iterable[Path],
    *,
    text_field: str,
    skips: SkipLog,
    max_bytes: int | None = None,
    on_file_done: Callable[[Path], None] | None = None,
) -> Iterator[str]:
    """Yields the non-empty documents of ``files`` in order, recording skips in ``skips``.

    ``max_bytes`` stops before the first document that would take the UTF-8 total past it.
    """
    used = 0
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            docs = _read_jsonl(path, text_field, skips)
        elif suffix == ".parquet":
            docs = _read_parquet(path, text_field, skips)
        else:
            docs = _read_text(path, skips)
        for where, text in docs:
            if not text.strip():
                skips.skip("empty", f"{where}: empty document")
                continue
            if max_bytes is not None:
                used += len(text.encode("utf-8"))
                if used > max_bytes:
                    return
            yield text
        if on_file_done is not None:
            on_file_done(path)


def _read_bytes(path: Path, skips: SkipLog) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as err:
        skips.skip("unreadable", f"{path}: cannot read file ({err.strerror or err})")
        return None


def _read_text(path: Path, skips: SkipLog) -> Iterator[tuple[str, str]]:
    data = _read_bytes(path, skips)
    if data is None:
        return
    try:
        yield str(path), data.decode("utf-8")
    except UnicodeDecodeError as err:
        skips.skip("non_utf8", f"{path}: not valid UTF-8 (byte offset {err.start})")


def _read_jsonl(path: Path, text_field: str, skips: SkipLog) -> Iterator[tuple[str, str]]:
    data = _read_bytes(path, skips)
    if data is None:
        return
    for lineno, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{lineno}"
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


def _read_parquet(path: Path, text_field: str, skips: SkipLog) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except (OSError, pa.ArrowException) as err:
        skips.skip("unreadable", f"{path}: cannot read parquet file ({err})")
        return
    if text_field not in schema.names:
        skips.skip("missing_field", f"{path}: no {text_field!r} column")
        return
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        skips.skip("not_text", f"{path}: column {text_field!r} has type {column_type}")
        return
    row = 0
    try:
        for batch in parquet.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    skips.skip("missing_field", f"{path}: row {row}: {text_field!r} is null")
                else:
                    yield f"{path}: row {row}", text
                row += 1
    except (OSError, pa.ArrowException) as err:
        skips.skip("unreadable", f"{path}: cannot read parquet file after row {row} ({err})")
