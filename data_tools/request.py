"""What a preparation was asked to do, so a prepared dataset can be matched to a request.

:func:`preparation_request` collects every option that changes the prepared data — the
input files themselves (each file's path, size and modification time), the tokenizer (the
trained vocabulary size and sample, or a given file's sha256), ``seq_len``, the split seed
and fraction, the text field, the byte cap (none for ``inputs`` unless given: a user's
corpus is read whole), the shard and block sizes — into one dict.
``prepare`` records it in the manifest; the trainer's data cache names its folders by its
hash and re-checks it against the manifest (:func:`request_mismatch`), so a changed option
never reuses another dataset.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from .corpus import DEFAULT_CORPUS_MAX_BYTES, DataError, default_corpus_files, resolve_inputs
from .shards import FORMAT_NAME, MANIFEST_NAME, READABLE_VERSIONS

# Request fields and the trainer config keys that set them (for one-line refusals).
CONFIG_KEYS = {
    "inputs": "data.inputs",
    "tokenizer": "data.tokenizer",
    "vocab_size": "data.vocab_size",
    "tokenizer_sample_bytes": "data.tokenizer_sample_bytes",
    "seq_len": "data.seq_len",
    "samples_per_shard": "data.samples_per_shard",
    "val_fraction": "data.val_fraction",
    "text_field": "data.text_field",
    "seed": "data.seed",
    "max_bytes": "data.max_bytes",
    "block_bytes": "block_bytes",
    "format_version": "the dataset format version",
}


def input_files(
    inputs: list[str | Path] | str | Path | None,
    max_bytes: int | None,
    not_read: list[Path] | None = None,
) -> tuple[list[Path], list[str] | dict]:
    """The files to read, and how the manifest describes them. ``max_bytes`` below 1 is a
    :class:`DataError` (it would read nothing; None reads every byte). ``not_read``: see
    :func:`~omnimoe_data.corpus.resolve_inputs`."""
    if max_bytes is not None and max_bytes < 1:
        raise DataError(
            f"max_bytes={max_bytes}: must be at least 1 (leave it unset to read the inputs "
            f"whole, or the default corpus's {DEFAULT_CORPUS_MAX_BYTES} bytes)",
            option="max_bytes",
        )
    if inputs is None:
        files = default_corpus_files(DEFAULT_CORPUS_MAX_BYTES if max_bytes is None else max_bytes)
        return files, {
            "kind": "python-stdlib",
            "python": platform.python_version(),
            "files": len(files),
        }
    if isinstance(inputs, str | Path):  # a single path from a config file
        inputs = [inputs]
    return resolve_inputs(inputs, not_read), [str(p) for p in inputs]


def _files_identity(files: list[Path]) -> dict:
    digest = hashlib.sha256()
    total = 0
    for path in files:
        try:
            st = path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1  # unreadable now: a later change makes another request
        total += max(size, 0)
        digest.update(f"{path.resolve()}\0{size}\0{mtime}\n".encode())
    return {"files": len(files), "bytes": total, "stat_sha256": digest.hexdigest()}


def _file_sha256(path: str | Path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as err:
        raise DataError(
            f"{path}: cannot load tokenizer ({err.strerror or err})", option="tokenizer"
        ) from None


def preparation_request(
    inputs: list[str | Path] | str | Path | None,
    *,
    tokenizer: str | Path | None,
    vocab_size: int,
    seq_len: int,
    samples_per_shard: int,
    val_fraction: float,
    text_field: str,
    seed: int,
    max_bytes: int | None,
    tokenizer_sample_bytes: int | None,
    block_bytes: int,
    files: list[Path] | None = None,
) -> dict:
    """Every option that changes the prepared data (see the module docstring)."""
    from .shards import FORMAT_VERSION

    if files is None:
        files, _ = input_files(inputs, max_bytes)
    if inputs is None:
        kind = {"kind": "python-stdlib", "python": platform.python_version()}
    else:
        given = [inputs] if isinstance(inputs, str | Path) else inputs
        kind = {"kind": "files", "paths": [str(Path(p).expanduser().resolve()) for p in given]}
    request = {
        "format_version": FORMAT_VERSION,
        "inputs": {**kind, **_files_identity(files)},
        "seq_len": seq_len,
        "samples_per_shard": samples_per_shard,
        "val_fraction": float(val_fraction),
        "text_field": text_field,
        "seed": seed,
        # The default corpus's own cap when none is given: the same stdlib files either way,
        # so its datasets keep their key. data.inputs are read whole without one: no cap is
        # recorded, so a dataset cut by the former default cap is never reused for them.
        "max_bytes": DEFAULT_CORPUS_MAX_BYTES
        if inputs is None and max_bytes is None
        else max_bytes,
        "block_bytes": block_bytes,
    }
    if tokenizer is None:  # options of a trained tokenizer; a given file counts by content
        request["vocab_size"] = vocab_size
        request["tokenizer_sample_bytes"] = tokenizer_sample_bytes
    else:
        request["tokenizer"] = {"sha256": _file_sha256(tokenizer)}
    return request


def request_key(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def request_mismatch(recorded: dict | None, request: dict) -> tuple[str, object, object] | None:
    """``(config key, recorded value, requested value)`` of the first difference, or None."""
    recorded = recorded or {}
    for key in sorted(set(recorded) | set(request)):
        if recorded.get(key) != request.get(key):
            name = CONFIG_KEYS.get(key, key)
            if key in ("vocab_size", "tokenizer_sample_bytes") and "tokenizer" in recorded:
                name = "data.tokenizer"  # the dataset was made with a given tokenizer file
            return name, recorded.get(key), request.get(key)
    return None


def is_prepared(out_dir: str | Path, *, seq_len: int, vocab_size: int | None = None) -> bool:
    """True when ``out_dir`` holds a complete dataset with these settings.

    ``vocab_size`` matches either the size asked of the tokenizer trainer or the actual
    vocabulary. Shards are checked for presence and size; their sha256 sums are checked
    when read (and by ``omnimoe-data inspect``).
    """
    out = Path(out_dir)
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        if manifest.get("format") != FORMAT_NAME or manifest["version"] not in READABLE_VERSIONS:
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


def check_options(
    vocab_size: int, seq_len: int, samples_per_shard: int, val_fraction: float, block_bytes: int
) -> None:
    """The numeric options of a preparation; :class:`DataError` naming the first one out of
    its range."""
    if vocab_size < 257:
        raise DataError(
            f"vocab_size={vocab_size}: must be at least 257 (256 bytes + end-of-doc)",
            option="vocab_size",
        )
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len}: must be at least 1", option="seq_len")
    if samples_per_shard < 1:
        raise DataError(
            f"samples_per_shard={samples_per_shard}: must be at least 1", option="samples_per_shard"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}: must be in [0, 1)", option="val_fraction")
    if block_bytes < 1:
        raise DataError(f"block_bytes={block_bytes}: must be at least 1", option="block_bytes")
