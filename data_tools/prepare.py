"""``prepare``: raw text -> tokenizer + packed webdataset shards + manifest.

Pipeline: plan the corpus into blocks (:mod:`omnimoe_data.plan`), train a byte-level BPE
tokenizer on the corpus or on a sample of it (or load a given ``tokenizer.json``), then
encode the blocks in worker processes (:mod:`omnimoe_data.encode`) and, in block order,
pack each block's documents of each split into samples of ``seq_len + 1`` tokens with
stride ``seq_len`` (consecutive samples share one token, so every token of a block's
stream except the first is a label exactly once) and write them as shards
(:mod:`omnimoe_data.shards`). Each document ends with the end-of-document token; a block's
tail shorter than a sample is dropped and counted.

Inputs are streamed: a process holds a few blocks at a time (about ``2 x workers``), never
the corpus, whatever its size. The held-out split is made of whole documents chosen by a
seeded hash of their text, so no document contributes to both splits, and duplicates land
on the same side. ``manifest.json`` is written last through a temporary file and a rename;
a dataset folder without it is incomplete.

``should_stop`` (the trainer's stop request) is asked between two units of work: before
anything is read, after each block read for the tokenizer, after the tokenizer's training and
after each block encoded and written. When it says stop, :class:`PreparationStopped` is raised
and, as on any failure, what the call wrote is removed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from .corpus import SUPPORTED_SUFFIXES, DataError, PreparationStopped, SkipLog
from .encode import EncodeOptions, encode_block
from .pack import pack_and_write, stop_point
from .plan import DEFAULT_BLOCK_BYTES, fingerprint, part_range, plan_blocks
from .request import check_options, input_files, preparation_request
from .shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    replace_atomically,
    sample_extension,
    token_dtype,
)
from .tokenizer import find_eod, load_tokenizer, tokenizer_sha256, train_tokenizer
from .tokenizer_training import training_texts
from .workers import ordered_map, progress_bar, resolve_workers

__all__ = ["DataError", "PrepareResult", "PreparationStopped", "prepare"]

SUPPORTED_NOTE = f"only {', '.join(SUPPORTED_SUFFIXES)} files are read"
_STALE_FILE = re.compile(r"^\.?(train|val)-\d{6}\.tar(\.tmp)?$|^\..*\.json\.tmp$")


@dataclass
class PrepareResult:
    manifest_path: Path
    manifest: dict


def prepare(
    inputs: list[str | Path] | str | Path | None,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int = 4096,
    seq_len: int = 256,
    samples_per_shard: int = 1024,
    val_fraction: float = 0.02,
    text_field: str = "text",
    seed: int = 0,
    max_bytes: int | None = None,
    tokenizer_sample_bytes: int | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int | None = None,
    part: tuple[int, int] | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> PrepareResult:
    """Prepares ``inputs`` (files or folders; ``None``: the stdlib default corpus) into
    ``out_dir`` with ``workers`` processes (``None``: every core). ``part=(i, n)`` prepares
    only the ``i``-th of ``n`` parts (see :mod:`omnimoe_data.merge`). Raises
    :class:`DataError` on unusable input or options, and :class:`PreparationStopped` when
    ``should_stop()`` is true between two units of work (module docstring)."""
    check_options(vocab_size, seq_len, samples_per_shard, val_fraction, block_bytes)
    stop_point(should_stop)
    if tokenizer_sample_bytes is not None and tokenizer_sample_bytes < 1:
        raise DataError(
            f"tokenizer_sample_bytes={tokenizer_sample_bytes}: must be positive",
            option="tokenizer_sample_bytes",
        )
    if part is not None and tokenizer is None:
        raise DataError(
            "--part needs --tokenizer: every part must encode with one tokenizer "
            "(train it first: omnimoe-data train-tokenizer)"
        )
    if part is not None and max_bytes is not None:
        raise DataError("--part cannot be combined with --max-bytes (a cut across parts)")
    workers = resolve_workers(workers)
    not_read: list[Path] = []
    files, sources = input_files(inputs, max_bytes, not_read)
    request = preparation_request(
        inputs,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        seq_len=seq_len,
        samples_per_shard=samples_per_shard,
        val_fraction=val_fraction,
        text_field=text_field,
        seed=seed,
        max_bytes=max_bytes,
        tokenizer_sample_bytes=tokenizer_sample_bytes,
        block_bytes=block_bytes,
        files=files,
    )
    blocks = plan_blocks(files, block_bytes)
    lo, hi = part_range(len(blocks), *part) if part is not None else (0, len(blocks))
    out = Path(out_dir)
    created = make_output_folder(out)
    _remove_previous_dataset(out)

    # From here on a failure (bad input found late, a tokenizer error, an interrupt) removes
    # what this call wrote: the folder never holds a partial dataset that looks prepared, and a
    # folder made here is not left behind empty. The next call prepares again from scratch.
    wrote_tokenizer = False
    try:
        console = Console(stderr=True)
        with progress_bar(console, enabled=progress) as bar:
            if tokenizer is None:
                # The tokenizer sees held-out documents too, as is usual: the split keeps samples
                # apart, and a vocabulary carries no document content.
                scan = SkipLog()
                docs = training_texts(
                    blocks,
                    text_field,
                    max_bytes,
                    tokenizer_sample_bytes,
                    workers,
                    bar.track,
                    scan,
                    should_stop,
                )
                tok = train_tokenizer(docs, vocab_size)
                stop_point(should_stop)  # the merges may take long on a large corpus
                if tok is None:
                    raise DataError(
                        f"no usable documents in the input ({scan.summary()})", option="inputs"
                    )
            else:
                tok = load_tokenizer(tokenizer)
            eod_token, eod_id = find_eod(tok, tokenizer)
            actual_vocab = tok.get_vocab_size(with_added_tokens=True)
            dtype = token_dtype(actual_vocab)
            tokenizer_json = tok.to_str(pretty=True)
            replace_atomically(out / TOKENIZER_NAME, tokenizer_json.encode())
            wrote_tokenizer = True
            options = EncodeOptions(
                text_field, seed, val_fraction, eod_id, dtype.str, tokenizer_json
            )
            skips = SkipLog()
            if lo == 0:  # counted once, by the whole run or its first part
                for path in not_read:
                    skips.skip("not_a_corpus_file", f"{path}: not read ({SUPPORTED_NOTE})")
            results = ordered_map(encode_block, [(b, options) for b in blocks[lo:hi]], workers)
            try:
                splits = pack_and_write(
                    bar.track(results, "encoding", hi - lo),
                    out,
                    dtype=dtype,
                    seq_len=seq_len,
                    samples_per_shard=samples_per_shard,
                    max_bytes=max_bytes,
                    skips=skips,
                    should_stop=should_stop,
                )
            finally:
                # Now, not whenever the generator is collected: a stop or a failure ends the
                # worker pool (its pending blocks cancelled) before the files are removed.
                results.close()

        # A part may get no block at all (fewer blocks than parts: the corpus is smaller than
        # --part's count times --block-bytes); it is an empty part, which merge accepts.
        empty_part = part is not None and lo == hi
        if sum(s["documents"] for s in splits.values()) == 0 and not empty_part:
            raise DataError(
                f"no usable documents in the input ({skips.summary()})", option="inputs"
            )
        if splits["train"]["samples"] == 0 and part is None:
            raise DataError(
                f"input too small: the training split has {splits['train']['stream_tokens']} "
                f"tokens, fewer than one sample of seq_len+1={seq_len + 1}",
                option="inputs",
            )
        fields = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "seq_len": seq_len,
            "sample_len": seq_len + 1,
            "dtype": dtype.name,
            "sample_extension": sample_extension(dtype),
            "vocab_size": actual_vocab,
            "requested_vocab_size": vocab_size if tokenizer is None else None,
            "tokenizer": TOKENIZER_NAME,
            "tokenizer_trained": tokenizer is None,
            "tokenizer_sha256": tokenizer_sha256(tokenizer_json),
            "eod_token": eod_token,
            "eod_id": eod_id,
            "seed": seed,
            "val_fraction": val_fraction,
            "text_field": text_field,
            "max_bytes": max_bytes,
            "sources": sources,
            "request": request,
            "plan": {"blocks": len(blocks), "block_bytes": block_bytes, "id": fingerprint(blocks)},
            "part": None
            if part is None
            else {"index": part[0], "count": part[1], "blocks": [lo, hi]},
        }
        result = write_manifest(out, fields, splits, skips)
    except BaseException:
        # A given tokenizer may be the folder's own tokenizer.json (preparing again): kept.
        given = (
            tokenizer is not None and Path(tokenizer).resolve() == (out / TOKENIZER_NAME).resolve()
        )
        _remove_partial_dataset(out, created=created, tokenizer_file=wrote_tokenizer and not given)
        raise
    if progress:
        report(console, out, splits, skips)
    return result


def write_manifest(out: Path, fields: dict, splits: dict, skips: SkipLog) -> PrepareResult:
    """Write ``out/manifest.json`` (atomically, and last: its presence marks the dataset
    complete) holding ``fields``, the sample and token totals of ``splits``, the splits and the
    skip log. Used by ``prepare`` and ``merge``."""
    manifest = {
        **fields,
        "samples": sum(s["samples"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "splits": splits,
        "skipped": skips.to_dict(),
    }
    manifest_path = out / MANIFEST_NAME
    replace_atomically(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return PrepareResult(manifest_path=manifest_path, manifest=manifest)


def report(console: Console, out: Path, splits: dict[str, dict], skips: SkipLog) -> None:
    counts = ", ".join(
        f"{name} {s['samples']:,} samples ({s['documents']:,} docs)" for name, s in splits.items()
    )
    console.print(f"prepared {out}: {counts}; {skips.summary()}", highlight=False, soft_wrap=True)
    for example in skips.examples[:5]:
        console.print(f"  skipped {example}", markup=False, highlight=False, soft_wrap=True)


def make_output_folder(out: Path) -> bool:
    """Makes ``out`` (and its parents) if needed; True when this call created it. A folder that
    cannot be made (a file in the way, no permission) is a :class:`DataError` naming it."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"{out}: cannot create the output folder ({err.strerror or err})", option="out_dir"
        ) from err
    return created


def _remove_partial_dataset(out: Path, *, created: bool, tokenizer_file: bool) -> None:
    """After a failed ``prepare``: delete the files it wrote into ``out`` (shards, temp files,
    ``tokenizer.json`` when ``tokenizer_file``), never another file, and ``out`` itself when
    this call created it and nothing else is in it."""
    try:
        _remove_previous_dataset(out)  # the manifest, shards and temp files
        if tokenizer_file:
            (out / TOKENIZER_NAME).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    except OSError:
        pass  # the original error is the one to report; what is left has no manifest


def _remove_previous_dataset(out: Path) -> None:
    """Drops an older dataset's manifest first (so the folder never looks complete while
    it is rewritten), then its shards and any temp files of an interrupted run. A
    ``manifest.json`` that is not a dataset's (another tool's, in a folder given as the
    output by mistake) is a :class:`DataError`, not deleted."""
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        try:  # written atomically: never half a dataset's manifest
            ours = json.loads(manifest.read_bytes()).get("format") == FORMAT_NAME
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DataError(
                f"{out}: holds a {MANIFEST_NAME} that is not a prepared dataset's; give an "
                f"output folder of its own",
                option="out_dir",
            )
    manifest.unlink(missing_ok=True)
    for path in out.iterdir():
        if _STALE_FILE.match(path.name) and path.is_file():
            path.unlink()
