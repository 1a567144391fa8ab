"""``prepare``: raw text -> tokenizer + packed webdataset shards + manifest.

Pipeline: read documents (:mod:`omnimoe_data.corpus`), train a byte-level BPE tokenizer
on them (or load a given ``tokenizer.json``), encode each document and append the
end-of-document token, then pack each split's token stream into samples of
``seq_len + 1`` tokens with stride ``seq_len`` (consecutive samples share one token, so
every token except the very first is a label exactly once) and write them as shards
(:mod:`omnimoe_data.shards`). The tail shorter than a sample is dropped and counted.

The held-out split is made of whole documents chosen by a seeded hash of their text, so
no document contributes to both splits, and duplicates land on the same side.

``manifest.json`` is written last through a temporary file and a rename; a dataset
folder without it is incomplete and :func:`is_prepared` reports ``False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .corpus import (
    DEFAULT_CORPUS_MAX_BYTES,
    DataError,
    SkipLog,
    default_corpus_files,
    iter_documents,
    resolve_inputs,
)
from .shards import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    ShardWriter,
    sample_extension,
    temp_path,
    token_dtype,
)

__all__ = ["DataError", "PrepareResult", "default_corpus_files", "is_prepared", "prepare"]

FORMAT_NAME = "omnimoe-tokens"
FORMAT_VERSION = 1
EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens recognised in a user-supplied tokenizer, in order of preference.
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
SPLITS = ("train", "val")
_ENCODE_BATCH_BYTES = 1 << 20  # big enough for encode_batch's threads, small for memory
_STALE_FILE = re.compile(r"^\.?(train|val)-\d{6}\.tar(\.tmp)?$|^\..*\.json\.tmp$")


@dataclass
class PrepareResult:
    manifest_path: Path
    manifest: dict


def prepare(
    inputs: list[str | Path] | None,
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
    progress: bool = True,
) -> PrepareResult:
    """Prepares ``inputs`` (files or folders; ``None``: the stdlib default corpus) into
    ``out_dir``. Raises :class:`DataError` on unusable input or options."""
    _check_options(vocab_size, seq_len, samples_per_shard, val_fraction)
    if inputs is None:
        files = default_corpus_files(max_bytes or DEFAULT_CORPUS_MAX_BYTES)
        sources: list[str] | dict = {
            "kind": "python-stdlib",
            "python": platform.python_version(),
            "files": len(files),
        }
    else:
        if isinstance(inputs, str | Path):  # a single path from a config file
            inputs = [inputs]
        files = resolve_inputs(inputs)
        sources = [str(p) for p in inputs]
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{out}: cannot create the output folder ({err.strerror or err})") from err
    _remove_previous_dataset(out)

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=True,
    ) as bar:

        def documents(description: str, skips: SkipLog) -> Iterator[str]:
            task = bar.add_task(description, total=len(files))
            yield from iter_documents(
                files,
                text_field=text_field,
                skips=skips,
                max_bytes=max_bytes,
                on_file_done=lambda _: bar.advance(task),
            )
            bar.update(task, completed=len(files))

        if tokenizer is None:
            # The tokenizer sees every document, held-out ones included, as is usual: the
            # split keeps samples apart, and a vocabulary carries no document content.
            scan = SkipLog()
            tok = _train_tokenizer(documents("training tokenizer", scan), vocab_size)
            if tok is None:
                raise DataError(f"no usable documents in the input ({scan.summary()})")
        else:
            tok = _load_tokenizer(Path(tokenizer))
        eod_token, eod_id = _find_eod(tok, tokenizer)
        actual_vocab = tok.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(actual_vocab)
        tmp = temp_path(out / TOKENIZER_NAME)
        tok.save(str(tmp))
        os.replace(tmp, out / TOKENIZER_NAME)

        skips = SkipLog()
        splits = _encode_and_write(
            documents("encoding", skips),
            tok,
            out,
            eod_id=eod_id,
            dtype=dtype,
            seq_len=seq_len,
            samples_per_shard=samples_per_shard,
            val_fraction=val_fraction,
            seed=seed,
        )

    documents_total = sum(s["documents"] for s in splits.values())
    if documents_total == 0:
        raise DataError(f"no usable documents in the input ({skips.summary()})")
    if splits["train"]["samples"] == 0:
        raise DataError(
            f"input too small: the training split has {splits['train']['stream_tokens']} "
            f"tokens, fewer than one sample of seq_len+1={seq_len + 1}"
        )
    manifest = {
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
        "eod_token": eod_token,
        "eod_id": eod_id,
        "seed": seed,
        "val_fraction": val_fraction,
        "text_field": text_field,
        "max_bytes": max_bytes,
        "sources": sources,
        "samples": sum(s["samples"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "splits": splits,
        "skipped": skips.to_dict(),
    }
    manifest_path = out / MANIFEST_NAME
    tmp = temp_path(manifest_path)
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    if progress:
        _report(console, out, splits, skips)
    return PrepareResult(manifest_path=manifest_path, manifest=manifest)


def _report(console: Console, out: Path, splits: dict[str, dict], skips: SkipLog) -> None:
    counts = ", ".join(
        f"{name} {s['samples']:,} samples ({s['documents']:,} docs)" for name, s in splits.items()
    )
    console.print(f"prepared {out}: {counts}; {skips.summary()}", highlight=False, soft_wrap=True)
    for example in skips.examples[:5]:
        console.print(f"  skipped {example}", markup=False, highlight=False, soft_wrap=True)


def is_prepared(out_dir: str | Path, *, seq_len: int, vocab_size: int | None = None) -> bool:
    """True when ``out_dir`` holds a complete dataset with these settings.

    ``vocab_size`` matches either the size asked of the tokenizer trainer or the actual
    vocabulary. Shards are checked for presence and size; ``omnimoe-data inspect``
    verifies their checksums.
    """
    out = Path(out_dir)
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
            return False
        if manifest["seq_len"] != seq_len:
            return False
        if vocab_size is not None and vocab_size not in (
            manifest["vocab_size"],
            manifest.get("requested_vocab_size"),
        ):
            return False
        if not (out / manifest["tokenizer"]).is_file():
            return False
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                path = out / shard["name"]
                if not path.is_file() or path.stat().st_size != shard["bytes"]:
                    return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _check_options(vocab_size: int, seq_len: int, samples_per_shard: int, val_fraction: float):
    if vocab_size < 257:
        raise DataError(f"vocab_size={vocab_size}: must be at least 257 (256 bytes + end-of-doc)")
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len}: must be at least 1")
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard={samples_per_shard}: must be at least 1")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}: must be in [0, 1)")


def _remove_previous_dataset(out: Path) -> None:
    """Drops an older dataset's manifest first (so the folder never looks complete while
    it is rewritten), then its shards and any temp files of an interrupted run."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for path in out.iterdir():
        if _STALE_FILE.match(path.name) and path.is_file():
            path.unlink()


def _train_tokenizer(docs: Iterator[str], vocab_size: int):
    """Byte-level BPE, as in GPT-2: every string encodes, and decoding is lossless."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for doc in docs:
            seen += 1
            yield doc

    tok.train_from_iterator(counted(), trainer=trainer)
    return tok if seen else None


def _load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception for bad files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot load tokenizer ({reason})") from err


def _find_eod(tok, tokenizer_path: str | Path | None) -> tuple[str, int]:
    for token in EOD_CANDIDATES:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token, token_id
    raise DataError(
        f"{tokenizer_path}: tokenizer has no end-of-document token; "
        f"add one of {', '.join(EOD_CANDIDATES)}"
    )


def _is_val(text: str, seed: int, val_fraction: float) -> bool:
    if val_fraction <= 0.0:
        return False
    key = str(seed).encode()
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


class _Packer:
    """Cuts one split's token stream into samples of ``seq_len + 1`` with stride ``seq_len``."""

    def __init__(self, writer: ShardWriter, seq_len: int):
        self.writer = writer
        self.seq_len = seq_len
        self.documents = 0
        self.stream_tokens = 0
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def add(self, ids: np.ndarray) -> None:
        self.documents += 1
        self.stream_tokens += len(ids)
        self._pending.append(ids)
        self._pending_len += len(ids)
        if self._pending_len > self.seq_len:
            self._flush()

    def _flush(self) -> None:
        buf = np.concatenate(self._pending)
        count = (len(buf) - 1) // self.seq_len
        for k in range(count):
            self.writer.write(buf[k * self.seq_len : k * self.seq_len + self.seq_len + 1])
        rest = buf[count * self.seq_len :]
        self._pending, self._pending_len = [rest], len(rest)

    def finish(self) -> dict:
        shards = self.writer.close()
        samples = self.writer.samples
        covered = samples * self.seq_len + 1 if samples else 0
        return {
            "shards": shards,
            "samples": samples,
            "tokens": samples * (self.seq_len + 1),
            "documents": self.documents,
            "stream_tokens": self.stream_tokens,
            "dropped_tokens": self.stream_tokens - covered,
        }


def _encode_and_write(
    docs: Iterator[str],
    tok,
    out: Path,
    *,
    eod_id: int,
    dtype: np.dtype,
    seq_len: int,
    samples_per_shard: int,
    val_fraction: float,
    seed: int,
) -> dict[str, dict]:
    writers = {
        s: ShardWriter(out, s, samples_per_shard=samples_per_shard, dtype=dtype) for s in SPLITS
    }
    packers = {s: _Packer(w, seq_len) for s, w in writers.items()}
    eod = np.array([eod_id], dtype=dtype)

    def flush(batch: list[str]) -> None:
        for text, enc in zip(batch, tok.encode_batch(batch, add_special_tokens=False)):
            split = "val" if _is_val(text, seed, val_fraction) else "train"
            packers[split].add(np.concatenate([np.asarray(enc.ids, dtype=dtype), eod]))

    try:
        batch: list[str] = []
        batch_bytes = 0
        for text in docs:
            batch.append(text)
            batch_bytes += len(text)
            if batch_bytes >= _ENCODE_BATCH_BYTES:
                flush(batch)
                batch, batch_bytes = [], 0
        if batch:
            flush(batch)
        return {s: p.finish() for s, p in packers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
