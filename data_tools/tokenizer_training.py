"""Training the tokenizer on a corpus: the documents it sees, and ``omnimoe-data
train-tokenizer`` (a tokenizer alone, for ``--part`` preparations that must share one)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from .corpus import DataError
from .encode import block_texts
from .pack import stop_point
from .plan import DEFAULT_BLOCK_BYTES, plan_blocks
from .request import check_options, input_files
from .shards import file_in_the_way, replace_atomically, temp_path
from .tokenizer import train_tokenizer
from .workers import ordered_map, resolve_workers


def train_tokenizer_file(
    inputs: list[str | Path] | None,
    out_file: str | Path,
    *,
    vocab_size: int = 4096,
    text_field: str = "text",
    max_bytes: int | None = None,
    tokenizer_sample_bytes: int | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int | None = None,
) -> Path:
    """Trains the tokenizer ``prepare`` would train, alone (for ``--part`` runs)."""
    check_options(vocab_size, 1, 1, 0.0, block_bytes)
    out = Path(out_file)
    _check_out_file(out)
    files, _ = input_files(inputs, max_bytes)
    blocks = plan_blocks(files, block_bytes)
    docs = training_texts(
        blocks, text_field, max_bytes, tokenizer_sample_bytes, resolve_workers(workers)
    )
    tok = train_tokenizer(docs, vocab_size)
    if tok is None:
        raise DataError("no usable documents in the input", option="inputs")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(out, tok.to_str(pretty=True).encode())
    except OSError as exc:  # e.g. a full disk: the temporary file must not stay behind
        temp_path(out).unlink(missing_ok=True)
        raise DataError(f"{out}: cannot write ({exc.strerror or exc})", option="out") from exc
    return out


def _check_out_file(out: Path) -> None:
    """``--out`` of ``train-tokenizer`` must be a file that can be written: checked before the
    (costly) training, so that a folder given by mistake costs one line, not a traceback after
    it."""
    if out.is_dir():
        raise DataError(
            f"{out}: is a folder; give the tokenizer file to write, e.g. {out / 'tokenizer.json'}",
            option="out",
        )
    blocker = file_in_the_way(out.parent)
    if blocker is not None:
        raise DataError(f"{out}: {blocker} is not a folder", option="out")
    # No permission, a read-only or pseudo file system (/proc): found by making (and removing)
    # a folder in the nearest existing one, since os.access says yes to root there. Before, the
    # folder was first made after the training, and failed there with a traceback.
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".omnimoe-probe-", dir=existing))
    except OSError as exc:
        raise DataError(
            f"{out}: cannot be written ({exc.strerror or exc} in {existing})", option="out"
        ) from None


def training_texts(  # noqa: ANN202
    blocks,  # noqa: ANN001
    text_field,  # noqa: ANN001
    max_bytes,  # noqa: ANN001
    sample_bytes,  # noqa: ANN001
    workers,  # noqa: ANN001
    track=None,  # noqa: ANN001
    skips=None,  # noqa: ANN001
    should_stop=None,  # noqa: ANN001
):
    """Documents the tokenizer trains on: every document (up to ``max_bytes``), or from each
    block its leading documents in proportion to the block's size (``sample_bytes`` in all),
    so a sample spreads over the whole corpus rather than its first files. Raises
    :class:`PreparationStopped` (through the tokenizer's training, which passes it on) when
    ``should_stop()`` is true after a block."""
    total = sum(p.size for b in blocks for p in b) or 1
    tasks = []
    for block in blocks:
        limit = None
        if sample_bytes is not None:
            limit = max(1, math.ceil(sample_bytes * sum(p.size for p in block) / total))
        tasks.append((block, text_field, limit))
    used = 0
    pool = ordered_map(_texts_task, tasks, workers)
    results = track(pool, "training tokenizer", len(tasks)) if track is not None else pool
    try:
        for result in results:
            stop_point(should_stop)
            if skips is not None:
                for _, reason, message in result.skip_events:
                    skips.skip(reason, message)
            for text, size in zip(result.texts, result.sizes):
                used += size
                if max_bytes is not None and sample_bytes is None and used > max_bytes:
                    return
                yield text
    finally:
        pool.close()  # the worker pool ends here, not when a traceback lets go of it


def _texts_task(block, text_field, limit):  # noqa: ANN001, ANN202 - a picklable task
    return block_texts(block, text_field, limit_bytes=limit)
