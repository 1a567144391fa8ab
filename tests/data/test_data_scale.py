"""Preparation at scale: worker processes, blocks, --part + merge, a tokenizer sample, and
special-token text encoded as text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from omnimoe_data.corpus import DataError
from omnimoe_data.loader import TokenShardLoader
from omnimoe_data.merge import merge
from omnimoe_data.prepare import prepare
from omnimoe_data.tokenizer_training import train_tokenizer_file

from .helpers import TINY, make_docs, split_samples, write_txt_folder
from .test_data_prepare import decoded_documents

BLOCK = 1500  # bytes: a 60-document corpus makes ~12 blocks


def _jsonl_corpus(root: Path, n: int = 120) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    docs = make_docs(n, seed=3)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[: n // 2]))
    write_txt_folder(root / "txt", docs[n // 2 :])
    return root


def _same_data(a: Path, b: Path) -> None:
    for split in ("train", "val"):
        assert np.array_equal(split_samples(a, split), split_samples(b, split)), split
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for split in ("train", "val"):
        for key in ("samples", "documents", "stream_tokens", "dropped_tokens", "packed_streams"):
            assert ma["splits"][split][key] == mb["splits"][split][key], (split, key)
    assert ma["skipped"] == mb["skipped"] and ma["tokenizer_sha256"] == mb["tokenizer_sha256"]


def test_worker_processes_give_identical_shards(tmp_path: Path) -> None:
    corpus = _jsonl_corpus(tmp_path / "c")
    options = {**TINY, "val_fraction": 0.2, "block_bytes": BLOCK, "progress": False}
    one = prepare([corpus], tmp_path / "one", workers=1, **options).manifest
    two = prepare([corpus], tmp_path / "two", workers=2, **options).manifest
    assert one["plan"]["blocks"] >= 8
    assert one["splits"] == two["splits"]  # same shards, byte for byte (sha256)
    assert one["splits"]["train"]["packed_streams"] == one["plan"]["blocks"]


def test_parts_merged_equal_one_process(tmp_path: Path) -> None:
    corpus = _jsonl_corpus(tmp_path / "c")
    (corpus / "txt" / "bad.txt").write_bytes(b"\xff")  # a skip, counted once after merging
    tok = train_tokenizer_file([corpus], tmp_path / "tok.json", vocab_size=300, workers=1)
    options = {
        **TINY,
        "tokenizer": tok,
        "val_fraction": 0.2,
        "block_bytes": BLOCK,
        "progress": False,
        "workers": 1,
    }
    whole = tmp_path / "whole"
    prepare([corpus], whole, **options)
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, part in enumerate(parts):
        m = prepare([corpus], part, part=(i, 3), **options).manifest
        assert m["part"]["index"] == i
    merged = tmp_path / "merged"
    result = merge(list(reversed(parts)), merged)  # any order of arguments
    assert result.manifest["part"] is None and result.manifest["skipped"]["total"] == 1
    _same_data(whole, merged)
    # The merged dataset trains like the whole one: same global batches for 10 steps.
    a = TokenShardLoader(whole, "train", 4, global_batch_size=8, seed=1)
    b = TokenShardLoader(merged, "train", 2, global_batch_size=8, seed=1, dp_size=2, dp_rank=0)
    first = [next(a) for _ in range(20)]
    ranks0 = [next(b) for _ in range(20)]
    assert all(np.array_equal(first[2 * s][:2], ranks0[2 * s]) for s in range(10))


def test_merge_refuses_parts_that_do_not_fit(tmp_path: Path) -> None:
    corpus = _jsonl_corpus(tmp_path / "c", n=40)
    tok = train_tokenizer_file([corpus], tmp_path / "tok.json", vocab_size=300, workers=1)
    options = {**TINY, "tokenizer": tok, "block_bytes": BLOCK, "progress": False, "workers": 1}
    p0, p1, other = tmp_path / "p0", tmp_path / "p1", tmp_path / "other"
    prepare([corpus], p0, part=(0, 2), **options)
    prepare([corpus], p1, part=(1, 2), **options)
    prepare([corpus], other, part=(1, 2), **{**options, "seed": 9})
    with pytest.raises(DataError, match=r"part\(s\) 1/2 missing"):
        merge([p0], tmp_path / "m")
    with pytest.raises(DataError, match="part 0/2 given twice"):
        merge([p0, p0], tmp_path / "m")
    with pytest.raises(DataError, match="request differs"):
        merge([p0, other], tmp_path / "m")
    whole = tmp_path / "whole"
    prepare([corpus], whole, **options)
    with pytest.raises(DataError, match="not a part"):
        merge([whole], tmp_path / "m")
    with pytest.raises(DataError, match="--part needs --tokenizer"):
        prepare([corpus], tmp_path / "x", part=(0, 2), **{**options, "tokenizer": None})


def test_a_failed_merge_leaves_nothing_and_says_why_in_one_line(tmp_path: Path) -> None:
    """A merge that fails (a part's shard gone, parts without training samples, an output
    folder that cannot be made) removes what it wrote and the folder it made, as a failed
    prepare does; before, the folder stayed with the tokenizer and the shards linked so far,
    and an output folder that could not be made was a traceback."""
    corpus = _jsonl_corpus(tmp_path / "c", n=40)
    tok = train_tokenizer_file([corpus], tmp_path / "tok.json", vocab_size=300, workers=1)
    options = {**TINY, "tokenizer": tok, "block_bytes": BLOCK, "progress": False, "workers": 1}
    parts = [tmp_path / "p0", tmp_path / "p1"]
    for i, part in enumerate(parts):
        prepare([corpus], part, part=(i, 2), **options)
    last = json.loads((parts[1] / "manifest.json").read_text())["splits"]["val"]["shards"][-1]
    (parts[1] / last["name"]).unlink()
    out = tmp_path / "merged"
    with pytest.raises(DataError, match="shard missing"):
        merge(parts, out)
    assert not out.exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="cannot create the output folder"):
        merge(parts, tmp_path / "a_file" / "merged")
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "short"}) + "\n")
    empty = [tmp_path / "e0", tmp_path / "e1"]
    for i, part in enumerate(empty):
        prepare([tiny], part, part=(i, 2), **options)
    with pytest.raises(DataError, match="training split of the parts has no samples"):
        merge(empty, out)
    assert not out.exists()


def test_parts_beyond_the_number_of_blocks_are_empty_and_merge(tmp_path: Path) -> None:
    """A corpus of fewer blocks than parts (the tester's 0.8 MB corpus at the default 8 MiB
    block, --part i/3): the parts without a block are empty, not 'no usable documents'."""
    corpus = _jsonl_corpus(tmp_path / "c", n=40)
    tok = train_tokenizer_file([corpus], tmp_path / "tok.json", vocab_size=300, workers=1)
    options = {**TINY, "tokenizer": tok, "val_fraction": 0.2, "progress": False, "workers": 1}
    parts = [tmp_path / f"part{i}" for i in range(3)]
    manifests = [prepare([corpus], p, part=(i, 3), **options).manifest for i, p in enumerate(parts)]
    assert manifests[0]["plan"]["blocks"] == 1  # default block size: the whole corpus is one
    assert [m["samples"] for m in manifests[:2]] == [0, 0] and manifests[2]["samples"] > 0
    whole = tmp_path / "whole"
    prepare([corpus], whole, **options)
    _same_data(whole, merge(parts, tmp_path / "merged").manifest_path.parent)


def test_tokenizer_sample_spreads_over_the_corpus(tmp_path: Path) -> None:
    """A corpus sorted by topic: a 10% sample still sees the last topic's words."""
    first = [f"alpha{i} " + "apricotmarmalade " * 20 for i in range(40)]
    last = [f"omega{i} " + "zucchinisoup " * 20 for i in range(40)]
    corpus = write_txt_folder(tmp_path / "c", first + last)
    options = {**TINY, "vocab_size": 320, "block_bytes": 800, "progress": False, "workers": 1}
    total = sum(len(d) for d in first + last)
    m = prepare([corpus], tmp_path / "out", tokenizer_sample_bytes=total // 10, **options)
    assert m.manifest["request"]["tokenizer_sample_bytes"] == total // 10
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    for word in ("apricotmarmalade", "zucchinisoup"):
        assert len(tok.encode(" " + word).ids) <= 2, word


def test_special_token_text_is_encoded_as_text(tmp_path: Path) -> None:
    """2 documents holding 3 literal end-of-text markers: the stream has exactly 2 EOD ids,
    and decoding gives the documents back."""
    docs = [
        "first <|endoftext|> document " * 3 + "ends here\n",
        "second one mentions <|endoftext|><|endoftext|> twice\n",
    ]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.txt").write_text(docs[1])
    (tmp_path / "c.txt").write_text("padding so the second document is packed whole " * 3)
    out = tmp_path / "out"
    m = prepare([tmp_path], out, val_fraction=0.0, seq_len=8, vocab_size=300, progress=False)
    samples = split_samples(out, "train")
    stream = np.concatenate([samples[0], samples[1:, 1:].reshape(-1)])
    assert int((stream == m.manifest["eod_id"]).sum()) == 2
    assert decoded_documents(out, "train") == docs
    # A given tokenizer whose end-of-document token is </s>: literal </s> is text too.
    from tokenizers import models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["<s> a </s> b"] * 10, trainer=trainer)
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "d.txt").write_text("<s> a </s> b </s>\n" * 20)
    m2 = prepare(
        [tmp_path / "d.txt"],
        tmp_path / "out2",
        tokenizer=tmp_path / "tok.json",
        val_fraction=0.0,
        seq_len=4,
        progress=False,
    ).manifest
    assert m2["eod_token"] == "</s>"
    stream = split_samples(tmp_path / "out2", "train").reshape(-1)
    assert int((stream == m2["eod_id"]).sum()) <= 1  # 40 literal </s>, one document
    assert tok.token_to_id("<s>") not in stream


@pytest.mark.timeout(60)
def test_a_huge_repetitive_line_trains_the_tokenizer_quickly(tmp_path: Path) -> None:
    """A file of one 300 kB line of 'x' and a run of 100k newlines (a padded log, a ruler):
    tokenizers' BPE trainer is quadratic in such a word (90 s + 20 s before, hours at 3 MB,
    deaf to signals); cut into pieces it trains in about a second, and still learns 'x' runs
    and encodes the file whole."""
    from omnimoe_data.tokenizer import TRAINING_RUN_CHARS, training_pieces

    text = "head " + "x" * 300_000 + "\n" * 100_000 + " tail"
    pieces = list(training_pieces(text))
    assert "".join(pieces) == text and max(map(len, pieces)) == TRAINING_RUN_CHARS
    assert list(training_pieces("plain words\n")) == ["plain words\n"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "huge.txt").write_text(text)
    (tmp_path / "c" / "words.txt").write_text("some ordinary words " * 50)
    tok_file = train_tokenizer_file([tmp_path / "c"], tmp_path / "tok.json", vocab_size=300)
    tok = Tokenizer.from_file(str(tok_file))
    assert tok.token_to_id("x" * 64) is not None  # runs of x merged as before
    assert tok.decode(tok.encode(text).ids) == text
