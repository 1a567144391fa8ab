"""``merge``: parts prepared separately (``prepare --part i/n``) -> one dataset.

Each part holds the samples of a contiguous run of the corpus' blocks
(:mod:`omnimoe_data.plan`), and a block's samples depend on the block alone, so the parts'
shards concatenated in part order hold exactly the samples of a one-process preparation,
in the same order (only the shard boundaries differ: each part's last shard may be short,
which readers handle since the manifest gives every shard's sample count). Merging checks
that the parts come from one request and plan with one tokenizer and that every part is
there once, then hard-links (or copies, across file systems) their shards under new names
and writes the manifest last.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .corpus import DataError, SkipLog
from .pack import SPLITS
from .prepare import (
    PrepareResult,
    _remove_partial_dataset,
    _remove_previous_dataset,
    make_output_folder,
    write_manifest,
)
from .shards import TOKENIZER_NAME, load_manifest, shard_name

# Fields every part must share with the others.
_SHARED = (
    "version",
    "seq_len",
    "dtype",
    "vocab_size",
    "tokenizer_sha256",
    "eod_id",
    "request",
    "plan",
)
_SUMMED = ("samples", "tokens", "documents", "stream_tokens", "packed_streams", "dropped_tokens")


def merge(parts: list[str | Path], out_dir: str | Path) -> PrepareResult:
    """Merges the part folders into ``out_dir``; :class:`DataError` if they do not fit."""
    if not parts:
        raise DataError("merge: no part folders given")
    loaded = [(Path(p), load_manifest(p)) for p in parts]
    for path, manifest in loaded:
        if not manifest.get("part"):
            raise DataError(f"{path}: not a part (prepared without --part)")
    count = loaded[0][1]["part"]["count"]
    first_path, first = loaded[0]
    for path, manifest in loaded[1:]:
        for key in _SHARED:
            if manifest.get(key) != first.get(key):
                raise DataError(
                    f"{path}: {key} differs from {first_path}; parts must come from one "
                    f"corpus, options and tokenizer"
                )
        if manifest["part"]["count"] != count:
            raise DataError(f"{path}: part of {manifest['part']['count']}, not of {count}")
    by_index = {}
    for path, manifest in loaded:
        index = manifest["part"]["index"]
        if index in by_index:
            raise DataError(f"{path}: part {index}/{count} given twice")
        by_index[index] = (path, manifest)
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise DataError(f"merge: part(s) {', '.join(f'{i}/{count}' for i in missing)} missing")
    ordered = [by_index[i] for i in range(count)]

    out = Path(out_dir)
    if any(out.resolve() == path.resolve() for path, _ in ordered):
        raise DataError(f"{out}: the merged dataset must go to a new folder, not a part's")
    # Known from the manifests: refused before anything is written.
    if sum(manifest["splits"]["train"]["samples"] for _, manifest in ordered) == 0:
        raise DataError("merge: the training split of the parts has no samples")
    created = make_output_folder(out)
    _remove_previous_dataset(out)
    # As in prepare: a failure or an interrupt (a missing shard, a full disk, Ctrl-C) removes
    # what this call wrote, and the folder if it made it, so no half-merged dataset is left.
    try:
        shutil.copyfile(first_path / TOKENIZER_NAME, out / TOKENIZER_NAME)
        splits = {}
        skips = SkipLog()
        for split in SPLITS:
            merged: dict = {"shards": [], **dict.fromkeys(_SUMMED, 0)}
            for path, manifest in ordered:
                info = manifest["splits"][split]
                for key in _SUMMED:
                    merged[key] += info[key]
                for shard in info["shards"]:
                    name = shard_name(split, len(merged["shards"]))
                    _link_or_copy(path / shard["name"], out / name)
                    merged["shards"].append({**shard, "name": name})
            splits[split] = merged
        for _, manifest in ordered:
            skips.merge(SkipLog.from_dict(manifest["skipped"]))
        return write_manifest(out, {**first, "part": None, "merged_parts": count}, splits, skips)
    except BaseException:
        _remove_partial_dataset(out, created=created, tokenizer_file=True)
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link when both are on one file system (no copy of the data), else a copy;
    through a temp name, so ``dst`` is whole or absent."""
    if not src.is_file():
        raise DataError(f"{src}: shard missing")
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
