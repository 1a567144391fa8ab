"""Data rules: where the data comes from and how it is prepared (:func:`validate_data`, part
of the config's one validation step), and the rules that compare the config with the data
itself (:func:`validate_against_data`): the tokenizer's vocabulary, a prepared dataset's sample
length and its validation split.

:func:`validate_data_paths` checks that the local paths named exist (the CLI's pre-check).
The rules against the data run as early as the facts exist: in the CLI's pre-check when
``data.tokenizer``, an already prepared ``data.dir`` or local ``data.dirs`` are given, and in
any case right after
data preparation, before any model work.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from omnimoe_data.urls import is_url
from omnimoe_train.config import DataConfig, RootConfig
from omnimoe_train.validation.errors import ConfigError, require

# The prepared dataset's manifest (``omnimoe_data.shards.MANIFEST_NAME``; not imported, so the
# pre-check stays free of numpy and torch).
MANIFEST_NAME = "manifest.json"


def validate_data(d: DataConfig) -> None:
    """Where the data comes from must be unambiguous; preparation options must be usable."""
    require(0.0 <= d.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
    require(d.num_workers >= 0, "data.num_workers", f"must be >= 0 (got {d.num_workers})")
    require(
        d.tokenizer is not None or d.vocab_size >= 257,
        "data.vocab_size",
        f"must be >= 257 (256 bytes + end-of-document) to train a tokenizer (got {d.vocab_size})",
    )
    for key in ("max_bytes", "tokenizer_sample_bytes", "prepare_workers"):
        value = getattr(d, key)
        require(value is None or value >= 1, f"data.{key}", f"must be >= 1 or null (got {value})")
    require(
        d.inputs is None or len(d.inputs) >= 1,
        "data.inputs",
        "lists no input: give files or folders, or leave it null for the default corpus",
    )
    if d.dirs is not None:
        require(len(d.dirs) >= 1, "data.dirs", "must list at least one prepared dataset")
        require(
            d.dir is None, "data.dirs", "set either data.dir (one dataset) or data.dirs, not both"
        )
        require(
            d.inputs is None,
            "data.inputs",
            "cannot be prepared into a mixture: prepare each dataset, then list them in data.dirs",
        )
    if d.weights is not None:
        require(d.dirs is not None, "data.weights", "needs data.dirs (one weight per dataset)")
        require(
            len(d.weights) == len(d.dirs),
            "data.weights",
            f"needs one weight per data.dirs entry ({len(d.dirs)}), got {len(d.weights)}",
        )
        require(
            all(math.isfinite(w) and w > 0 for w in d.weights),
            "data.weights",
            f"must be positive numbers (got {list(d.weights)})",
        )
    if d.dir is not None and d.inputs is not None:
        require(
            not is_url(d.dir),
            "data.dir",
            f"data.inputs are prepared into a local folder, not a URL (got {d.dir!r})",
        )


@dataclass(frozen=True)
class DataFacts:
    """What the data-dependent rules know about a tokenizer or a prepared dataset."""

    where: str  # names the source in messages: "data.dir=..." or "data.tokenizer=..."
    vocab_size: int | None  # the tokenizer's vocabulary: token ids are below it
    seq_len: int | None = None  # a prepared dataset's sample length - 1
    split_samples: dict[str, int] | None = None  # samples per split of a prepared dataset


def dataset_facts(data_dir: Path, where: str) -> DataFacts | None:
    """The facts of the dataset prepared in ``data_dir`` (its manifest), or None if none is."""
    try:
        manifest = json.loads((data_dir / MANIFEST_NAME).read_text())
        splits = {
            name: sum(int(shard["samples"]) for shard in split["shards"])
            for name, split in manifest["splits"].items()
        }
        return DataFacts(where, int(manifest["vocab_size"]), int(manifest["seq_len"]), splits)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: preparation makes (or refuses) it


def tokenizer_facts(path: str) -> DataFacts:
    """The vocabulary of an existing ``tokenizer.json``, loaded as preparation loads it (a
    leading byte-order mark is fine) and holding the end-of-document token it needs."""
    from omnimoe_data.corpus import DataError
    from omnimoe_data.tokenizer import find_eod, load_tokenizer

    try:
        tok = load_tokenizer(Path(path).expanduser())
        find_eod(tok, path)
    except DataError as exc:
        raise ConfigError("data.tokenizer", str(exc)) from None
    return DataFacts(f"data.tokenizer={path}", tok.get_vocab_size(with_added_tokens=True))


def validate_data_paths(d: DataConfig) -> None:
    """The local paths ``data.*`` names exist, and as what they are used for (URLs are read only
    by the run). A fact of the machine the check runs on, so the CLI's pre-check runs it, not
    :func:`validate` (``omnimoe-params`` describes a config for any machine); whatever appears
    or vanishes later is refused by the run in one line naming the same key.

    Checks names only, never a folder's contents: ``data.inputs`` may be a corpus of millions
    of files."""
    if d.dirs:
        for location in d.dirs:
            _require_prepared("data.dirs", location)
    elif d.dir is not None and d.inputs is None:
        _require_prepared("data.dir", d.dir)
    if d.inputs is not None:
        for item in d.inputs:
            path = Path(item).expanduser()
            require(
                path.exists() or path.is_symlink(),
                "data.inputs",
                f"{item} does not exist (give text files or folders of them to prepare)",
            )
        if d.dir is not None and not is_url(d.dir):
            out = Path(d.dir).expanduser()
            require(
                not out.exists() or out.is_dir(),
                "data.dir",
                f"{d.dir} is a file, not a folder to prepare data.inputs into",
            )


def _require_prepared(key: str, location: str) -> None:
    """``location`` (a local folder) holds a prepared dataset: its manifest is written last."""
    if is_url(location):
        return
    path = Path(location).expanduser()
    how = "prepare it first (omnimoe-data prepare), or set data.inputs to prepare into data.dir"
    if key == "data.dirs":
        how = "prepare each dataset first (omnimoe-data prepare)"
    require(path.exists(), key, f"{location} does not exist; {how}")
    require(path.is_dir(), key, f"{location} is not a folder of a prepared dataset")
    require(
        (path / MANIFEST_NAME).is_file(),
        key,
        f"{location} holds no prepared dataset (no {MANIFEST_NAME}); {how}",
    )


def data_facts_before_preparation(d: DataConfig) -> list[DataFacts]:
    """The facts known before any data work: a given tokenizer, a dataset already in data.dir,
    the local datasets of a mixture (data.dirs: before, their sample length was compared only by
    the run, after its run directory was made)."""
    facts = [tokenizer_facts(d.tokenizer)] if d.tokenizer is not None else []
    places = [("data.dir", d.dir)] if d.dir is not None else []
    places += [("data.dirs", location) for location in d.dirs or [] if not is_url(location)]
    for key, location in places:
        found = dataset_facts(Path(location).expanduser(), f"{key}={location}")
        facts += [found] if found is not None else []
    _require_one_tokenizer([location for key, location in places if key == "data.dirs"])
    return facts


# What a mixture's datasets must share besides seq_len (data.seq_len checks that one per
# dataset): the loader refuses the same, but only in the run, after its run directory was
# made, and in a line naming a folder, not the key.
_SHARED_TOKENIZER_KEYS = ("vocab_size", "eod_id", "tokenizer_sha256")


def _require_one_tokenizer(locations: list[str]) -> None:
    """The local datasets of ``data.dirs`` were made with one tokenizer (their manifests say
    so); a manifest that cannot be read is left to the run."""
    first: tuple[str, dict] | None = None
    for location in locations:
        try:
            manifest = json.loads((Path(location).expanduser() / MANIFEST_NAME).read_text())
            shared = {key: manifest.get(key) for key in _SHARED_TOKENIZER_KEYS}
        except (OSError, ValueError, AttributeError):
            continue
        if first is None:
            first = (location, shared)
            continue
        for key in _SHARED_TOKENIZER_KEYS:
            require(
                shared[key] == first[1][key],
                "data.dirs",
                f"{location} has {key}={shared[key]!r} but {first[0]} has {first[1][key]!r}: "
                "the datasets of a mixture must share one tokenizer",
            )


def validate_against_data(cfg: RootConfig, facts: DataFacts) -> None:
    """Rules between the config and the data; raise :class:`ConfigError` on the first broken."""
    m, d = cfg.model, cfg.data
    if m.vocab_size is not None and facts.vocab_size is not None:
        require(
            m.vocab_size >= facts.vocab_size,
            "model.vocab_size",
            f"must be >= the tokenizer's vocabulary of {facts.vocab_size} tokens "
            f"({facts.where}) (got {m.vocab_size}; leave it unset to take the tokenizer's)",
        )
    if facts.seq_len is not None:
        # A prepared dataset is never re-cut: data.dir may hold the user's only copy.
        require(
            facts.seq_len == d.seq_len,
            "data.seq_len",
            f"must equal the prepared dataset's seq_len={facts.seq_len} ({facts.where}) "
            f"(got {d.seq_len})",
        )
    train = (facts.split_samples or {}).get("train")
    if train is not None and not d.dirs:  # in a mixture, a small source repeats by design
        require(
            d.global_batch_size <= train,
            "data.global_batch_size",
            f"must not exceed the training split's {train} samples ({facts.where}): every step "
            f"would repeat samples (got {d.global_batch_size}; give more data or a smaller batch)",
        )
    if facts.split_samples is not None and d.val_fraction > 0:
        require(
            facts.split_samples.get("val", 0) > 0,
            "data.val_fraction",
            f"the validation split is empty ({facts.where}); set data.val_fraction=0 to train "
            f"without evaluation, or give more data or a larger fraction (got {d.val_fraction})",
        )
