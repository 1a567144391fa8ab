"""The omnimoe-data command line: prepare, inspect, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from omnimoe_data.cli import main

from .helpers import make_docs, write_txt_folder

TINY_ARGS = ["--vocab-size", "300", "--seq-len", "16", "--samples-per-shard", "8", "--no-progress"]


def test_prepare_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = write_txt_folder(tmp_path / "c", make_docs(30))
    (corpus / "bad.txt").write_bytes(b"\xff")
    out = tmp_path / "out"
    assert (
        main(["prepare", str(corpus), "--out", str(out), "--val-fraction", "0.1", *TINY_ARGS]) == 0
    )
    printed = capsys.readouterr().out
    assert "train" in printed and "skipped 1 input item(s): 1 non_utf8" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seq_len"] == 16 and manifest["val_fraction"] == 0.1

    assert main(["inspect", str(out)]) == 0
    assert "shard checksums match" in capsys.readouterr().out

    shard = out / manifest["splits"]["train"]["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[600] ^= 1  # one flipped bit inside a sample
    shard.write_bytes(bytes(data))
    assert main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"omnimoe-data: error: 1 bad shard(s): {shard}: sha256 does not match the manifest\n"
    )


def test_data_error_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    missing = tmp_path / "missing.jsonl"
    assert main(["prepare", str(missing), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"omnimoe-data: error: {missing}: no such file or folder\n"
    assert captured.out == ""


def test_console_entry_point_exit_status(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "omnimoe_data.cli",
            "prepare",
            str(tmp_path / "empty.txt"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("omnimoe-data: error: no usable documents in the input")


def test_inspect_without_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not found; prepare the data first" in capsys.readouterr().err


def test_parts_and_merge_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = write_txt_folder(tmp_path / "c", make_docs(40))
    tok = tmp_path / "tok.json"
    common = ["--block-bytes", "2000", "--workers", "1", "--no-progress"]
    args = ["--vocab-size", "300", "--workers", "1", "--tokenizer-sample-bytes", "4000"]
    assert main(["train-tokenizer", str(corpus), "--out", str(tok), *args]) == 0
    for i in range(2):
        part = ["prepare", str(corpus), "--tokenizer", str(tok), "--part", f"{i}/2"]
        assert main([*part, "--out", str(tmp_path / f"p{i}"), "--seq-len", "16", *common]) == 0
    assert (
        main(["merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "m")])
        == 0
    )
    assert main(["inspect", f"pipe:cat {tmp_path}/m/{{name}}"]) == 0  # a webdataset URL
    assert "shard checksums match" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        main(["prepare", str(corpus), "--part", "2/2", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "argument --part: --part '2/2': need 0 <= i < n" in capsys.readouterr().err
    assert main(["prepare", str(corpus), "--part", "0/2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omnimoe-data: error: --part needs --tokenizer") and err.count("\n") == 1
