"""Packing a preparation's encoded documents into samples and writing them as shards.

Each block's documents, in block order, go to their split's token stream; every ``seq_len``
tokens of a stream start one sample of ``seq_len + 1`` tokens (the next-token targets overlap
by one), and the samples are written ``samples_per_shard`` to a shard. ``max_bytes`` cuts the
input at the document that crosses it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .corpus import PreparationStopped, SkipLog
from .shards import ShardWriter

SPLITS = ("train", "val")


def stop_point(should_stop: Callable[[], bool] | None) -> None:
    """Between two units of work: :class:`PreparationStopped` if ``should_stop()`` is true."""
    if should_stop is not None and should_stop():
        raise PreparationStopped("stopped on request; what this preparation wrote is removed")


def pack_and_write(
    results,  # noqa: ANN001 - iterator of encode.BlockResult in block order
    out: Path,
    *,
    dtype: np.dtype,
    seq_len: int,
    samples_per_shard: int,
    max_bytes: int | None,
    skips: SkipLog,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, dict]:
    """Pack ``results`` into samples and write the shards of both splits under ``out``; the
    splits' statistics (shards, samples, tokens, documents, dropped tokens). A failure or a
    stop (:class:`PreparationStopped`, checked before each block) removes the shards written."""
    writers = {
        s: ShardWriter(out, s, samples_per_shard=samples_per_shard, dtype=dtype) for s in SPLITS
    }
    stats = {s: dict.fromkeys(("documents", "stream_tokens", "packed_streams"), 0) for s in SPLITS}
    used = 0
    try:
        for result in results:
            stop_point(should_stop)  # before this block's shards: they would be removed
            cut = len(result.doc_bytes)
            if max_bytes is not None:
                running = used + np.cumsum(result.doc_bytes)
                over = np.flatnonzero(running > max_bytes)
                cut = int(over[0]) if len(over) else cut
                used = int(running[cut - 1]) if cut else used
            for position, reason, message in result.skip_events:
                if position <= cut:
                    skips.skip(reason, message)
            kept = result.tokens[: int(result.doc_tokens[:cut].sum())]
            is_val = np.repeat(result.doc_val[:cut], result.doc_tokens[:cut])
            for split, mask in (("train", ~is_val), ("val", is_val)):
                stream = kept[mask]
                s = stats[split]
                s["documents"] += int((result.doc_val[:cut] == (split == "val")).sum())
                s["stream_tokens"] += len(stream)
                count = (len(stream) - 1) // seq_len if len(stream) > seq_len else 0
                if count:
                    windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)
                    writers[split].write_rows(windows[::seq_len][:count])
                    s["packed_streams"] += 1
            if cut < len(result.doc_bytes):
                break  # max_bytes reached: later blocks are not read
        splits = {}
        for split, writer in writers.items():
            shards, s = writer.close(), stats[split]
            samples = writer.samples
            splits[split] = {
                "shards": shards,
                "samples": samples,
                "tokens": samples * (seq_len + 1),
                **s,
                "dropped_tokens": s["stream_tokens"] - samples * seq_len - s["packed_streams"],
            }
        return splits
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
