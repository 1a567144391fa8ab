"""``omnimoe-train -m`` as users type it: ``-m`` after the overrides, and ``glob(...)`` sweeps
of a config group, both accepted by the pre-check and handed to Hydra as a sweep."""

from __future__ import annotations

import sys

import pytest
from hydra._internal.utils import get_args_parser

from omnimoe_train import cli
from tests.cli_helpers import precheck_line


def test_multirun_flag_after_the_overrides_is_moved_to_the_front(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``omnimoe-train a=1,2 hydra.sweep.dir=x -m`` ended in Hydra's "unrecognized arguments:
    hydra.sweep.dir=x": its parser takes ``-m`` only before the overrides."""
    argv = ["model.top_k=2,4", "hydra.sweep.dir=sweeps", "-m", "trainer.max_steps=3"]
    seen: dict[str, list[str]] = {}
    monkeypatch.setattr(sys, "argv", ["omnimoe-train", *argv])
    monkeypatch.setattr(cli, "_register", lambda: None)
    monkeypatch.setattr(cli, "_clear_given_exit_status", lambda argv: None)
    monkeypatch.setattr(cli, "precheck", lambda argv: seen.setdefault("precheck", argv))
    monkeypatch.setattr(cli, "_hydra_main", lambda: seen.setdefault("hydra", sys.argv[1:]))
    monkeypatch.setattr(cli._STARTUP_STOP, "install", lambda: None)
    monkeypatch.setattr(cli._STARTUP_STOP, "hand_over", lambda: None)
    cli.main()
    expected = ["-m", "model.top_k=2,4", "hydra.sweep.dir=sweeps", "trainer.max_steps=3"]
    assert seen == {"precheck": expected, "hydra": expected}
    args = get_args_parser().parse_args(seen["hydra"])
    assert args.multirun and args.overrides == expected[1:]
    assert cli.multirun_first(["a=1", "--multirun", "-m"]) == ["--multirun", "a=1"]
    assert cli.multirun_first(["a=1"]) == ["a=1"]


def test_glob_sweep_of_a_config_group_passes_the_precheck() -> None:
    """``model=glob(a80m_*)`` failed the pre-check with "ConfigLoader is not set": its values
    are the group's options, which the parser needs the config loader to list."""
    cli._register()
    combos, swept = cli._sweep_combinations(["model=glob(a80m_*)", "trainer.device=cpu"])
    assert swept == ["model"]
    models = [combo[0] for combo in combos]
    assert "model=a80m" not in models and "model=a80m_dense" in models
    assert all(m.startswith("model=a80m_") for m in models) and len(models) >= 4
    cli.precheck(["-m", "model=glob(a80m_*)", "trainer.device=cpu"], world_size=1)


def test_two_of_hydras_modes_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """``-m ... --cfg job`` was Hydra's ValueError traceback ("Only one of --run, --multirun,
    --cfg, --info and --shell_completion can be specified")."""
    for argv, line in (
        (["-m", "model.top_k=2,4", "--cfg", "job"], "--cfg, --multirun"),
        (["--info", "--multirun"], "--info, --multirun"),
        (["-r", "-c", "job"], "--cfg, --run"),
    ):
        with pytest.raises(SystemExit) as info:
            cli.multirun_first(argv)
        assert info.value.code == 2
        assert capsys.readouterr().err == (
            f"omnimoe-train: error: {line}: give one of them (each is a mode of its own)\n"
        )
    assert cli.multirun_first(["--cfg", "job", "model.top_k=2"]) == [
        "--cfg",
        "job",
        "model.top_k=2",
    ]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["model=tiny,a80m", "trainer.device=cpu"],
            "model: 'model=tiny,a80m' is a sweep; add -m to sweep it (or write [a,b] for a "
            "list, or quote the value for a string with a comma)",
        ),
        (
            ["model.top_k=range(1,3)"],
            "model.top_k: 'model.top_k=range(1,3)' is a sweep; add -m to sweep it",
        ),
        (
            ["hydra.run.dir=a,b"],
            "hydra.run.dir: 'hydra.run.dir=a,b' is a sweep; add -m to sweep it (or write [a,b] "
            "for a list, or quote the value for a string with a comma)",
        ),
    ],
)
def test_sweep_value_without_multirun_is_one_line(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``model=tiny,a80m`` without ``-m`` printed the first of Hydra's four lines ("Ambiguous
    value for argument ..."), naming neither the key nor ``-m``."""
    cli._register()
    assert precheck_line(argv, capsys) == line


def test_sweep_value_in_omnimoe_params_says_it_takes_one_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``omnimoe-params`` has no ``-m``: its line must not suggest one."""
    from omnimoe_train.params_cli import main as params_main

    with pytest.raises(SystemExit) as info:
        params_main(["model=tiny,a80m"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "omnimoe-params: error: model: 'model=tiny,a80m' is a sweep; this tool takes one config "
        "(no sweeps) (or write [a,b] for a list, or quote the value for a string with a comma)"
    ]
