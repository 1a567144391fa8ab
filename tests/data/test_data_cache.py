"""The trainer's data cache and data config: every option that changes the data changes the
prepared folder, a folder made differently is refused in one line, and the data keys'
rules are validated up front."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from omnimoe_data.corpus import DataError, PreparationStopped
from omnimoe_data.request import is_prepared
from omnimoe_train import data as data_module
from omnimoe_train.config import DataConfig, RootConfig
from omnimoe_train.data import dataset_dir, prepare_data
from omnimoe_train.validation import ConfigError, validate

from .helpers import make_docs, make_token_dataset, write_txt_folder

SMALL = {"vocab_size": 300, "seq_len": 16, "samples_per_shard": 8, "max_bytes": None}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OMNIMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = write_txt_folder(tmp_path / "corpus", make_docs(60))
    lines = [json.dumps({"body": d, "text": d.upper()}) for d in make_docs(20, seed=4)]
    (root / "extra.jsonl").write_text("\n".join(lines) + "\n")
    return root


def config(corpus: Path, **changes: object) -> DataConfig:
    return DataConfig(inputs=[str(corpus)], **{**SMALL, **changes})


def test_every_data_option_changes_the_cache_folder(
    cache: Path, corpus: Path, tmp_path: Path
) -> None:
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    base = config(corpus)
    folder = dataset_dir(base)
    assert folder.parent == cache / "data" and folder == dataset_dir(config(corpus))
    other_corpus = write_txt_folder(tmp_path / "other", make_docs(5))
    changed = {
        "inputs": [str(other_corpus)],
        "val_fraction": 0.5,
        "seed": 7,
        "text_field": "body",
        "tokenizer": str(tok),
        "vocab_size": 512,
        "tokenizer_sample_bytes": 1000,
        "max_bytes": 5000,
        "seq_len": 32,
        "samples_per_shard": 4,
    }
    folders = {folder}
    for key, value in changed.items():
        other = dataset_dir(dataclasses.replace(base, **{key: value}))
        assert other not in folders, key
        folders.add(other)
    # The tokenizer file counts by content, the inputs by their files' size and time.
    tok.write_text('{"changed": 1}')
    assert dataset_dir(config(corpus, tokenizer=str(tok))) not in folders
    doc = corpus / "part0" / "doc0000.txt"
    doc.write_text(doc.read_text() + "one more line\n")
    os.utime(doc, ns=(1, 1))
    assert dataset_dir(base) != folder
    # Options that only change how the data is read (not the data) keep the folder.
    assert dataset_dir(dataclasses.replace(base, micro_batch_size=3, num_workers=2)) == (
        dataset_dir(base)
    )


def test_the_issue_case_prepares_a_new_dataset(cache: Path, corpus: Path) -> None:
    """val_fraction=0.5 seed=7 after 0.02/0: a new folder whose manifest says 0.5."""
    first = prepare_data(config(corpus, val_fraction=0.02, seed=0, prepare_workers=1), rank=0)
    second = prepare_data(config(corpus, val_fraction=0.5, seed=7, prepare_workers=1), rank=0)
    assert first.locations != second.locations
    manifest = json.loads((Path(second.locations[0]) / "manifest.json").read_text())
    assert manifest["val_fraction"] == 0.5 and manifest["seed"] == 7
    again = prepare_data(config(corpus, val_fraction=0.02, seed=0), rank=0)
    assert again.locations == first.locations  # reused, not prepared again


def test_a_stop_while_preparing_leaves_no_dataset_and_the_rerun_prepares_it(
    cache: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop request of the run (its stop signals) between two blocks: every rank raises
    :class:`PreparationStopped` (the run exits 75), and the cache folder the preparation made
    is gone, so nothing there passes for a prepared dataset; the rerun prepares it again. A
    request that comes once the data is ready stops the run too, before the model."""
    monkeypatch.setattr(data_module, "DEFAULT_BLOCK_BYTES", 2000)  # several blocks
    d = config(corpus, prepare_workers=1)
    out = dataset_dir(d)
    with pytest.raises(PreparationStopped):
        prepare_data(d, rank=0, stop_requested=lambda: any(out.glob("train-*.tar")))
    assert not out.exists()
    assert prepare_data(d, rank=0).locations == [str(out)]
    assert is_prepared(out, seq_len=16)
    with pytest.raises(PreparationStopped):
        prepare_data(d, rank=0, stop_requested=lambda: True)
    assert is_prepared(out, seq_len=16)  # a finished dataset is kept


def test_a_folder_made_differently_is_refused(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    prepare_data(config(corpus, dir=str(out), prepare_workers=1), rank=0)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    with pytest.raises(DataError, match=r"^data\.val_fraction: .*mine holds a dataset prepared "):
        prepare_data(config(corpus, dir=str(out), val_fraction=0.5), rank=0)
    with pytest.raises(DataError, match=r"^data\.text_field: .*'text', not 'body'"):
        prepare_data(config(corpus, dir=str(out), text_field="body"), rank=0)
    with pytest.raises(DataError, match=r"^data\.inputs: .* other input files"):
        prepare_data(config(corpus / "part0", dir=str(out)), rank=0)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # never overwritten
    # Without data.inputs, data.dir is a prepared dataset used as is; seq_len must match.
    with pytest.raises(DataError, match=r"^data\.seq_len: .* seq_len 16, not 32 \(set data"):
        prepare_data(DataConfig(dir=str(out), seq_len=32), rank=0)
    used = prepare_data(DataConfig(dir=str(out), seq_len=16), rank=0)
    assert used.locations == [str(out)] and used.vocab_size == 300


def test_data_errors_found_by_the_run_name_the_key(
    cache: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the CLI's pre-check cannot see (a location behind a URL or pipe, the inputs'
    contents, the cache folder) is found by the run: its one line names the key too, where
    omnimoe_data's messages name only the path."""
    absent = tmp_path / "absent"
    with pytest.raises(
        DataError,
        match=r"^data\.dir: pipe:cat .*absent/manifest\.json: cannot "
        r"read manifest \(the command 'cat .*' exited with status 1\)$",
    ):
        prepare_data(DataConfig(dir=f"pipe:cat {absent}/{{name}}", seq_len=16), rank=0)
    with pytest.raises(DataError, match=r"^data\.dirs: .*absent/manifest\.json: not found"):
        prepare_data(DataConfig(dirs=[str(absent)], seq_len=16), rank=0)
    with pytest.raises(DataError, match=r"^data\.dir: .*absent/manifest\.json: not found"):
        prepare_data(DataConfig(dir=str(absent), seq_len=16), rank=0)
    with pytest.raises(DataError, match=r"^data\.inputs: .*absent: no such file or folder$"):
        prepare_data(config(absent), rank=0)
    small = tmp_path / "small.txt"
    small.write_text("a short document")
    with pytest.raises(DataError, match=r"^data\.inputs: input too small: "):
        prepare_data(config(small, seq_len=512, prepare_workers=1), rank=0)
    assert not list((cache / "data").iterdir())  # its cache folder is not left behind
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("OMNIMOE_CACHE", str(tmp_path / "a_file"))
    with pytest.raises(DataError, match=r"^OMNIMOE_CACHE: .*cannot create the output folder"):
        prepare_data(config(corpus, prepare_workers=1), rank=0)


def test_mixture_is_described_with_weights(tmp_path: Path) -> None:
    a = make_token_dataset(tmp_path / "a", [10, 10], sample_len=17, vocab_size=500)
    b = make_token_dataset(tmp_path / "b", [6], sample_len=17, vocab_size=500)
    data = prepare_data(DataConfig(dirs=[str(a), str(b)], weights=[3, 1], seq_len=16), rank=0)
    assert data.record() == [
        {"location": str(a), "weight": 0.75, "samples": {"train": 20, "val": 20}},
        {"location": str(b), "weight": 0.25, "samples": {"train": 6, "val": 6}},
    ]


@pytest.mark.parametrize(
    ("changes", "key", "rule"),
    [
        ({"dirs": ["a"], "dir": "b"}, "data.dirs", "set either data.dir"),
        ({"dirs": []}, "data.dirs", "at least one"),
        ({"weights": [1.0]}, "data.weights", "needs data.dirs"),
        ({"dirs": ["a", "b"], "weights": [1.0]}, "data.weights", "one weight per data.dirs"),
        ({"dirs": ["a", "b"], "weights": [1.0, 0.0]}, "data.weights", "positive"),
        ({"dirs": ["a"], "inputs": ["x"]}, "data.inputs", "cannot be prepared into a mixture"),
        ({"dir": "https://host/ds", "inputs": ["x"]}, "data.dir", "not a URL"),
        ({"vocab_size": 100}, "data.vocab_size", ">= 257"),
        ({"num_workers": -1}, "data.num_workers", ">= 0"),
        ({"prepare_workers": 0}, "data.prepare_workers", ">= 1 or null"),
        ({"tokenizer_sample_bytes": 0}, "data.tokenizer_sample_bytes", ">= 1"),
        ({"max_bytes": 0}, "data.max_bytes", ">= 1"),
    ],
)
def test_data_config_rules(changes: dict, key: str, rule: str) -> None:
    cfg = RootConfig(data=DataConfig(**changes))
    with pytest.raises(ConfigError, match=rule) as info:
        validate(cfg, world_size=1)
    assert info.value.key == key
    assert "\n" not in str(info.value)
