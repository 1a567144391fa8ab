"""Cutting a corpus into blocks: the unit of parallel work, of packing, and of ``--part``.

The input files (in order) are cut into :class:`~omnimoe_data.corpus.Piece` s of at most
about ``block_bytes`` (a ``.txt`` file whole, a ``.jsonl`` file in byte ranges, a
``.parquet`` file in runs of row groups), and consecutive pieces are grouped into blocks of
about ``block_bytes``. Each block is tokenized and packed into samples on its own (its
tail shorter than a sample is dropped and counted), so a block's samples depend on the
block alone: any number of worker processes, and any split of the blocks into parts
prepared on other machines (``--part i/n`` takes the ``i``-th of ``n`` contiguous runs of
blocks), gives the same samples in the same order as one process. The cost is at most one
sample's worth of tokens dropped per block and split (about 0.05% at the default 8 MiB
blocks and seq_len 1024).

The plan depends only on the files' names, sizes and parquet row groups, and on
``block_bytes``; its fingerprint is recorded in the manifest so ``merge`` can refuse parts
of different plans.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .corpus import DataError, Piece, parquet_row_groups

DEFAULT_BLOCK_BYTES = 8 << 20


def plan_pieces(files: list[Path], block_bytes: int) -> list[Piece]:
    pieces: list[Piece] = []
    for path in files:
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # unreadable: reading the piece records the skip
        kind = path.suffix.lower().lstrip(".")
        if kind == "jsonl" and size > block_bytes:
            for start in range(0, size, block_bytes):
                stop = min(start + block_bytes, size)
                pieces.append(Piece(str(path), kind, start, stop, stop - start))
        elif kind == "parquet":
            groups = parquet_row_groups(path)
            if not groups:
                pieces.append(Piece(str(path), kind, 0, max(len(groups or []), 1), size))
                continue
            first, acc = 0, 0
            for i, group_size in enumerate(groups):
                acc += group_size
                if acc >= block_bytes or i == len(groups) - 1:
                    pieces.append(Piece(str(path), kind, first, i + 1, acc))
                    first, acc = i + 1, 0
        else:
            pieces.append(Piece(str(path), "jsonl" if kind == "jsonl" else "txt", 0, size, size))
    return pieces


def plan_blocks(files: list[Path], block_bytes: int) -> list[list[Piece]]:
    """Consecutive pieces grouped into blocks of at least ``block_bytes`` (the last may be
    smaller); every block is non-empty."""
    if block_bytes < 1:
        raise DataError(f"block_bytes={block_bytes}: must be at least 1", option="block_bytes")
    blocks: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0
    for piece in plan_pieces(files, block_bytes):
        current.append(piece)
        size += piece.size
        if size >= block_bytes:
            blocks.append(current)
            current, size = [], 0
    if current:
        blocks.append(current)
    return blocks


def fingerprint(blocks: list[list[Piece]]) -> str:
    text = json.dumps([[list(vars(p).values()) for p in b] for b in blocks])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_part(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; :class:`DataError` otherwise."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise DataError(f"--part {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise DataError(f"--part {text!r}: need 0 <= i < n")
    return index, count


def part_range(num_blocks: int, index: int, count: int) -> tuple[int, int]:
    """Blocks ``[lo, hi)`` of part ``index`` of ``count`` (contiguous, sizes within one)."""
    return index * num_blocks // count, (index + 1) * num_blocks // count
