"""Overrides refused as typed, before composition converts them (``validation.overrides``): a
bool key given anything but true/false (OmegaConf took ``2``, ``yes``, ``1`` as true), an empty
mapping that would merge into a preset and change nothing, a config group given ``null``. Each
is one line naming the key and the rule, exit 2."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from omnimoe_train import cli
from omnimoe_train.config import RootConfig
from tests.cli_helpers import PRECHECK_ERROR, assert_usage_error, precheck_line, run_train_cli, tiny

pytestmark = pytest.mark.usefixtures("cli_registered")


def _bool_keys(schema: type = RootConfig, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted key, optional) of every bool field of the schema, found by walking it (a new bool
    key is covered without a change here)."""
    found = []
    for name, annotation in typing.get_type_hints(schema).items():
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            found += _bool_keys(annotation, f"{prefix}{name}.")
        elif annotation is bool or bool in typing.get_args(annotation):
            found.append((f"{prefix}{name}", type(None) in typing.get_args(annotation)))
    return found


BOOL_KEYS = _bool_keys()


def test_the_schema_has_bool_keys() -> None:
    assert ("checkpoint.save_final", False) in BOOL_KEYS
    assert ("model.fused_swiglu", True) in BOOL_KEYS


@pytest.mark.parametrize(("key", "optional"), BOOL_KEYS)
def test_every_bool_key_is_strict(
    key: str, optional: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    allowed = "true, false or null" if optional else "true or false"
    for value, shown in (("2", "2"), ("yes", "'yes'"), ("1", "1"), ('"true"', "'true'")):
        line = precheck_line([f"{key}={value}"], capsys)
        assert line == f"{key}: a bool key: must be {allowed} (got {shown})", line


def test_bools_as_typed_still_pass(capsys: pytest.CaptureFixture[str]) -> None:
    cli.precheck(
        ["checkpoint.save_final=false", "trainer.progress=True", "model.fused_swiglu=null"], 1
    )
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["checkpoint={save_final: on}"],  # a mapping value reaches its bool fields too
        ["-m", "checkpoint.save_final=true,2"],  # each combination of a sweep
    ],
)
def test_bools_in_mappings_and_sweeps(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert precheck_line(argv, capsys).startswith("checkpoint.save_final: a bool key: must be ")


@pytest.mark.parametrize("key", ["deepspeed.zero_optimization", "deepspeed"])
def test_empty_mapping_over_a_preset_is_refused(
    key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``deepspeed.zero_optimization={}`` kept the zero2 preset's stage silently."""
    assert precheck_line([f"{key}={{}}"], capsys) == (
        f"{key}: an empty mapping merges into the preset and changes nothing; set its keys "
        f"({key}.<name>=value) or remove it with ~{key}"
    )


@pytest.mark.parametrize("multirun", [False, True])
def test_group_given_null_names_its_options(
    multirun: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was Hydra's "Config group override must be a string or a list. Got NoneType"."""
    argv = ["-m", "deepspeed=null"] if multirun else ["deepspeed=null"]
    assert precheck_line(argv, capsys) == (
        "deepspeed: must be one of zero0, zero1, zero2, zero2_offload, zero3, zero3_offload "
        "(got null)"
    )


def test_strict_bool_through_the_entry_point(tmp_path: Path) -> None:
    result = run_train_cli([*tiny(), "checkpoint.save_final=2"], cache=tmp_path, timeout=120)
    assert_usage_error(
        result, f"{PRECHECK_ERROR}checkpoint.save_final: a bool key: must be true", tmp_path
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (
            "deepspeed.zero_optimization.overlap_comm=false",
            "deepspeed.zero_optimization.overlap_comm",
        ),
        ("deepspeed.tensorboard.enabled=true", "deepspeed.tensorboard.enabled"),  # a new section
    ],
)
def test_deepspeed_key_outside_the_preset_says_to_add_it_with_plus(
    override: str, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was "unknown key (not in the config schema)": the key is DeepSpeed's and may be right,
    only the preset does not set it."""
    assert precheck_line(["trainer.engine=deepspeed", override], capsys) == (
        f"{key}: not in the deepspeed preset (conf/deepspeed/); a DeepSpeed key the preset does "
        f"not set is added with + (Hydra's append syntax): +{override}"
    )


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (  # was +deepspeed.zero_optimization.overlap_comm=False (the first combination)
            ["-m", "deepspeed.zero_optimization.overlap_comm=false,true"],
            "+deepspeed.zero_optimization.overlap_comm=false,true",
        ),
        (  # was +deepspeed.x=1 (the first combination), unquoted for the shell
            ["-m", "deepspeed.x=range(1,3)", "model.top_k=2,4"],
            "'+deepspeed.x=range(1,3)'",
        ),
        (["deepspeed.x=a b"], "'+deepspeed.x=a b'"),  # was +deepspeed.x=a (cut at the space)
    ],
)
def test_deepspeed_plus_hint_repeats_the_override_as_typed(
    argv: list[str], hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a sweep the hint showed Hydra's expansion of one combination, not the user's text."""
    key = next(a for a in argv if a.startswith("deepspeed.")).partition("=")[0]
    assert precheck_line([*argv, "trainer.engine=deepspeed"], capsys) == (
        f"{key}: not in the deepspeed preset (conf/deepspeed/); a DeepSpeed key the preset does "
        f"not set is added with + (Hydra's append syntax): {hint}"
    )


def test_unknown_key_of_ours_is_still_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert precheck_line(["trainer.maxsteps=3"], capsys) == (
        "trainer.maxsteps: unknown key (not in the config schema)"
    )
