"""The bad command lines a new user types, each refused by ``omnimoe-train``'s pre-check in one
line that names the key and the rule, exit 2, before Hydra starts (no run directory): a config
group's unknown option (with the group's options), an override Hydra cannot parse, Hydra's own
keys, and data (or checkpoint) paths that do not exist or hold no prepared dataset.

Most cases call the pre-check in this process (``cli.precheck``, what ``main`` runs before
Hydra); two go through the real entry point as a subprocess.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from omnimoe_train import cli
from tests.cli_helpers import PRECHECK_ERROR, assert_usage_error, precheck_line, run_train_cli, tiny

pytestmark = pytest.mark.usefixtures("cli_registered")


@pytest.mark.parametrize(
    ("argv", "group", "listed"),
    [
        (["model=nonexistent"], "model", "a80m, a80m_deepseekmoe"),
        (["parallel=nonexistent"], "parallel", "single, tp2"),
        (["optim=nonexistent"], "optim", "adamw_wsd"),
        (["data=nonexistent"], "data", "stdlib"),
        (["+experiment=nonexistent"], "experiment", "table1_a80m"),
        (["hydra/launcher=nonexistent"], "hydra/launcher", "basic, omnimoe_slurm, slurm"),
        (["-m", "model=tiny,nonexistent"], "model", "tiny, wide8b"),
    ],
)
def test_unknown_group_option_names_the_group_and_its_options(
    argv: list[str], group: str, listed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hydra's own error spans the options and its search path, a line each (for a
    ``hydra/...`` group in a single run it was also exit 1, printed by Hydra)."""
    line = precheck_line(argv, capsys)
    assert line.startswith(f"{group}: must be one of ") and listed in line, line
    assert line.endswith("(got 'nonexistent')"), line


def test_group_given_a_list_names_the_group(capsys: pytest.CaptureFixture[str]) -> None:
    """Hydra lists no options for this failure: they come from its config search path."""
    line = precheck_line(["model=[tiny,nonexistent]"], capsys)
    assert line.startswith("model: must be one of a1_7b, ") and "tiny, wide8b" in line, line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["trainer.max_step=5"], "trainer.max_step: unknown key (not in the config schema)"),
        (
            ["trainer.max_steps=abc"],
            "trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer",
        ),
        (
            ["model"],
            "model: cannot parse the override 'model' (missing EQUAL at '<EOF>'); the form is "
            "key=value, +key=value or ~key",
        ),
        (
            ["data.inputs=[~/corpus]"],
            "data.inputs: cannot parse the override 'data.inputs=[~/corpus]' (unexpected "
            "character '~' at position 13; quote the value); the form is key=value, "
            "+key=value or ~key",
        ),
        (
            ["data.inputs=corpus.txt"],
            "data.inputs: a list: write data.inputs=[corpus.txt] (brackets, commas between "
            "items; got 'corpus.txt')",
        ),
        (
            ["checkpoint.keep_steps=500"],
            "checkpoint.keep_steps: a list: write checkpoint.keep_steps=[500] (brackets, commas "
            "between items; got 500)",
        ),
        (["hydra.run.dir=out/${nope:1}"], "hydra.run.dir: Unsupported interpolation type nope"),
        (
            ["-m", "hydra.sweep.dir=out/${nope:1}", "trainer.seed=1,2"],
            "hydra.sweep.dir: Unsupported interpolation type nope",
        ),
    ],
)
def test_misspelt_key_wrong_type_and_unparsable_override(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run directory's bad interpolation used to be a traceback from Hydra (exit 1)."""
    assert precheck_line(argv, capsys) == expected


def _tokenizer(path: Path, *, eod: bool = True, bom: bool = False) -> Path:
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(299)} | {"<|endoftext|>" if eod else "w299": 299}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(path))
    if bom:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "dir_absent",
            "data.dir: {tmp}/absent does not exist; prepare it first (omnimoe-data prepare), "
            "or set data.inputs to prepare into data.dir",
        ),
        (
            "dir_without_manifest",
            "data.dir: {tmp}/empty holds no prepared dataset (no manifest.json); prepare it "
            "first (omnimoe-data prepare), or set data.inputs to prepare into data.dir",
        ),
        ("dir_is_a_file", "data.dir: {tmp}/file.txt is not a folder of a prepared dataset"),
        (
            "dirs_absent",
            "data.dirs: {tmp}/absent does not exist; prepare each dataset first "
            "(omnimoe-data prepare)",
        ),
        (
            "inputs_absent",
            "data.inputs: {tmp}/absent.txt does not exist (give text files or folders of them "
            "to prepare)",
        ),
        (
            "inputs_empty",
            "data.inputs: lists no input: give files or folders, or leave it null for the "
            "default corpus",
        ),
        (
            "inputs_into_a_file",
            "data.dir: {tmp}/file.txt is a file, not a folder to prepare data.inputs into",
        ),
        (
            "resume_absent",
            "checkpoint.resume: {tmp}/absent is not a folder (give a checkpoint folder "
            "step_<8 digits>, a folder of them, auto or none)",
        ),
        (
            "tokenizer_without_eod",
            "data.tokenizer: {tmp}/no_eod.json: tokenizer has no end-of-document token; add one "
            "of <|endoftext|>, <|end_of_text|>, </s>, <eos>, <|eos|>, [EOS]",
        ),
    ],
)
def test_data_path_names_the_key_and_the_rule(
    case: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """These used to name only the path (``/x/manifest.json: not found; ...``), and only once
    the run had started: a run directory made, the process group set up (an absent
    ``checkpoint.resume`` folder named its key, but only after data preparation)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("text")
    argv = {
        "dir_absent": [f"data.dir={tmp_path}/absent"],
        "dir_without_manifest": [f"data.dir={tmp_path}/empty"],
        "dir_is_a_file": [f"data.dir={tmp_path}/file.txt"],
        "dirs_absent": [f"data.dirs=[{tmp_path}/absent,{tmp_path}/empty]", "data.weights=[1,1]"],
        "inputs_absent": [f"data.inputs=[{tmp_path}/file.txt,{tmp_path}/absent.txt]"],
        "inputs_empty": ["data.inputs=[]"],
        "inputs_into_a_file": [f"data.inputs=[{tmp_path}/file.txt]", f"data.dir={tmp_path}/file.txt"],
        "resume_absent": [f"checkpoint.resume={tmp_path}/absent"],
        "tokenizer_without_eod": [f"data.tokenizer={_tokenizer(tmp_path / 'no_eod.json', eod=False)}"],
    }[case]  # fmt: skip
    assert precheck_line(argv, capsys) == expected.format(tmp=tmp_path)


def test_tokenizer_with_a_byte_order_mark_passes_as_preparation_takes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Preparation drops a leading byte-order mark; the pre-check used to refuse the file."""
    path = _tokenizer(tmp_path / "bom.json", bom=True)
    cli.precheck([f"data.tokenizer={path}", "model.vocab_size=300"], world_size=1)
    assert capsys.readouterr().err == ""


def test_unknown_model_through_the_entry_point(tmp_path: Path) -> None:
    result = run_train_cli([*tiny(), "model=nonexistent"], cache=tmp_path, timeout=120)
    assert_usage_error(result, f"{PRECHECK_ERROR}model: must be one of a1_7b, ", tmp_path)


def test_absent_data_dir_through_the_entry_point_makes_no_run_dir(tmp_path: Path) -> None:
    """It used to be found by the run: after Hydra had made the run directory (with its
    ``exit_status.json``) and the process group was up."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    cache.mkdir()
    args = [*tiny(), f"data.dir={tmp_path}/absent", f"hydra.run.dir={run_dir}"]
    result = run_train_cli(args, cache=cache, timeout=120)
    assert_usage_error(
        result, f"{PRECHECK_ERROR}data.dir: {tmp_path}/absent does not exist;", cache
    )
    assert not run_dir.exists()


@pytest.mark.parametrize("given", ["hydra.run.dir", "OMNIMOE_RUN_DIR"])
def test_usage_error_in_a_rerun_leaves_no_earlier_exit_status(
    given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun in a run directory refused with exit 2 left the earlier run's
    ``exit_status.json`` (here 75: "rerun to continue") reading as this run's."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    cache.mkdir()
    run_dir.mkdir()
    (run_dir / "exit_status.json").write_text('{"exit_code": 75, "message": "stopped early"}')
    args = [*tiny(), "model=nonexistent"]
    if given == "hydra.run.dir":
        args.append(f"hydra.run.dir={run_dir}")
    else:
        monkeypatch.setenv("OMNIMOE_RUN_DIR", str(run_dir))
    result = run_train_cli(args, cache=cache, timeout=120)
    assert_usage_error(result, f"{PRECHECK_ERROR}model: must be one of a1_7b, ", cache)
    assert not any(run_dir.iterdir())


def test_launcher_refusing_a_rerun_leaves_no_earlier_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same when the launcher's check refuses it (``omnimoe_train.torchrun``), before any
    rank starts; a directory the config composes (``${...}``) is not touched before then."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "exit_status.json").write_text('{"exit_code": 0, "message": "finished"}')
    for run_dir_arg, left in ((f"{run_dir}${{oc.env:NO_SUCH_VAR,}}", 1), (str(run_dir), 0)):
        with pytest.raises(SystemExit) as info:
            cli.check_before_launch([f"hydra.run.dir={run_dir_arg}", "model=nonexistent"], 2)
        assert info.value.code == 2, capsys.readouterr().err
        assert len(list(run_dir.iterdir())) == left


def test_prepared_data_dir_still_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.data.helpers import make_token_dataset

    data_dir = make_token_dataset(tmp_path / "ds", [20, 10], sample_len=17)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    cli.precheck(
        [f"data.dir={data_dir}", "data.seq_len=16", f"model.vocab_size={manifest['vocab_size']}"],
        world_size=1,
    )
    assert capsys.readouterr().err == ""


def test_mixture_of_another_seq_len_is_refused_by_the_precheck(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``data.dirs`` of samples cut at 16 with ``data.seq_len=32``: refused before Hydra, like
    ``data.dir`` (it was refused only by the run, after its run directory was made)."""
    from tests.data.helpers import make_token_dataset

    dirs = [make_token_dataset(tmp_path / name, [20, 10], sample_len=17) for name in "ab"]
    line = precheck_line([f"data.dirs=[{dirs[0]},{dirs[1]}]", "data.seq_len=32"], capsys)
    assert line == (
        f"data.seq_len: must equal the prepared dataset's seq_len=16 (data.dirs={dirs[0]}) (got 32)"
    ), line


def test_mixture_of_two_tokenizers_is_refused_by_the_precheck(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``data.dirs`` made with two tokenizers: refused before Hydra naming ``data.dirs`` (the
    loader refused it only in the run, after its run directory was made, naming a folder)."""
    from tests.data.helpers import make_token_dataset

    a = make_token_dataset(tmp_path / "a", [20, 10], sample_len=17, vocab_size=300)
    b = make_token_dataset(tmp_path / "b", [20, 10], sample_len=17, vocab_size=309)
    line = precheck_line([f"data.dirs=[{a},{b}]", "data.seq_len=16"], capsys)
    assert line == (
        f"data.dirs: {b} has vocab_size=309 but {a} has 300: the datasets of a mixture must "
        "share one tokenizer"
    ), line
    cli.precheck([f"data.dirs=[{a},{a}]", "data.seq_len=16"], world_size=1)
    assert capsys.readouterr().err == ""


def test_output_folder_with_a_file_in_its_way_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was a traceback from Hydra's makedirs (``hydra.run.dir``), or, for ``checkpoint.dir``,
    one at the first save: after the whole training, whose weights were then lost."""
    afile = tmp_path / "afile"
    afile.write_text("")
    for argv, expected in (
        ([f"hydra.run.dir={afile}"], f"hydra.run.dir: {afile} is a file, not a folder"),
        (
            [f"hydra.run.dir={afile}/run"],
            f"hydra.run.dir: {afile}/run: {afile} is a file, not a folder",
        ),
        (
            ["-m", f"hydra.sweep.dir={afile}", "model.top_k=2,4"],
            f"hydra.sweep.dir: {afile} is a file, not a folder",
        ),
        ([f"checkpoint.dir={afile}"], f"checkpoint.dir: {afile} is a file, not a folder"),
        (
            [f"checkpoint.dir={afile}/ck"],
            f"checkpoint.dir: {afile}/ck: {afile} is a file, not a folder",
        ),
    ):
        assert precheck_line(argv, capsys) == expected
    cli.precheck([f"checkpoint.dir={tmp_path}/new/ck", f"hydra.run.dir={tmp_path}/run"], 1)
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_output_folder_that_cannot_be_made_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder under /proc (no folder can be made there, root or not) or under one without
    write permission was a traceback from Hydra's makedirs."""
    for key in ("hydra.run.dir", "checkpoint.dir"):
        line = precheck_line([f"{key}=/proc/omnimoe-run/x"], capsys)
        assert (
            line
            == f"{key}: /proc/omnimoe-run/x cannot be made or written (No such file or directory in /proc)"
        )
    line = precheck_line(["-m", "hydra.sweep.dir=/proc/sweep", "model.top_k=2,4"], capsys)
    assert line.startswith("hydra.sweep.dir: /proc/sweep cannot be made or written (")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        line = precheck_line([f"hydra.run.dir={locked}/run"], capsys)
        assert (
            line
            == f"hydra.run.dir: {locked}/run cannot be made or written (Permission denied in {locked})"
        )
    assert not list(tmp_path.glob("**/.omnimoe-probe-*"))


def test_checkpoint_dir_under_the_run_dir_with_a_file_in_its_way(tmp_path: Path) -> None:
    """A relative ``checkpoint.dir`` is under the run directory, known only to the run: it
    refuses it before the data or the model (was a traceback at the first save)."""
    from tests.data.helpers import make_token_dataset

    data_dir = make_token_dataset(tmp_path / "ds", [40, 10], sample_len=33)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ck").write_text("")
    vocab = json.loads((data_dir / "manifest.json").read_text())["vocab_size"]
    args = [*tiny(), f"data.dir={data_dir}", f"model.vocab_size={vocab}"]
    args += [f"hydra.run.dir={run_dir}", "checkpoint.dir=ck"]
    result = run_train_cli(args, cache=tmp_path / "cache", timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"{PRECHECK_ERROR}checkpoint.dir: {run_dir}/ck is a file, not a folder"
    ]
    assert not (run_dir / "metrics.jsonl").exists()  # stopped before the training


@pytest.mark.parametrize(
    "key",
    ["checkpoint.dir", "checkpoint.resume", "data.name", "data.dir", "data.tokenizer"],
)
def test_a_path_given_empty_is_refused(key: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty path names the folder it is relative to: ``checkpoint.dir=''`` put the
    checkpoints among the run's own files, ``checkpoint.resume=''`` looked in the current
    folder."""
    rule = "must not be empty (it names the folder it is relative to); leave it out for the default"
    assert precheck_line([f"{key}=''"], capsys) == f"{key}: {rule}"


@pytest.mark.parametrize("key", ["data.inputs", "data.dirs"])
def test_a_list_with_an_empty_path_is_refused(key: str, capsys: pytest.CaptureFixture[str]) -> None:
    rule = "an entry is empty (it names the current folder); remove it"
    assert precheck_line([f"{key}=['']"], capsys) == f"{key}: {rule}"


@pytest.mark.parametrize(
    ("argv", "key"),
    [(["hydra.run.dir=''"], "hydra.run.dir"), (["-m", "hydra.sweep.dir=''"], "hydra.sweep.dir")],
)
def test_an_empty_run_folder_is_refused(
    argv: list[str], key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rule = "must not be empty (it names the folder it is relative to); leave it out for the default"
    assert precheck_line(argv, capsys) == f"{key}: {rule}"
