"""``omnimoe-ckpt inspect`` and ``consolidate`` (subprocesses, as a user runs them).

The multi-rank case (consolidating a ``tp2_ep2`` checkpoint with row-sharded expert tables) is
part of ``test_resharding.py``, which has that checkpoint at hand. ``reshard_checks`` (which
imports the model, hence the kernels) is imported inside the tests: the kernel tests turn on
Triton's CPU interpreter when they are collected, after this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from omnimoe_train.checkpoint.cli import main
from tests.parallel.distributed import run_distributed


def omnimoe_ckpt(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    return subprocess.run(
        [sys.executable, "-m", "omnimoe_train.checkpoint.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def consolidate_and_check(folder: Path, out: Path) -> dict[str, torch.Tensor]:
    """Consolidate ``folder``; its tables and embedding equal the checkpoint's global tensors."""
    result = omnimoe_ckpt("consolidate", folder, out)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = torch.load(out)
    assert payload["step"] == json.loads((folder / "meta.json").read_text())["step"]
    weights = payload["model"]
    flat = out.with_suffix(".global.pt")
    dcp_to_torch_save(folder, flat)
    stored = torch.load(flat)
    layers = sum(1 for k in weights if k.endswith(".mlp.up_ND"))
    assert layers == 2
    for i in range(layers):
        for table in ("up_ND", "down_ND"):
            full = weights[f"decoder.layers.{i}.mlp.{table}"]
            assert full.shape == (64, 32)  # all N experts, all D columns, whatever the layout
            assert torch.equal(full, stored[f"decoder.layers.mlp.{table}"][i])
    embedding = weights["embedding.word_embeddings.weight"]
    assert torch.equal(embedding, stored["embedding.word_embeddings.weight"])
    return weights


def _in_process(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``omnimoe-ckpt`` commands that need no process group, run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
        sys.exit(0)
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out, out.err


def test_inspect_and_consolidate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from .reshard_checks import MODEL, stage

    root = tmp_path / "ckpts"
    run_distributed(stage, 1, [], ("single", root))
    folder = root / "step_00000002"

    code, out, _ = _in_process(capsys, "inspect", root)
    assert code == 0
    assert "step_00000002: valid" in out and "SHA-256 verified" in out
    code, out, _ = _in_process(capsys, "inspect", folder, "--json")
    report = json.loads(out)
    assert report["valid"] and report["step"] == 2 and report["layout"]["world_size"] == 1
    assert report["optimizer_tensors"] > 0
    # The parameter count equals the one omnimoe-params derives from the config (meta-device
    # model); the router's BatchNorm statistics (2 gates x 2 statistics x sqrt(N) per layer)
    # are counted apart.
    params = subprocess.run(
        [sys.executable, "-m", "omnimoe_train.params_cli", *MODEL],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert report["model_parameters"] == json.loads(params.stdout.splitlines()[-1])["total_params"]
    assert report["model_buffer_values"] == 2 * 2 * 2 * 8
    assert report["vocab_size"] == int(next(m for m in MODEL if "vocab" in m).split("=")[1])

    weights = consolidate_and_check(folder, tmp_path / "model.pt")  # a subprocess: gloo world
    assert not any(k.endswith("_extra_state") for k in weights)

    data = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:-10])
    code, _, err = _in_process(capsys, "inspect", folder)
    assert code == 2
    assert err.strip().splitlines() == [
        f"omnimoe-ckpt: error: {folder}: {data.name} is truncated "
        f"({data.stat().st_size} of {data.stat().st_size + 10} bytes)"
    ]
    code, _, err = _in_process(capsys, "consolidate", folder, tmp_path / "never.pt")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never.pt").exists()


def test_consolidate_of_a_missing_folder_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Was "meta.json is missing (the save did not finish)" for a path that does not exist."""
    code, _, err = _in_process(capsys, "consolidate", tmp_path / "absent", tmp_path / "model.pt")
    assert code == 2
    assert err.strip().splitlines() == [
        f"omnimoe-ckpt: error: {tmp_path / 'absent'}: no such checkpoint folder"
    ]
    assert not (tmp_path / "model.pt").exists()


def test_consolidate_of_a_run_directory_names_a_checkpoint_to_give(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Was "meta.json is missing (the save did not finish)": a run directory (or a folder of
    checkpoints) is not one checkpoint, and nothing about it is unfinished."""
    run = tmp_path / "run"
    for step in (1, 2):
        (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    for path in (run, run / "checkpoints"):
        code, _, err = _in_process(capsys, "consolidate", path, tmp_path / "model.pt")
        assert code == 2
        assert err.strip().splitlines() == [
            f"omnimoe-ckpt: error: {path}: not a checkpoint folder (no meta.json); give one "
            f"checkpoint, e.g. the newest: {run / 'checkpoints' / 'step_00000002'}"
        ]
    assert not (tmp_path / "model.pt").exists()


def test_consolidate_refuses_an_output_it_cannot_write_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Was a traceback after the whole load, leaving ``<OUT>.tmp`` behind, for an OUT that is
    a folder or under a file."""
    folder = tmp_path / "step_00000002"  # refused before its files are looked at
    folder.mkdir()
    (tmp_path / "afile").write_text("")
    for out, rule in (
        (tmp_path, f"is a folder; give the file to write, e.g. {tmp_path / 'model.pt'}"),
        (tmp_path / "afile" / "model.pt", f"{tmp_path / 'afile'} is not a folder"),
    ):
        code, _, err = _in_process(capsys, "consolidate", folder, out)
        assert code == 2
        assert err.strip().splitlines() == [f"omnimoe-ckpt: error: {out}: {rule}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "step_00000002"]


def test_consolidate_refuses_an_output_inside_the_checkpoint_or_unwritable(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """OUT = the checkpoint's own ``meta.json`` was overwritten with the weights (the
    checkpoint destroyed, exit 0); OUT under /proc was torch's RuntimeError traceback after the
    whole load."""
    folder = tmp_path / "step_00000002"
    folder.mkdir()
    (folder / "meta.json").write_text("{}")
    for out in (folder / "meta.json", folder / "sub" / "model.pt"):
        code, _, err = _in_process(capsys, "consolidate", folder, out)
        assert code == 2
        assert err.strip().splitlines() == [
            f"omnimoe-ckpt: error: {out}: inside the checkpoint {folder}; write the weights "
            "outside it"
        ]
    assert (folder / "meta.json").read_text() == "{}" and not (folder / "sub").exists()
    if Path("/proc/self").is_dir():  # no file can be made in /proc, root or not
        code, _, err = _in_process(capsys, "consolidate", folder, "/proc/model.pt")
        assert code == 2
        assert err.strip().splitlines() == [
            "omnimoe-ckpt: error: /proc/model.pt: cannot write there (No such file or directory "
            "in /proc)"
        ]


def test_inspect_of_a_run_directory_reads_its_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "checkpoints" / "step_00000003").mkdir(parents=True)
    code, out, _ = _in_process(capsys, "inspect", tmp_path)
    assert code == 2  # the one checkpoint is unfinished: reported as such, not "no checkpoints"
    assert out.strip().splitlines() == [
        "step_00000003: INVALID: meta.json is missing (the save did not finish)"
    ]


def _hand_made_checkpoint(folder: Path, step: int) -> None:
    """A valid checkpoint of one empty file, with no engine (no tensor sizes are read)."""
    from omnimoe_train.checkpoint.files import FORMAT

    folder.mkdir(parents=True)
    (folder / "a").write_text("")
    listed = {"a": {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}}
    (folder / "meta.json").write_text(json.dumps({"format": FORMAT, "step": step, "files": listed}))


def test_inspect_of_a_folder_names_the_checkpoint_a_resume_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A folder whose newest checkpoint is invalid exits 0 (a resume falls back to an older
    one), which the output did not say: it listed the invalid one last, nothing after it."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _hand_made_checkpoint(root / f"step_{step:08d}", step)
    code, out, err = _in_process(capsys, "inspect", tmp_path)  # a run directory
    assert code == 0 and err == ""
    assert out.strip().splitlines()[-1] == "resume: continues from step_00000003"
    (root / "step_00000003" / "a").write_text("changed")
    (root / "step_00000002" / "meta.json").unlink()
    code, out, err = _in_process(capsys, "inspect", root)
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    assert lines[-3:] == [
        "step_00000002: INVALID: meta.json is missing (the save did not finish)",
        "step_00000003: INVALID: a has 7 bytes, meta.json lists 0",  # was "truncated (7 of 0"
        "resume: continues from step_00000001, the newest valid one (the invalid "
        "step_00000002, step_00000003 skipped)",
    ]
    code, out, _ = _in_process(capsys, "inspect", root, "--json")  # JSON: as it was
    assert code == 0 and [r["valid"] for r in json.loads(out)] == [True, False, False]


def test_inspect_of_a_missing_folder_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Was "step_00000002: INVALID: meta.json is missing (the save did not finish)"."""
    absent = tmp_path / "step_00000002"
    code, out, err = _in_process(capsys, "inspect", absent)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"omnimoe-ckpt: error: {absent}: no such checkpoint folder"]


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        ({}, "no integer step"),
        ({"step": 2}, "no files listed"),
        ({"step": 2, "files": {}}, "no files listed"),  # was "valid (0 files, ...)"
        ({"step": 2, "files": {"a": {}}}, "no bytes and sha256 for a"),
        ({"step": 2, "files": {"a": {"bytes": "0", "sha256": "x"}}}, "no bytes and sha256 for a"),
    ],
)
def test_a_malformed_meta_json_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture, meta: dict, problem: str
) -> None:
    """A hand-edited or foreign ``meta.json`` of our format was a KeyError traceback."""
    from omnimoe_train.checkpoint.files import FORMAT

    folder = tmp_path / "step_00000002"
    folder.mkdir()
    (folder / "a").write_text("")
    (folder / "meta.json").write_text(json.dumps({"format": FORMAT, **meta}))
    line = f"omnimoe-ckpt: error: {folder}: meta.json is malformed: {problem}"
    code, _, err = _in_process(capsys, "inspect", folder)
    assert code == 2 and err.strip().splitlines() == [line]
    code, _, err = _in_process(capsys, "consolidate", folder, tmp_path / "model.pt")
    assert code == 2 and err.strip().splitlines() == [line]
    assert not (tmp_path / "model.pt").exists()


def test_consolidate_of_a_config_this_version_does_not_know_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A checkpoint whose recorded config has a key this version lacks (written by another
    version) was an omegaconf traceback."""
    from omnimoe_train.checkpoint.files import FORMAT

    folder = tmp_path / "step_00000002"
    folder.mkdir()
    (folder / "a").write_text("")
    listed = {"a": {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}}
    meta = {"format": FORMAT, "step": 2, "files": listed, "engine": "megatron", "vocab_size": 256}
    for config, rule in (
        ({"model": {"expert_dropout": 0.1}}, "Key 'expert_dropout' not in 'ModelConfig'"),
        (
            {"model": {"num_layers": "four"}},
            "Value 'four' of type 'str' could not be converted to Integer",
        ),
    ):
        (folder / "meta.json").write_text(json.dumps({**meta, "config": config}))
        code, _, err = _in_process(capsys, "consolidate", folder, tmp_path / "model.pt")
        assert code == 2
        assert (
            err.strip().splitlines()
            == [
                f"omnimoe-ckpt: error: {folder}: meta.json's run config does not fit this version: "
                f"{rule}"
            ]
            or rule in err
        ), err
    assert not (tmp_path / "model.pt").exists()
