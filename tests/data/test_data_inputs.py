"""Bad input: clear errors for unusable input, counted skips for partly bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnimoe_data.corpus import DataError
from omnimoe_data.prepare import prepare
from omnimoe_data.request import is_prepared

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


def test_other_files_in_a_folder_are_counted_as_skipped(tmp_path: Path) -> None:
    """A README or a .csv beside the corpus is not read: the manifest (and the report line)
    counts each, where they were passed over without a word."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a document long enough to be one " * 200)
    (root / "notes.md").write_text("the corpus's own notes")
    (root / "sub" / "table.csv").write_text("a,b\n")
    m = run([root], tmp_path / "out")
    assert m["skipped"]["by_reason"] == {"not_a_corpus_file": 2}
    examples = "\n".join(m["skipped"]["examples"])
    assert "notes.md: not read (only .txt, .jsonl, .parquet files are read)" in examples
    assert "table.csv: not read" in examples


def test_compressed_files_in_a_folder_are_refused_not_passed_over(tmp_path: Path) -> None:
    """A ``.jsonl.gz`` beside ``.txt`` files was left out without a word (a share of the
    corpus lost); now the preparation refuses in one line naming it."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a document long enough to be one " * 20)
    (root / "notes.md").write_text("other files are still passed over")
    for name in ("b.jsonl.gz", "sub/c.txt.zst"):
        (root / name).write_bytes(b"\x1f\x8b compressed")
    rule = r"b\.jsonl\.gz: compressed input is not read \(2 such file\(s\) under .*corpus\); "
    with pytest.raises(DataError, match=rule + "decompress them"):
        run([root], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60, method="thread")  # the hang was in open(): no signal ends it
def test_a_named_pipe_or_device_input_is_refused(tmp_path: Path) -> None:
    """A named pipe in a corpus folder blocked the preparation for ever (opened with no
    writer, deaf to SIGTERM), and a link to ``/dev/zero`` named ``.txt`` would be read without
    end: each is refused in one line before anything is written."""
    import os

    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("a document long enough to be one " * 20)
    os.mkfifo(root / "pipe.txt")
    with pytest.raises(DataError, match=r"pipe\.txt: not a regular file \(a named pipe"):
        run([root], tmp_path / "out")
    (root / "pipe.txt").unlink()
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"zero\.txt: not a regular file"):
        run([root, tmp_path / "zero.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


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
    with pytest.raises(DataError, match=r"absent\.json: cannot load tokenizer"):
        run([corpus], tmp_path / "out", tokenizer=tmp_path / "absent.json")
    # A byte-order mark before the JSON (as some editors save it) is not an error.
    good = tmp_path / "good"
    run([corpus], good)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + (good / "tokenizer.json").read_bytes())
    assert (
        run([corpus], tmp_path / "out", tokenizer=bom)["splits"]
        == (json.loads((good / "manifest.json").read_text())["splits"])
    )
    from tokenizers import Tokenizer, models, pre_tokenizers

    no_eod = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    no_eod.pre_tokenizer = pre_tokenizers.Whitespace()
    no_eod.save(str(tmp_path / "no_eod.json"))
    with pytest.raises(DataError, match=re.escape("no end-of-document token; add one of <|endof")):
        run([corpus], tmp_path / "out", tokenizer=tmp_path / "no_eod.json")


def _decoded_documents(out: Path, split: str = "train") -> list[str]:
    from .test_data_prepare import decoded_documents

    return decoded_documents(out, split)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_byte_order_mark_is_not_text(tmp_path: Path, suffix: str) -> None:
    """A UTF-8 BOM starting a file is an encoding mark: the first jsonl record is kept and a
    .txt document does not begin with U+FEFF."""
    docs = make_docs(3, words=30)
    if suffix == ".jsonl":
        paths = [tmp_path / "bom.jsonl"]
        bodies = ["".join(json.dumps({"text": d}) + "\n" for d in docs)]
    else:
        paths = [tmp_path / f"bom{i}.txt" for i in range(3)]
        bodies = docs
    for path, body in zip(paths, bodies):
        path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    m = run(paths, tmp_path / "out", val_fraction=0.0, seq_len=4)
    assert m["skipped"]["total"] == 0
    assert m["splits"]["train"]["documents"] == len(docs)
    got = _decoded_documents(tmp_path / "out")
    assert got == docs[: len(got)] and len(got) >= len(docs) - 1
    assert not got[0].startswith("\ufeff")


def test_unpaired_surrogate_is_a_counted_skip(tmp_path: Path) -> None:
    docs = make_docs(20)
    lines = [json.dumps({"text": d}) for d in docs]
    lines.insert(2, '{"text": "half an emoji \\ud83d here"}')  # line 3
    lines.insert(5, '{"text": "a whole emoji \\ud83d\\ude00 is fine"}')  # line 6
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines) + "\n")
    m = run([path], tmp_path / "out", val_fraction=0.0)
    assert m["skipped"]["by_reason"] == {"unpaired_surrogate": 1}
    assert m["skipped"]["examples"] == [
        f"{path}:3: text holds an unpaired UTF-16 surrogate (U+D83D at character 14)"
    ]
    assert m["splits"]["train"]["documents"] == 21
    assert "a whole emoji \U0001f600 is fine" in _decoded_documents(tmp_path / "out")


def test_invalid_utf8_in_parquet_is_a_counted_skip(tmp_path: Path) -> None:
    good = make_docs(20)
    values = [d.encode() for d in good[:5]] + [b"\xff\xfe broken"] + [d.encode() for d in good[5:]]
    # Arrow does not validate UTF-8 when a string column is made from bytes.
    column = pa.array(values, type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": column}), tmp_path / "bad.parquet")
    m = run([tmp_path / "bad.parquet"], tmp_path / "out", val_fraction=0.0)
    assert m["skipped"]["by_reason"] == {"non_utf8": 1}
    assert "bad.parquet: row 5: not valid UTF-8 (byte offset 0)" in m["skipped"]["examples"][0]
    assert m["splits"]["train"]["documents"] == 20


def test_pieces_of_large_files_read_every_document_once(tmp_path: Path) -> None:
    """Byte ranges of a jsonl file and row-group runs of a parquet file, read one by one,
    give the documents of reading each file whole (BOM, blank lines, bad lines included)."""
    from omnimoe_data.corpus import SkipLog, read_piece
    from omnimoe_data.plan import plan_pieces

    docs = make_docs(40, words=12)
    lines = [json.dumps({"text": d}) for d in docs]
    lines[7] = "{broken"
    lines.insert(11, "")
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": docs}), parquet, row_group_size=6)

    def read(block_bytes: int) -> tuple[list[str], dict]:
        skips = SkipLog()
        pieces = plan_pieces([jsonl, parquet], block_bytes)
        texts = [t for p in pieces for _, t, _ in read_piece(p, "text", skips)]
        return texts, dict(skips.counts), len(pieces)

    whole, whole_skips, n_whole = read(10**9)
    assert n_whole == 2 and whole_skips == {"invalid_json": 1} and len(whole) == 79
    for block_bytes in (1, 97, 500, 2048):
        texts, skips, n = read(block_bytes)
        assert n > 2 and texts == whole and skips == whole_skips, block_bytes


def test_an_input_named_twice_is_refused(tmp_path: Path) -> None:
    """A folder and a file inside it (or one file twice) read that file twice: its documents
    counted double in the dataset, silently."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    doc = root / "sub" / "a.txt"
    doc.write_text("a document long enough to be one " * 20)
    (root / "b.txt").write_text("another document " * 20)
    for inputs in ([root, doc], [doc, doc], [root, root / "sub"]):
        with pytest.raises(DataError, match=r"a\.txt: given more than once \("):
            run(inputs, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Two names of one file: a link beside its target (the walk reads b.txt, then the link).
    (root / "sub" / "a.txt").unlink()
    (root / "z_link.txt").symlink_to(root / "b.txt")
    with pytest.raises(DataError, match=r"z_link\.txt: given more than once .* \(also as "):
        run([root], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_output_folder_with_another_tools_manifest_is_refused_not_emptied(
    tmp_path: Path,
) -> None:
    """``--out`` a folder that holds some other ``manifest.json`` (a web app's, a corpus's own):
    it was deleted without a word, and replaced by the dataset's."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("a document long enough to be one " * 20)
    for foreign in ('{"name": "my corpus"}', "[1, 2]", "not json"):
        (root / "manifest.json").write_text(foreign)
        rule = r"corpus: holds a manifest\.json that is not a prepared dataset's; give an output"
        with pytest.raises(DataError, match=rule):
            run([root], root)
        assert (root / "manifest.json").read_text() == foreign
        assert sorted(p.name for p in root.iterdir()) == ["a.txt", "manifest.json"]
    (root / "manifest.json").unlink()
    out = tmp_path / "out"
    run([root], out)
    run([root], out, seq_len=8)  # a dataset's own manifest is replaced, as before


def test_symlinked_folders_in_an_input_folder_are_read_once(tmp_path: Path) -> None:
    """A corpus folder assembled from links: a linked folder's files were left out, silently
    (``os.walk`` does not follow links by default). A link to a folder above does not loop."""
    root, other = tmp_path / "corpus", tmp_path / "other"
    (root / "real").mkdir(parents=True)
    other.mkdir()
    (root / "real" / "a.txt").write_text("a document long enough to be one " * 20)
    (other / "b.txt").write_text("another document from elsewhere " * 20)
    (root / "linked").symlink_to(other, target_is_directory=True)
    (root / "real" / "loop").symlink_to(root, target_is_directory=True)
    manifest = run([root], tmp_path / "out", val_fraction=0.0)
    assert manifest["splits"]["train"]["documents"] == 2
