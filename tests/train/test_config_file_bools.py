"""Bool values written in YAML files (a user's own experiment or group option, found through
``hydra.searchpath``) follow the command line's rule: ``save_final: yes`` or ``2`` is one line
naming the full key (and the file), exit 2, before any work. YAML 1.1 read ``yes`` as true and
OmegaConf took ``2`` as true, so both passed silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnimoe_train import cli
from tests.cli_helpers import PRECHECK_ERROR, assert_usage_error, precheck_line, run_train_cli, tiny

pytestmark = pytest.mark.usefixtures("cli_registered")


def _user_conf(root: Path, group: str, name: str, body: str) -> str:
    """Write ``<root>/conf/<group>/<name>.yaml``; the override that adds the folder to Hydra's
    search path."""
    folder = root / "conf" / group
    folder.mkdir(parents=True)
    (folder / f"{name}.yaml").write_text(body)
    return f"hydra.searchpath=[file://{root / 'conf'}]"


EXPERIMENT = "# @package _global_\ncheckpoint:\n  save_final: {value}\ntrainer:\n  max_steps: 30\n"


@pytest.mark.parametrize(("value", "shown"), [("yes", "'yes'"), ("2", "2"), ("on", "'on'")])
def test_bool_in_a_users_experiment_file(
    value: str, shown: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    search = _user_conf(tmp_path, "experiment", "mine", EXPERIMENT.format(value=value))
    assert precheck_line([search, "+experiment=mine"], capsys) == (
        f"checkpoint.save_final: a bool key: must be true or false (got {shown}); "
        "set in experiment/mine.yaml"
    )


def test_bool_in_a_group_option_and_a_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A group's own file lands at the group's package: the key is the full one."""
    search = _user_conf(tmp_path, "model", "mine", "name: mine\nfused_swiglu: 1\n")
    assert precheck_line(["-m", search, "model=tiny,mine"], capsys) == (
        "model.fused_swiglu: a bool key: must be true, false or null (got 1); "
        "set in model/mine.yaml"
    )


def test_true_false_and_null_in_files_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = EXPERIMENT.format(value="True") + "model:\n  fused_swiglu: null\n"
    search = _user_conf(tmp_path, "experiment", "mine", body)
    cli.precheck([search, "+experiment=mine"], 1)
    assert capsys.readouterr().err == ""


def test_through_the_entry_point(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    search = _user_conf(tmp_path, "experiment", "mine", EXPERIMENT.format(value="yes"))
    result = run_train_cli([*tiny(), search, "+experiment=mine"], cache=work, timeout=120)
    assert_usage_error(
        result, f"{PRECHECK_ERROR}checkpoint.save_final: a bool key: must be true or false", work
    )


@pytest.mark.parametrize(
    ("body", "line"),
    [
        (
            "# @package _global_\ntrainer:\n  max_steps: [1, 2]\n",
            "trainer.max_steps: Value '[1, 2]' of type 'ListConfig' could not be converted to "
            "Integer (in experiment/mine.yaml)",
        ),
        (
            "# @package _global_\nbogus: 1\n",
            "bogus: unknown key (not in the config schema) (in experiment/mine.yaml)",
        ),
        (
            "trainer:\n  max_steps: 3\n",
            "experiment: unknown key (not in the config schema) (in experiment/mine.yaml: a file "
            "of group experiment puts its keys under experiment: unless its first line is "
            "'# @package _global_')",
        ),
        (
            "# @package _global_\ntrainer: {max_steps: 3\n",
            "{conf}/experiment/mine.yaml, line 3, column 1: not valid YAML (while parsing a flow "
            "mapping; expected ',' or '}}', but got '<stream end>')",
        ),
    ],
)
def test_a_bad_value_key_or_syntax_in_a_users_file_names_key_and_file(
    body: str, line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, the one line was Hydra's first: "In 'experiment/mine': ValidationError raised
    while composing config:" (or PyYAML's "while parsing a flow mapping"), naming neither the
    key nor the rule (nor, for YAML, the file)."""
    search = _user_conf(tmp_path, "experiment", "mine", body)
    assert precheck_line([search, "+experiment=mine"], capsys) == line.format(
        conf=tmp_path / "conf"
    )
