"""Hydra's ``--config-dir DIR`` / ``-cd DIR`` (an extra config folder) gets the pre-check: the
pre-check skipped itself for any option but ``-m``, so a bad value in an experiment file of that
folder reached the run (or Hydra's own error) instead of one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnimoe_train import cli
from tests.cli_helpers import PRECHECK_ERROR, assert_usage_error, precheck_line, run_train_cli, tiny

pytestmark = pytest.mark.usefixtures("cli_registered")

BAD_EXPERIMENT = "# @package _global_\nmodel:\n  top_k: 0\n"
TOP_K_RULE = "model.top_k: must be in [1, model.num_experts=1024] (got 0)"


def _conf(root: Path, group: str, name: str, body: str) -> Path:
    """``<root>/<group>/<name>.yaml`` holding ``body``; returns ``root``."""
    (root / group).mkdir(parents=True, exist_ok=True)
    (root / group / f"{name}.yaml").write_text(body)
    return root


@pytest.mark.parametrize("form", ["--config-dir", "-cd", "--config-dir="])
@pytest.mark.parametrize("multirun", [False, True])
def test_bad_value_in_a_config_dir_experiment_is_one_line(
    form: str, multirun: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = _conf(tmp_path / "my conf", "experiment", "bad", BAD_EXPERIMENT)  # a space, too
    given = [form + str(conf)] if form.endswith("=") else [form, str(conf)]
    sweep = ["-m", "model.num_layers=2,3"] if multirun else []
    assert precheck_line([*sweep, *given, "+experiment=bad"], capsys) == TOP_K_RULE


def test_config_dir_and_searchpath_are_both_searched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The folder is added to the ``hydra.searchpath`` the user gives, not instead of it."""
    searched = _conf(tmp_path / "searched", "model", "mine", "defaults:\n  - tiny\n  - _self_\n")
    conf = _conf(tmp_path / "extra", "experiment", "good", "# @package _global_\n")
    argv = ["-cd", str(conf), f"hydra.searchpath=[file://{searched}]", "model=mine"]
    cli.precheck([*argv, "+experiment=good", "trainer.device=cpu"], world_size=1)
    assert capsys.readouterr().err == ""
    _conf(conf, "experiment", "bad", BAD_EXPERIMENT)
    assert precheck_line([*argv, "+experiment=bad"], capsys).startswith("model.top_k: must be")


def test_config_dir_that_is_not_a_folder_or_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hydra's own answers were a multi-line error (exit 1) and argparse's usage text."""
    absent = tmp_path / "absent"
    assert precheck_line(["-cd", str(absent), "model=tiny"], capsys) == (
        f"-cd: {absent} is not a folder (the extra config folder Hydra searches)"
    )
    assert precheck_line(["model=tiny", "--config-dir"], capsys) == (
        "--config-dir: needs a folder (--config-dir DIR)"
    )


def test_through_the_entry_point(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    conf = _conf(tmp_path / "conf", "experiment", "bad", BAD_EXPERIMENT)
    result = run_train_cli(
        [*tiny(model__top_k=None), "--config-dir", str(conf), "+experiment=bad"],
        cache=work,
        timeout=120,
    )
    assert_usage_error(result, f"{PRECHECK_ERROR}model.top_k: must be in [1,", work)
