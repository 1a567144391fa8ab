"""Glue between the trainer and ``omnimoe_data``: find or prepare the datasets, build loaders.

Where the data comes from:

* ``data.dirs`` (+ ``data.weights``): a mixture of prepared datasets (folders or URLs);
* ``data.dir`` without ``data.inputs``: one prepared dataset (folder or URL), used as is;
* otherwise the inputs (``data.inputs``, default: the stdlib corpus) are prepared into
  ``data.dir`` or into a cache folder named by the hash of every option that changes the
  data (``omnimoe_data.request``), so changing any of them prepares a new dataset. A folder
  that already holds a dataset made differently is refused in one line naming the option.

Every dataset's ``seq_len`` must equal ``data.seq_len``. Preparation runs on global rank 0
only; the other ranks wait (polling the process group's store, ``prepare_board``: no
collective, whose timeout a long preparation would outlast) and then read the finished
dataset (its manifest is written last), or raise the same one-line :class:`DataError` if
preparing failed. Its message starts with the ``data.*`` key at fault (``omnimoe_data`` names
paths and its own options).

A stop request (``stop_requested``: the trainer's stop signals) of any rank stops the
preparation between two units of work (``omnimoe_data.prepare``, which removes what it wrote)
and every rank raises :class:`PreparationStopped`; so does one that comes while rank 0
prepares and is seen only once it has finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnimoe_data.corpus import DataError, PreparationStopped
from omnimoe_data.loader import TokenShardLoader
from omnimoe_data.plan import DEFAULT_BLOCK_BYTES
from omnimoe_data.request import is_prepared, preparation_request, request_key, request_mismatch
from omnimoe_data.shards import FORMAT_NAME
from omnimoe_data.source import DataSource, is_url
from omnimoe_train.config import DataConfig
from omnimoe_train.names import path_component
from omnimoe_train.prepare_board import PrepareBoard
from omnimoe_train.validation import DataFacts


def cache_root() -> Path:
    base = os.environ.get("OMNIMOE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "omnimoe-train"
    )
    return Path(base)


@dataclass
class TrainingData:
    """The datasets a run reads (one, or a mixture with normalised weights)."""

    locations: list[str]
    weights: list[float]
    seq_len: int
    vocab_size: int
    samples: list[dict]  # per dataset: samples per split
    vocab_sizes: list[int]  # per dataset (a mixture's loader requires them equal)

    @property
    def description(self) -> str:
        return self.locations[0] if len(self.locations) == 1 else ", ".join(self.locations)

    def facts(self) -> list[DataFacts]:
        """Per dataset, what the config rules against the data check (``validation``)."""
        return [
            DataFacts(f"dataset {loc}", vocab, self.seq_len, samples)
            for loc, vocab, samples in zip(self.locations, self.vocab_sizes, self.samples)
        ]

    def record(self) -> list[dict]:
        """What config.yaml records about the data: each dataset, its weight and size."""
        return [
            {"location": loc, "weight": w, "samples": s}
            for loc, w, s in zip(self.locations, self.weights, self.samples)
        ]


# The ``prepare`` options (``DataError.option``) by the config key that sets them.
_OPTION_KEYS = {
    "inputs": "data.inputs",
    "tokenizer": "data.tokenizer",
    "out_dir": "data.dir",
    "vocab_size": "data.vocab_size",
    "seq_len": "data.seq_len",
    "samples_per_shard": "data.samples_per_shard",
    "val_fraction": "data.val_fraction",
    "max_bytes": "data.max_bytes",
    "tokenizer_sample_bytes": "data.tokenizer_sample_bytes",
    "workers": "data.prepare_workers",
}


@contextmanager
def _naming(key: str, d: DataConfig | None = None) -> Iterator[None]:
    """Re-raise a :class:`DataError` with the config key at fault in front: the key of the
    ``prepare`` option it names (``d`` given), else ``key``. The cache folder is no config key:
    ``OMNIMOE_CACHE`` (the variable that moves it) is named instead."""
    try:
        yield
    except DataError as err:
        option = getattr(err, "option", None)
        if d is not None and option in _OPTION_KEYS:
            key = _OPTION_KEYS[option]
            if option == "out_dir" and d.dir is None:
                key = "OMNIMOE_CACHE"
        raise DataError(f"{key}: {err}", option=option) from None


def _data_options(d: DataConfig) -> dict:
    """The ``prepare`` options ``data.*`` sets: each changes the prepared data, so the same
    dict is the preparation request (the cache key) and what ``prepare`` is called with."""
    return {
        "tokenizer": d.tokenizer,
        "vocab_size": d.vocab_size,
        "seq_len": d.seq_len,
        "samples_per_shard": d.samples_per_shard,
        "val_fraction": d.val_fraction,
        "text_field": d.text_field,
        "seed": d.seed,
        "max_bytes": d.max_bytes,
        "tokenizer_sample_bytes": d.tokenizer_sample_bytes,
        "block_bytes": DEFAULT_BLOCK_BYTES,
    }


def _request(d: DataConfig) -> dict:
    return preparation_request(d.inputs, **_data_options(d))


def dataset_dir(d: DataConfig, request: dict | None = None) -> Path:
    """Where ``data.inputs`` are prepared: ``data.dir``, or a cache folder keyed by every
    option that changes the data."""
    if d.dir is not None:
        return Path(d.dir).expanduser()
    key = request_key(request if request is not None else _request(d))
    # One folder whatever data.name holds ("a/b" made a/b-<key>, ".." or 300 bytes failed).
    return cache_root() / "data" / f"{path_component(d.name)}-{key}"


def _ensure_prepared(d: DataConfig, should_stop: Callable[[], bool] | None = None) -> Path:
    """Rank 0: the prepared folder for ``data.inputs`` (prepared now if needed; between two
    units of work, :class:`PreparationStopped` when ``should_stop()`` is true)."""
    from omnimoe_data.prepare import prepare

    if d.tokenizer is not None:
        from omnimoe_data.tokenizer import find_eod, load_tokenizer

        with _naming("data.tokenizer"):
            find_eod(load_tokenizer(Path(d.tokenizer).expanduser()), d.tokenizer)
    with _naming("data.inputs", d):  # finds the input files
        request = _request(d)
    out = dataset_dir(d, request)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            manifest = None  # unreadable: prepared again (``prepare`` refuses one not ours)
        if manifest is not None:
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
                key = "data.dir" if d.dir is not None else "OMNIMOE_CACHE"
                raise DataError(
                    f"{key}: {out} holds a manifest.json that is not a prepared dataset's; give "
                    f"a folder of its own to prepare data.inputs into"
                )
            _refuse_mismatch(out, manifest.get("request"), request)
            if is_prepared(out, seq_len=d.seq_len):
                return out
    with _naming("data.inputs", d):
        prepare(
            d.inputs,
            out,
            **_data_options(d),
            workers=d.prepare_workers,
            should_stop=should_stop,
        )
    return out


def _prepared_on_rank0(
    d: DataConfig, rank: int, stop_requested: Callable[[], bool]
) -> dict[str, Any]:
    """Rank 0 prepares (or finds) the data, the others wait on the store (``prepare_board``);
    every rank returns rank 0's outcome: ``error`` (a :class:`DataError`'s line), ``location``,
    ``stopped`` (some rank asked to stop by the end of it), ``crash`` (rank 0 raised)."""
    board = PrepareBoard.open()
    if rank != 0:
        assert board is not None, "a rank other than 0 without a process group"
        return board.wait(stop_requested)

    def should_stop() -> bool:
        return stop_requested() or (board is not None and board.stop_posted)

    outcome: dict[str, Any] = {"error": None, "location": None, "stopped": False, "crash": None}
    try:
        with board.beating() if board is not None else nullcontext():
            try:
                outcome["location"] = str(_ensure_prepared(d, should_stop))
            except DataError as err:
                outcome["error"] = str(err)
            except PreparationStopped:
                outcome["stopped"] = True
            # A request that came after the last unit of work stops before the model too.
            outcome["stopped"] = outcome["stopped"] or should_stop()
    except BaseException as exc:
        outcome["crash"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if board is not None:
            board.post(outcome)
    return outcome


def _refuse_mismatch(out: Path, recorded: dict | None, request: dict) -> None:
    mismatch = request_mismatch(recorded, request)
    if mismatch is None:
        return
    key, then, now = mismatch
    if key == "data.inputs":
        detail = "other input files (or the files changed since)"
    elif key == "data.tokenizer":
        detail = "another tokenizer"
    else:
        detail = f"{key}={then!r}, not {now!r}"
    raise DataError(
        f"{key}: {out} holds a dataset prepared with {detail}; use another data.dir "
        f"or remove that folder"
    )


def _check_tokenizer(path: str, sources: list[DataSource]) -> None:
    """``data.tokenizer`` beside prepared datasets must be the one each was prepared with (its
    manifest's ``tokenizer_sha256``): the token ids were made by it, another maps them to other
    text. Preparing ``data.inputs`` with it is checked by the request instead."""
    from omnimoe_data.tokenizer import load_tokenizer, tokenizer_sha256

    with _naming("data.tokenizer"):
        given = tokenizer_sha256(load_tokenizer(Path(path).expanduser()).to_str(pretty=True))
    for source in sources:
        recorded = source.manifest.get("tokenizer_sha256")
        if recorded is not None and recorded != given:
            raise DataError(
                f"data.tokenizer: {path} is not the tokenizer {source.location} was prepared "
                f"with (its ids are another tokenizer's); leave data.tokenizer unset to use the "
                f"dataset's own, or prepare the data with this tokenizer"
            )


def prepare_data(
    d: DataConfig, *, rank: int, stop_requested: Callable[[], bool] | None = None
) -> TrainingData:
    """Collective: the datasets of ``d``, prepared on rank 0 if needed. Raises
    :class:`DataError` (on every rank) for unusable data or a mismatch with the config, and
    :class:`PreparationStopped` (on every rank) when some rank's ``stop_requested()`` turned
    true while the data was prepared (module docstring)."""
    key, prepared_here = "data.dir", False
    if d.dirs:
        key, locations = "data.dirs", [str(x) for x in d.dirs]
    elif d.dir is not None and d.inputs is None:
        locations = [d.dir if is_url(d.dir) else str(Path(d.dir).expanduser())]
    else:
        outcome = _prepared_on_rank0(d, rank, stop_requested or (lambda: False))
        if outcome["crash"] is not None:  # rank 0 raised (its traceback is in its output)
            raise RuntimeError(f"rank 0 failed while preparing the data: {outcome['crash']}")
        if outcome["error"] is not None:
            raise DataError(outcome["error"])
        if outcome["stopped"]:
            raise PreparationStopped("a stop was requested while the data was prepared")
        locations, prepared_here = [outcome["location"]], True
    with _naming(key):  # a bad location; a manifest absent, unreadable or not a dataset's
        sources = [DataSource(loc) for loc in locations]
        manifests = [source.manifest for source in sources]
    for source, manifest in zip(sources, manifests):
        if manifest.get("part"):  # one part's samples only: the rest of the corpus missing
            part = manifest["part"]
            raise DataError(
                f"{key}: {source.location} holds part {part['index']}/{part['count']} of a "
                f"dataset (prepare --part); merge the parts first (omnimoe-data merge)"
            )
        seq_len = manifest["seq_len"]
        if seq_len != d.seq_len:
            raise DataError(
                f"data.seq_len: {source.location} holds samples of seq_len {seq_len}, "
                f"not {d.seq_len} (set data.seq_len={seq_len})"
            )
    if d.tokenizer is not None and not prepared_here:
        _check_tokenizer(d.tokenizer, sources)
    weights = list(d.weights) if d.weights else [1.0] * len(sources)
    total = sum(weights)
    return TrainingData(
        locations=locations,
        weights=[w / total for w in weights],
        seq_len=d.seq_len,
        vocab_size=sources[0].manifest["vocab_size"],
        samples=[
            {name: s["samples"] for name, s in src.manifest["splits"].items()} for src in sources
        ],
        vocab_sizes=[src.manifest["vocab_size"] for src in sources],
    )


def build_loader(
    d: DataConfig,
    data: TrainingData,
    split: str,
    *,
    dp_rank: int,
    dp_size: int,
    infinite: bool = True,
    pin_memory: bool = False,
) -> TokenShardLoader:
    """The loader of ``split`` for one data-parallel rank, in the global order that does not
    depend on ``dp_size`` or the worker count (``omnimoe_data.order``)."""
    return TokenShardLoader(
        data.locations,
        split,
        d.micro_batch_size,
        global_batch_size=d.global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=d.seed,
        num_workers=d.num_workers if infinite else 0,
        infinite=infinite,
        weights=data.weights,
        skip_bad_shards=d.skip_bad_shards,
        cache_dir=cache_root() / "shards",
        pin_memory=pin_memory,
    )
