"""Per-block work of ``prepare``, run in worker processes (or inline for one worker).

A block's documents are read, checked, assigned to a split by a seeded hash of their text,
encoded, and returned as one token array in document order with per-document lengths, so
the main process can apply ``max_bytes`` exactly (it may cut the last block) and pack. The
result is a pure function of the block and the options: that is what makes the prepared
data independent of the worker count and of ``--part``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .corpus import Piece, SkipLog, read_piece

# Text per encode_batch call (characters): large enough to amortise the call, small for memory.
_ENCODE_BATCH_CHARS = 1 << 20
#: Longest text (characters) encoded in one call: an encoding holds far more than its ids per
#: token (offsets, token strings, masks), so one 21 MB document without newlines peaked at
#: 3.8 GB; longer documents are encoded in pieces (:func:`split_long`).
PIECE_CHARS = 1 << 18


@dataclass(frozen=True)
class EncodeOptions:
    text_field: str
    seed: int
    val_fraction: float
    eod_id: int
    dtype: str
    tokenizer_json: str


@dataclass
class BlockResult:
    """One block's documents, in order: ``tokens`` holds each document's ids followed by
    the end-of-document id; ``skip_events`` are ``(documents before it, reason, message)``."""

    tokens: np.ndarray
    doc_tokens: np.ndarray  # int64 [documents]
    doc_bytes: np.ndarray  # int64 [documents], UTF-8 bytes of the text
    doc_val: np.ndarray  # bool [documents]
    skip_events: list[tuple[int, str, str]] = field(default_factory=list)


class _EventLog(SkipLog):
    """A SkipLog that also remembers where (in documents) each skip happened."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, str, str]] = []
        self.documents = 0

    def skip(self, reason: str, message: str) -> None:
        self.events.append((self.documents, reason, message))


def is_val(data: bytes, seed: int, val_fraction: float) -> bool:
    """Held-out if a keyed hash of the document's UTF-8 text falls below ``val_fraction``:
    whole documents, duplicates on the same side, independent of order and workers."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(data, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


@dataclass
class BlockTexts:
    texts: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # UTF-8 bytes
    val: list[bool] = field(default_factory=list)
    skip_events: list[tuple[int, str, str]] = field(default_factory=list)


def block_texts(
    pieces: list[Piece],
    text_field: str,
    *,
    limit_bytes: int | None = None,
    split: tuple[int, float] | None = None,
) -> BlockTexts:
    """The block's documents; with ``limit_bytes`` only its leading documents up to and
    including the one that reaches it (a tokenizer sample); with ``split=(seed,
    val_fraction)`` also each document's split."""
    log = _EventLog()
    out = BlockTexts(skip_events=log.events)
    used = 0
    for piece in pieces:
        for _, text, data in read_piece(piece, text_field, log):
            out.texts.append(text)
            out.sizes.append(len(data))
            if split is not None:
                out.val.append(is_val(data, *split))
            log.documents += 1
            used += len(data)
            if limit_bytes is not None and used >= limit_bytes:
                return out
    return out


def _cut(text: str, lo: int, hi: int) -> int | None:
    """The last index in ``(lo, hi)`` of a single ``" "`` between two non-space characters,
    else the first such index from ``hi`` on; None when there is none after ``lo``."""
    i = text.rfind(" ", lo + 1, hi)
    while i > lo:
        if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", lo + 1, i)
    i = text.find(" ", hi)
    while i != -1:
        if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
            return i
        i = text.find(" ", i + 1)
    return None


def split_long(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """``text`` in pieces of about ``limit`` characters at most, each cut just before a single
    space between two non-space characters: a boundary of the byte-level pre-tokenizer (a word
    takes the space before it, `` ?\\p{L}+``), so the pieces' ids, concatenated, are the
    whole text's. A stretch without such a space is not cut (a piece may then be longer)."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > limit:
        cut = _cut(text, start, start + limit)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


@functools.lru_cache(maxsize=4)  # asked once per block; the JSON may be megabytes
def splits_at_spaces(tokenizer_json: str) -> bool:
    """Whether :func:`split_long`'s cuts are pre-tokenizer boundaries of this tokenizer: no
    normalizer, GPT-2's byte-level pre-tokenizer (its regex on), no added token but special
    ones (which encode as plain text here). Other tokenizers encode documents whole."""
    config = json.loads(tokenizer_json)
    pre = config.get("pre_tokenizer") or {}
    return (
        config.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True
        and all(token.get("special") for token in config.get("added_tokens") or [])
    )


_ENCODERS: dict[str, object] = {}


def init_worker() -> None:
    """One thread per worker process: the processes are the parallelism."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def _encoder(tokenizer_json: str):  # noqa: ANN202
    key = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if key not in _ENCODERS:
        from .tokenizer import text_encoder

        _ENCODERS.clear()
        _ENCODERS[key] = text_encoder(tokenizer_json)
    return _ENCODERS[key]


def encode_block(pieces: list[Piece], options: EncodeOptions) -> BlockResult:
    tok = _encoder(options.tokenizer_json)
    dtype = np.dtype(options.dtype)
    block = block_texts(pieces, options.text_field, split=(options.seed, options.val_fraction))
    texts, sizes = block.texts, block.sizes
    # (document, text) in order: a long document as several pieces, when that keeps its ids.
    cut = splits_at_spaces(options.tokenizer_json)
    parts = [
        (i, part)
        for i, text in enumerate(texts)
        for part in (split_long(text, PIECE_CHARS) if cut and len(text) > PIECE_CHARS else [text])
    ]
    ids: list[np.ndarray] = []
    doc_tokens = np.zeros(len(texts), dtype=np.int64)
    eod = np.array([options.eod_id], dtype=dtype)
    start = 0
    while start < len(parts):
        stop, batch_chars = start, 0
        while stop < len(parts) and batch_chars < _ENCODE_BATCH_CHARS:
            batch_chars += len(parts[stop][1])
            stop += 1
        batch = [text for _, text in parts[start:stop]]
        encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
        for k, enc in enumerate(encodings, start):
            i = parts[k][0]
            ids.append(np.array(enc.ids, dtype=dtype))
            doc_tokens[i] += len(enc.ids)
            if k + 1 == len(parts) or parts[k + 1][0] != i:  # the document's last piece
                ids.append(eod)
                doc_tokens[i] += 1
        start = stop
    tokens = np.concatenate(ids) if ids else np.empty(0, dtype=dtype)
    return BlockResult(
        tokens,
        doc_tokens,
        np.asarray(sizes, dtype=np.int64),
        np.asarray(block.val, dtype=bool),
        block.skip_events,
    )
