"""Bad input: clear errors for unusable input, counted skips for partly bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnimoe_data.corpus import DataError
from omnimoe_data.prepare import is_prepared, prepare

from .helpers import TINY, make_docs, write_txt_folder


def run(inputs, out: Path, **kwargs) -> dict:
    options = {**TINY, "progress": False, **kwargs}
    return prepare(inputs, out, **options).manifest


def test_no_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no input files"):
        run([], tmp_path / "out")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.txt: no such file or folder"):
        run([tmp_path / "nope.txt"], tmp_path / "out")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not an input type")
    with pytest.raises(DataError, match=r"empty: folder holds no \.txt, \.jsonl, \.parquet files"):
        run([tmp_path / "empty"], tmp_path / "out")


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported input type '\.csv'"):
        run([tmp_path / "data.csv"], tmp_path / "out")


def test_only_empty_documents(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n\n")
    with pytest.raises(DataError, match=r"no usable documents.*skipped 2 \(2 empty\)"):
        run([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out")
    assert not is_prepared(tmp_path / "out", seq_len=16)


def test_input_too_small_for_one_sample(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(DataError, match="fewer than one sample of seq_len"):
        run([tmp_path / "a.txt"], tmp_path / "out", vocab_size=300, seq_len=64)


def test_unreadable_file_is_skipped(tmp_path: Path) -> None:
    corpus = write_txt_folder(tmp_path / "c", make_docs(20))
    # A dangling link cannot be opened whoever runs the test (chmod 000 does not stop root).
    (corpus / "zz_gone.txt").symlink_to(tmp_path / "missing-target.txt")
    m = run([corpus], tmp_path / "out")
    assert m["skipped"]["by_reason"] == {"unreadable": 1}
    assert "zz_gone.txt: cannot read file" in m["skipped"]["examples"][0]
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 20


def test_non_utf8_file_is_skipped(tmp_path: Path) -> None:
    corpus = write_txt_folder(tmp_path / "c", make_docs(20))
    (corpus / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    m = run([corpus], tmp_path / "out")
    assert m["skipped"]["by_reason"] == {"non_utf8": 1}
    assert "latin1.txt: not valid UTF-8 (byte offset 3)" in m["skipped"]["examples"][0]


def test_only_bad_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match=r"no usable documents.*1 non_utf8"):
        run([tmp_path / "a.txt"], tmp_path / "out")


def test_jsonl_bad_lines_are_skipped_and_located(tmp_path: Path) -> None:
    docs = make_docs(20)
    lines = [json.dumps({"text": d}) for d in docs]
    lines.insert(3, json.dumps({"content": "wrong field"}))  # line 4
    lines.insert(6, "{not json")  # line 7
    lines.insert(9, json.dumps({"text": 42}))  # line 10
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\n".join(lines) + "\n\n").encode() + b'{"text": "\xff"}\n')
    m = run([path], tmp_path / "out")
    assert m["skipped"]["by_reason"] == {
        "invalid_json": 1,
        "missing_field": 1,
        "non_utf8": 1,
        "not_text": 1,
    }
    examples = "\n".join(m["skipped"]["examples"])
    assert f"{path}:4: no 'text' field" in examples
    assert f"{path}:7: invalid JSON" in examples
    assert f"{path}:10: field 'text' is not a string" in examples
    assert f"{path}:25: not valid UTF-8" in examples
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 20


def test_parquet_without_the_column_is_skipped(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": make_docs(20) + [None]}), good)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), bad)
    m = run([good, bad], tmp_path / "out")
    assert m["skipped"]["by_reason"] == {"missing_field": 2}
    examples = "\n".join(m["skipped"]["examples"])
    assert "good.parquet: row 20: 'text' is null" in examples
    assert "bad.parquet: no 'text' column" in examples


def test_corrupt_parquet_is_skipped(tmp_path: Path) -> None:
    corpus = write_txt_folder(tmp_path / "c", make_docs(20))
    (corpus / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    m = run([corpus], tmp_path / "out")
    assert m["skipped"]["by_reason"] == {"unreadable": 1}


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"vocab_size": 100}, "vocab_size=100: must be at least 257"),
        ({"seq_len": 0}, "seq_len=0"),
        ({"samples_per_shard": 0}, "samples_per_shard=0"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0: must be in \[0, 1\)"),
    ],
)
def test_bad_options(tmp_path: Path, option: dict, message: str) -> None:
    (tmp_path / "a.txt").write_text("hello world")
    with pytest.raises(DataError, match=message):
        run([tmp_path / "a.txt"], tmp_path / "out", **option)


def test_bad_tokenizer_files(tmp_path: Path) -> None:
    corpus = write_txt_folder(tmp_path / "c", make_docs(20))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match=r"broken\.json: cannot load tokenizer"):
        run([corpus], tmp_path / "out", tokenizer=tmp_path / "broken.json")
    from tokenizers import Tokenizer, models, pre_tokenizers

    no_eod = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    no_eod.pre_tokenizer = pre_tokenizers.Whitespace()
    no_eod.save(str(tmp_path / "no_eod.json"))
    with pytest.raises(DataError, match=re.escape("no end-of-document token; add one of <|endof")):
        run([corpus], tmp_path / "out", tokenizer=tmp_path / "no_eod.json")
