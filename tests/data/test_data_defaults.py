"""What the trainer's data keys mean as ``omnimoe-train`` composes them: a user's
``data.inputs`` are read whole (not cut at the stdlib corpus's size), ``data.tokenizer`` beside
prepared datasets must be theirs, and one part of a dataset is not a dataset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from omnimoe_data.corpus import DEFAULT_CORPUS_MAX_BYTES, DataError
from omnimoe_train.cli import to_root_config
from omnimoe_train.config import DataConfig, register_configs
from omnimoe_train.data import dataset_dir, prepare_data

from .helpers import make_docs, write_txt_folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OMNIMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def default_data(*overrides: str) -> DataConfig:
    register_configs()
    with initialize_config_module(config_module="omnimoe_conf", version_base="1.3"):
        return to_root_config(compose(config_name="config", overrides=list(overrides))).data


def test_user_inputs_are_not_capped_by_the_default_corpus_size(cache: Path, tmp_path: Path) -> None:
    """The default ``data.max_bytes`` was the stdlib corpus's 6 MB: a 10.6 MB corpus lost
    43% of its documents without a word. Now no cap is asked for or recorded."""
    corpus = write_txt_folder(tmp_path / "corpus", make_docs(40))
    d = default_data(
        f"data.inputs=[{corpus}]", "data.vocab_size=300", "data.seq_len=16",
        "data.samples_per_shard=8", "data.prepare_workers=1",
    )  # fmt: skip
    assert DataConfig().max_bytes is None and d.max_bytes is None
    data = prepare_data(d, rank=0)
    manifest = json.loads((Path(data.locations[0]) / "manifest.json").read_text())
    assert manifest["max_bytes"] is None and manifest["request"]["max_bytes"] is None
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 40


def test_the_cache_key_of_user_inputs_changes_and_the_stdlib_one_stays(
    cache: Path, tmp_path: Path
) -> None:
    """A cache folder prepared under the former cap (possibly truncated) is not reused for
    user inputs; the stdlib corpus's folders (the same files under either rule) are."""
    corpus = write_txt_folder(tmp_path / "corpus", make_docs(5))
    user = default_data(f"data.inputs=[{corpus}]")
    old_cap = dataclasses.replace(user, max_bytes=DEFAULT_CORPUS_MAX_BYTES)
    assert dataset_dir(user) != dataset_dir(old_cap)
    stdlib = default_data()
    assert dataset_dir(stdlib) == dataset_dir(
        dataclasses.replace(stdlib, max_bytes=DEFAULT_CORPUS_MAX_BYTES)
    )


def test_a_tokenizer_beside_prepared_datasets_must_be_theirs(cache: Path, tmp_path: Path) -> None:
    """``data.tokenizer`` with ``data.dir`` (no inputs) or ``data.dirs`` was ignored: the run
    trained on the dataset's ids, made by another tokenizer. Now checked against the
    manifest's ``tokenizer_sha256``; the dataset's own tokenizer (its ``tokenizer.json``) is
    accepted."""
    small = {"vocab_size": 300, "seq_len": 16, "samples_per_shard": 8, "prepare_workers": 1}
    corpus = write_txt_folder(tmp_path / "corpus", make_docs(30))
    other = write_txt_folder(tmp_path / "other", make_docs(30, seed=9))
    a, b = tmp_path / "a", tmp_path / "b"
    prepare_data(DataConfig(inputs=[str(corpus)], dir=str(a), **small), rank=0)
    prepare_data(DataConfig(inputs=[str(other)], dir=str(b), vocab_size=280, seq_len=16), rank=0)
    theirs, foreign = str(a / "tokenizer.json"), str(b / "tokenizer.json")
    used = prepare_data(DataConfig(dir=str(a), tokenizer=theirs, seq_len=16), rank=0)
    assert used.locations == [str(a)]
    rule = rf"^data\.tokenizer: {foreign} is not the tokenizer {a} was prepared with "
    with pytest.raises(DataError, match=rule):
        prepare_data(DataConfig(dir=str(a), tokenizer=foreign, seq_len=16), rank=0)
    with pytest.raises(DataError, match=rule):
        prepare_data(DataConfig(dirs=[str(b), str(a)], tokenizer=foreign, seq_len=16), rank=0)


def test_one_part_of_a_dataset_is_not_trained_on(tmp_path: Path) -> None:
    """``data.dir`` naming one part (``omnimoe-data prepare --part``) trained on that part's
    share of the corpus alone, silently."""
    from omnimoe_data.prepare import prepare
    from omnimoe_data.tokenizer_training import train_tokenizer_file

    corpus = write_txt_folder(tmp_path / "corpus", make_docs(60))
    tok = train_tokenizer_file([corpus], tmp_path / "tok.json", vocab_size=300)
    small = {"seq_len": 16, "samples_per_shard": 8, "block_bytes": 2000, "progress": False}
    prepare([corpus], tmp_path / "p0", tokenizer=tok, part=(0, 2), **small)
    rule = rf"^data\.dirs?: {tmp_path}/p0 holds part 0/2 of a dataset \(prepare --part\); merge"
    with pytest.raises(DataError, match=rule):
        prepare_data(DataConfig(dir=str(tmp_path / "p0"), seq_len=16), rank=0)
    with pytest.raises(DataError, match=rule):
        prepare_data(DataConfig(dirs=[str(tmp_path / "p0")], seq_len=16), rank=0)


def test_inputs_under_the_home_folder(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data.inputs=['~/corpus']`` passed the pre-check (which expands ``~``, as the run does
    for ``data.dir`` and ``data.tokenizer``) and then failed: "~/corpus: no such file"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_txt_folder(tmp_path / "corpus", make_docs(30))
    small = {"vocab_size": 300, "seq_len": 16, "samples_per_shard": 8, "prepare_workers": 1}
    data = prepare_data(DataConfig(inputs=["~/corpus"], **small), rank=0)
    manifest = json.loads((Path(data.locations[0]) / "manifest.json").read_text())
    assert manifest["request"]["inputs"]["paths"] == [str((tmp_path / "corpus").resolve())]


def test_a_data_dir_with_another_tools_manifest_is_left_alone(cache: Path, tmp_path: Path) -> None:
    """``data.dir`` + ``data.inputs`` onto a folder with some other ``manifest.json``: a JSON
    list was an AttributeError traceback, an object "block_bytes: ... prepared with
    block_bytes=None", invalid JSON deleted."""
    corpus = write_txt_folder(tmp_path / "corpus", make_docs(20))
    out = tmp_path / "mine"
    out.mkdir()
    for foreign in ("[1, 2]", '{"name": "x"}', "not json"):
        (out / "manifest.json").write_text(foreign)
        with pytest.raises(DataError, match=r"^data\.dir: .*mine:? holds a manifest\.json that "):
            prepare_data(DataConfig(inputs=[str(corpus)], dir=str(out), seq_len=16), rank=0)
        assert (out / "manifest.json").read_text() == foreign


def test_the_cache_folder_is_one_folder_whatever_the_data_name(cache: Path, tmp_path: Path) -> None:
    """``data.name=a/b`` made a nested ``a/b-<key>``, a name over the file system's limit a
    folder that could not be made (named as OMNIMOE_CACHE's fault)."""
    corpus = write_txt_folder(tmp_path / "corpus", make_docs(5))
    for name in ("a/b", "..", "x" * 300):
        folder = dataset_dir(DataConfig(inputs=[str(corpus)], name=name))
        assert folder.parent == cache / "data" and len(folder.name.encode()) <= 255
    assert dataset_dir(DataConfig(inputs=[str(corpus)], name="mycorpus")).name.startswith(
        "mycorpus-"
    )
