"""prepare(): round trip, manifest integrity, inputs, split hygiene, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from omnimoe_data.corpus import DataError, PreparationStopped, default_corpus_files
from omnimoe_data.encode import is_val
from omnimoe_data.prepare import prepare
from omnimoe_data.request import is_prepared
from omnimoe_data.shards import ShardWriter, read_shard, sha256_file, token_dtype

from .helpers import TINY, make_docs, sorted_txt_docs, split_samples, write_txt_folder


def decoded_documents(data_dir: Path, split: str) -> list[str]:
    """Undoes the packing: samples overlap by one token, documents end with the EOD id."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    samples = split_samples(data_dir, split)
    if not len(samples):
        return []
    stream = np.concatenate([samples[0], samples[1:, 1:].reshape(-1)]).tolist()
    docs, current = [], []
    for token in stream:
        if token == manifest["eod_id"]:
            docs.append(tok.decode(current, skip_special_tokens=False))
            current = []
        else:
            current.append(token)
    return docs


def expected_split(docs: list[str], split: str, *, seed: int, val_fraction: float) -> list[str]:
    want_val = split == "val"
    return [d for d in docs if is_val(d.encode(), seed, val_fraction) == want_val]


def test_round_trip_and_manifest(txt_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare([txt_corpus], out, val_fraction=0.2, progress=False, **TINY)
    m = result.manifest
    assert result.manifest_path == out / "manifest.json"
    assert json.loads(result.manifest_path.read_text()) == m
    docs = sorted_txt_docs(txt_corpus)
    for split in ("train", "val"):
        want = expected_split(docs, split, seed=0, val_fraction=0.2)
        got = decoded_documents(out, split)
        # Only the last document of a split can be cut by the dropped tail.
        assert got == want[: len(got)] and len(got) >= len(want) - 1, split
        info = m["splits"][split]
        assert info["documents"] == len(want)
        assert info["samples"] == sum(s["samples"] for s in info["shards"])
        assert info["tokens"] == info["samples"] * (TINY["seq_len"] + 1)
        assert info["packed_streams"] == 1  # one block: one packed stream per split
        assert (
            info["samples"] * TINY["seq_len"] + 1 + info["dropped_tokens"] == info["stream_tokens"]
        )
        for shard in info["shards"]:
            path = out / shard["name"]
            assert sha256_file(path) == shard["sha256"]
            assert path.stat().st_size == shard["bytes"]
            rows = read_shard(path, dtype=m["dtype"], sample_len=m["sample_len"])
            assert len(rows) == shard["samples"] <= TINY["samples_per_shard"]
    assert m["splits"]["val"]["samples"] > 0 and len(m["splits"]["train"]["shards"]) > 2
    assert m["samples"] == sum(s["samples"] for s in m["splits"].values())
    assert m["vocab_size"] == TINY["vocab_size"] and m["dtype"] == "uint16"
    assert m["skipped"]["total"] == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_val_split_holds_whole_documents(txt_corpus: Path, tmp_path: Path) -> None:
    prepare([txt_corpus], tmp_path / "out", val_fraction=0.3, progress=False, **TINY)
    train = set(decoded_documents(tmp_path / "out", "train"))
    val = set(decoded_documents(tmp_path / "out", "val"))
    assert val and train and not (train & val)


def test_same_inputs_give_identical_shards(txt_corpus: Path, tmp_path: Path) -> None:
    a = prepare([txt_corpus], tmp_path / "a", progress=False, **TINY).manifest
    b = prepare([txt_corpus], tmp_path / "b", progress=False, **TINY).manifest
    assert a["splits"] == b["splits"]
    # A given tokenizer.json is reused as is: the same ids come out.
    c = prepare(
        [txt_corpus],
        tmp_path / "c",
        tokenizer=tmp_path / "a" / "tokenizer.json",
        progress=False,
        **TINY,
    ).manifest
    assert c["splits"] == a["splits"]
    assert c["requested_vocab_size"] is None and not c["tokenizer_trained"]


def test_jsonl_parquet_and_folder_inputs(tmp_path: Path) -> None:
    docs = make_docs(30, seed=1)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs[:10]))
    )
    parquet = tmp_path / "sub" / "b.parquet"
    parquet.parent.mkdir()
    pq.write_table(pa.table({"body": docs[10:20], "n": list(range(10))}), parquet)
    folder = write_txt_folder(tmp_path / "txt", docs[20:])
    out = tmp_path / "out"
    m = prepare(
        [jsonl, tmp_path / "sub", folder],
        out,
        text_field="body",
        val_fraction=0.0,
        progress=False,
        **TINY,
    ).manifest
    assert m["splits"]["train"]["documents"] == 30
    assert m["skipped"]["total"] == 0
    ordered = docs[:20] + sorted_txt_docs(folder)
    got = decoded_documents(out, "train")
    assert got == ordered[: len(got)] and len(got) >= 29


def test_max_bytes_caps_the_input(txt_corpus: Path, tmp_path: Path) -> None:
    docs = sorted_txt_docs(txt_corpus)
    budget = sum(len(d.encode()) for d in docs[:20])
    m = prepare(
        [txt_corpus], tmp_path / "o", max_bytes=budget, val_fraction=0.0, progress=False, **TINY
    ).manifest
    assert m["splits"]["train"]["documents"] == 20


def test_is_prepared(txt_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert not is_prepared(out, seq_len=16)
    m = prepare([txt_corpus], out, progress=False, **TINY).manifest
    assert is_prepared(out, seq_len=16)
    assert is_prepared(out, seq_len=16, vocab_size=300)
    assert not is_prepared(out, seq_len=32)
    assert not is_prepared(out, seq_len=16, vocab_size=512)
    (out / m["splits"]["train"]["shards"][-1]["name"]).unlink()
    assert not is_prepared(out, seq_len=16)


def test_interrupted_prepare_leaves_no_partial_files(
    txt_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    prepare([txt_corpus], out, progress=False, **TINY)  # an older complete dataset
    assert is_prepared(out, seq_len=16)
    (out / "notes.md").write_text("the user's own file")
    real_write = ShardWriter.write
    calls = {"n": 0}

    def failing_write(self: ShardWriter, sample: np.ndarray) -> None:
        calls["n"] += 1
        if self.split == "train" and self.samples == TINY["samples_per_shard"] + 3:
            # Mid-way through the second shard: it exists only under its temp name.
            assert self._tmp is not None and self._tmp.exists()
            assert not (out / "train-000001.tar").exists()
            assert (out / "train-000000.tar").exists()  # the first one is finished
            raise KeyboardInterrupt
        real_write(self, sample)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare([txt_corpus], out, progress=False, **TINY)
    # What the failed call wrote is gone (finished shards too: they are of no dataset); the
    # folder it did not create stays, with the file that is not the dataset's.
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]
    assert not is_prepared(out, seq_len=16)

    monkeypatch.setattr(ShardWriter, "write", real_write)
    prepare([txt_corpus], out, progress=False, **TINY)
    assert is_prepared(out, seq_len=16)


@pytest.mark.parametrize("failure", ["too_small", "no_documents", "interrupt"])
def test_failed_prepare_leaves_no_folder_it_made(
    failure: str, txt_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure found mid-way (after the tokenizer, or shards, were written) used to leave the
    new folder behind: empty, or with ``tokenizer.json`` and finished shards but no manifest.
    Now the folder goes too, and preparing again starts from scratch."""
    out = tmp_path / "cache" / "data" / "ds"
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("a short document " * 8)
    (small / "b.txt").write_text("another short one " * 8)
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "x.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)
    if failure == "too_small":  # found after the tokenizer is written
        inputs, options, error = [small], {**TINY, "seq_len": 512, "val_fraction": 0.5}, DataError
    elif failure == "no_documents":  # found while training the tokenizer
        inputs, options, error = [binary], TINY, DataError
    else:  # stopped in the second training shard
        inputs, options, error = [txt_corpus], TINY, KeyboardInterrupt
        real_write = ShardWriter.write

        def failing_write(self: ShardWriter, sample: np.ndarray) -> None:
            if self.split == "train" and self.samples == TINY["samples_per_shard"] + 1:
                raise KeyboardInterrupt
            real_write(self, sample)

        monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(error) as info:
        prepare(inputs, out, progress=False, **options)
    if error is DataError:
        assert info.value.option == "inputs"
    assert not out.exists()
    assert out.parent.is_dir()  # folders above it are left alone
    monkeypatch.undo()
    prepare([txt_corpus], out, progress=False, **TINY)
    assert is_prepared(out, seq_len=16)


def test_failed_prepare_keeps_a_given_tokenizer_in_the_folder(
    txt_corpus: Path, tmp_path: Path
) -> None:
    """Preparing again into a folder with its own tokenizer.json given as the tokenizer: a
    failure removes the dataset's files but never the user's tokenizer."""
    out = tmp_path / "out"
    prepare([txt_corpus], out, progress=False, **TINY)
    small = tmp_path / "small.txt"
    small.write_text("a short document")
    with pytest.raises(DataError, match="input too small"):
        prepare([small], out, progress=False, tokenizer=out / "tokenizer.json", **TINY)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]


def test_token_dtype_and_uint32_shards(tmp_path: Path) -> None:
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    ids = np.array([[0, 70000, 2**32 - 1], [5, 6, 7]], dtype=np.uint32)
    with ShardWriter(tmp_path, "train", samples_per_shard=10, dtype=token_dtype(100_000)) as w:
        for row in ids:
            w.write(row)
        shards = w.close()
    assert shards[0]["name"] == "train-000000.tar" and shards[0]["samples"] == 2
    back = read_shard(tmp_path / "train-000000.tar", dtype=np.uint32, sample_len=3)
    np.testing.assert_array_equal(back, ids)
    with pytest.raises(DataError, match="has 12 bytes, expected 16"):
        read_shard(tmp_path / "train-000000.tar", dtype=np.uint32, sample_len=4)
    with pytest.raises(DataError, match="not a .tokens.u16 sample"):
        read_shard(tmp_path / "train-000000.tar", dtype=np.uint16, sample_len=3)


def test_shards_read_with_webdataset(txt_corpus: Path, tmp_path: Path) -> None:
    import webdataset as wds

    out = tmp_path / "out"
    m = prepare([txt_corpus], out, progress=False, **TINY).manifest
    shard = out / m["splits"]["train"]["shards"][0]["name"]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    expected = read_shard(shard, dtype=np.uint16, sample_len=17)
    assert len(samples) == len(expected)
    for sample, row in zip(samples, expected, strict=True):
        np.testing.assert_array_equal(np.frombuffer(sample["tokens.u16"], "<u2"), row)


def test_default_corpus_files_are_deterministic_and_bounded() -> None:
    files = default_corpus_files(400_000)
    assert files == default_corpus_files(400_000) == sorted(files)
    assert files and sum(f.stat().st_size for f in files) <= 400_000
    excluded = {"test", "tests", "idlelib", "site-packages"}
    assert all(f.suffix == ".py" and not excluded & set(f.parts) for f in files)
    assert default_corpus_files(800_000)[: len(files)] == files


def test_default_corpus_prepare(tmp_path: Path) -> None:
    m = prepare(
        None, tmp_path / "out", vocab_size=512, seq_len=64, max_bytes=300_000, progress=False
    ).manifest
    assert m["sources"]["kind"] == "python-stdlib"
    assert m["vocab_size"] == 512 and m["splits"]["train"]["samples"] > 100
    assert is_prepared(tmp_path / "out", seq_len=64, vocab_size=512)


def test_index_shard_checks_every_member(tmp_path: Path) -> None:
    """Offsets of our writer's layout (checked on all headers at once) and of any other tar
    layout (tarfile) agree with tarfile; size, sha256, member sizes and count are checked."""
    import hashlib
    import io
    import tarfile

    from omnimoe_data.shards import index_shard

    rows = np.arange(30, dtype=np.uint16).reshape(6, 5)
    with ShardWriter(tmp_path, "train", samples_per_shard=10, dtype=np.uint16) as w:
        w.write_rows(rows)
        ours = w.close()[0]

    def record(data: bytes, samples: int) -> dict:
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "samples": samples}

    def tarfile_offsets(data: bytes) -> list[int]:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return [m.offset_data for m in tar]

    data = (tmp_path / ours["name"]).read_bytes()
    got = index_shard(data, ours, dtype=np.uint16, sample_len=5)
    assert got.tolist() == tarfile_offsets(data)
    # A PAX tar (another tool's layout, long names): the tarfile path gives its offsets.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, row in enumerate(rows):
            info = tarfile.TarInfo(f"{'k' * 120}{i}.tokens.u16")
            info.size, info.mtime = 10, 1.5
            tar.addfile(info, io.BytesIO(row.tobytes()))
    pax = buf.getvalue()
    assert index_shard(pax, record(pax, 6), dtype=np.uint16, sample_len=5).tolist() == (
        tarfile_offsets(pax)
    )
    with pytest.raises(ValueError, match="sha256 does not match"):
        index_shard(data[:-1] + b"\1", ours, dtype=np.uint16, sample_len=5)
    with pytest.raises(ValueError, match="has 6 samples, the manifest says 7"):
        index_shard(data, {**ours, "samples": 7}, dtype=np.uint16, sample_len=5)
    with pytest.raises(ValueError, match="has 10 bytes, expected 12"):
        index_shard(data, ours, dtype=np.uint16, sample_len=6)
    with pytest.raises(ValueError, match="not a .tokens.u32 sample"):
        index_shard(data, ours, dtype=np.uint32, sample_len=5)


@pytest.mark.parametrize("when", ["start", "tokenizer", "encoding"])
def test_should_stop_stops_between_two_blocks_and_removes_what_it_wrote(
    when: str, txt_corpus: Path, tmp_path: Path
) -> None:
    """The trainer's stop request (``should_stop``) was not asked: a stop signal during an
    hours-long preparation was acted on only once it had finished. Now it is asked between two
    blocks (before anything, while the tokenizer reads them, while they are encoded and
    written): :class:`PreparationStopped`, what the call wrote removed, the pool's workers
    ended; preparing again starts from scratch."""
    out = tmp_path / "ds"
    calls = []

    def should_stop() -> bool:
        calls.append(None)
        if when == "start":
            return True
        if when == "tokenizer":
            return len(calls) == 3  # at the start, after the 1st and the 2nd block read
        return any(out.glob("train-*.tar"))  # a shard of the encoded blocks is written

    options = {**TINY, "block_bytes": 2000, "progress": False}  # about 10 blocks
    with pytest.raises(PreparationStopped):
        prepare(
            [txt_corpus],
            out,
            workers=2 if when == "encoding" else 1,
            should_stop=should_stop,
            **options,
        )
    assert not out.exists()  # the call made it: nothing is left that could pass for a dataset
    assert not [
        p
        for p in psutil.Process().children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline())
    ], "the pool's workers outlived the stop"
    prepare([txt_corpus], out, workers=1, **options)
    assert is_prepared(out, seq_len=16)
