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


def test_val_fraction_0_is_no_empty_split_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = write_txt_folder(tmp_path / "c", make_docs(30))
    out = tmp_path / "out"
    assert main(["prepare", str(corpus), "--out", str(out), "--val-fraction", "0", *TINY_ARGS]) == 0
    assert "is empty" not in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    assert "is empty" not in capsys.readouterr().out


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


def test_training_on_a_mixture_records_it(tmp_path: Path) -> None:
    """`omnimoe-train data.dirs=[a,b] data.weights=[3,1]`: trains, and config.yaml records the
    datasets with normalised weights; a bad weight list is one line, exit 2."""
    from omnimoe_data.prepare import prepare
    from omnimoe_data.tokenizer_training import train_tokenizer_file
    from tests.cli_helpers import assert_usage_error, run_train_cli

    docs = make_docs(80)
    tok = train_tokenizer_file(
        [write_txt_folder(tmp_path / "all", docs)], tmp_path / "t.json", vocab_size=300, workers=1
    )
    dirs = []
    for name, part in (("a", docs[:40]), ("b", docs[40:])):
        corpus = write_txt_folder(tmp_path / f"c{name}", part)
        prepare(
            [corpus],
            tmp_path / name,
            tokenizer=tok,
            seq_len=16,
            val_fraction=0.2,
            progress=False,
            workers=1,
        )
        dirs.append(str(tmp_path / name))
    args = [
        f"data.dirs=[{dirs[0]},{dirs[1]}]",
        "data.weights=[3,1]",
        "data.seq_len=16",
        "data.micro_batch_size=2",
        "data.global_batch_size=4",
        "model.num_layers=1",
        "model.hidden_size=32",
        "model.num_attention_heads=2",
        "model.ffn_hidden_size=64",
        "model.num_experts=64",
        "model.top_k=4",
        "optim.warmup_steps=1",
        "trainer.max_steps=2",
        "trainer.eval_iters=1",
        "trainer.progress=false",
        "logging=disabled",
        "checkpoint.save_final=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = run_train_cli(args, cache=tmp_path / "cache", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"location: {dirs[0]}\n    weight: 0.75" in config
    assert f"location: {dirs[1]}\n    weight: 0.25" in config
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run_train_cli([*args[:1], "data.weights=[1]"], cache=empty, timeout=120)
    assert_usage_error(bad, "omnimoe-train: error: data.weights: needs one weight per", empty)


def test_train_tokenizer_refuses_an_out_it_cannot_write_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was a traceback (IsADirectoryError / FileExistsError) after the training, leaving
    ``.<out>.tmp`` behind, for an --out that is a folder or under a file."""
    corpus = write_txt_folder(tmp_path / "c", make_docs(5))
    folder = tmp_path / "toks"
    folder.mkdir()
    (tmp_path / "afile").write_text("")
    for out, rule in (
        (
            folder,
            f"is a folder; give the tokenizer file to write, e.g. {folder / 'tokenizer.json'}",
        ),
        (tmp_path / "afile" / "tok.json", f"{tmp_path / 'afile'} is not a folder"),
    ):
        args = ["train-tokenizer", str(corpus), "--out", str(out), "--vocab-size", "300"]
        assert main(args) == 2
        assert capsys.readouterr().err == f"omnimoe-data: error: {out}: {rule}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "c", "toks"]
    assert not any(folder.iterdir())


@pytest.mark.parametrize("command", ["prepare", "train-tokenizer"])
@pytest.mark.parametrize("option", ["--max-bytes", "--tokenizer-sample-bytes"])
def test_a_byte_count_below_1_is_refused_as_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, option: str
) -> None:
    """``--max-bytes 0`` read nothing and ended in "no usable documents in the input", as if
    the corpus were at fault (and with no inputs, the default corpus came first)."""
    corpus = write_txt_folder(tmp_path / "corpus", make_docs(5))
    for inputs in ([], [str(corpus)]):
        with pytest.raises(SystemExit) as exit_info:
            main([command, *inputs, option, "0", "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"error: argument {option}: must be at least 1 (got 0); leave the option out" in err
        assert "usable documents" not in err and not (tmp_path / "out").exists()


def test_prepare_refuses_max_bytes_0_naming_it(tmp_path: Path) -> None:
    """Called as a library (the trainer, scripts): the same rule, naming ``max_bytes``."""
    from omnimoe_data.corpus import DataError
    from omnimoe_data.prepare import prepare

    corpus = write_txt_folder(tmp_path / "corpus", make_docs(5))
    for inputs in (None, [corpus]):
        with pytest.raises(DataError, match=r"^max_bytes=0: must be at least 1 \(") as info:
            prepare(inputs, tmp_path / "out", max_bytes=0, progress=False)
        assert info.value.option == "max_bytes"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_train_tokenizer_refuses_an_out_it_cannot_make_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An --out whose folder cannot be made (here under /proc; a folder without permission
    the same) was a traceback (FileNotFoundError / PermissionError) after the training."""
    import omnimoe_data.tokenizer_training as training

    corpus = write_txt_folder(tmp_path / "c", make_docs(5))
    monkeypatch.setattr(training, "train_tokenizer", lambda *a, **k: pytest.fail("trained"))
    out = "/proc/omnimoe-no-such-folder/tok.json"
    assert main(["train-tokenizer", str(corpus), "--out", out, "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"omnimoe-data: error: {out}: cannot be written (") and err.count("\n") == 1
    )


@pytest.mark.parametrize("command", ["prepare", "train-tokenizer", "merge"])
def test_an_empty_out_is_refused_not_taken_as_the_current_folder(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    """``--out ""`` (``--out "$OUT"`` with ``OUT`` unset) made ``prepare`` and ``merge`` write
    their dataset into the current folder, removing the shards already there."""
    corpus = write_txt_folder(tmp_path / "c", make_docs(5))
    work = tmp_path / "work"
    work.mkdir()
    (work / "train-000000.tar").write_bytes(b"someone else's")
    monkeypatch.chdir(work)
    inputs = {
        "prepare": [str(corpus), *TINY_ARGS],
        "train-tokenizer": [str(corpus), "--vocab-size", "300"],
        "merge": [str(tmp_path / "p0")],
    }[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *inputs, "--out", ""])
    assert exit_info.value.code == 2
    assert "error: argument --out: must not be empty" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["train-000000.tar"]
