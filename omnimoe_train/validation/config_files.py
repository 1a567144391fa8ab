"""Strict bools in the YAML files a run composes (config groups, experiments, a user's own).

PyYAML reads YAML 1.1, where ``yes``, ``no``, ``on`` and ``off`` are bools, and OmegaConf turns an
integer such as ``2`` into ``True`` when it merges it into a bool field: ``save_final: yes`` or
``save_final: 2`` in an experiment file would pass silently, while the same value on the command
line is refused (``overrides.strict_bools``). Here every file of the composition's defaults list
is read again with a loader that takes only ``true`` / ``false`` (``True``, ``TRUE``, ...) as
bools, and each value is checked at its full key by the command line's rule.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf._utils import get_yaml_loader

from omnimoe_train.validation.errors import ConfigError
from omnimoe_train.validation.overrides import check_value, parsed_overrides

_BOOL_TAG = "tag:yaml.org,2002:bool"


@functools.cache
def _strict_loader() -> type:
    """OmegaConf's YAML loader without YAML 1.1's word bools: ``yes`` stays the string 'yes'."""

    class StrictBoolLoader(get_yaml_loader()):  # type: ignore[misc]
        pass

    StrictBoolLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
        for first, resolvers in get_yaml_loader().yaml_implicit_resolvers.items()
    }
    StrictBoolLoader.add_implicit_resolver(
        _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    return StrictBoolLoader


def _read_source(path: str, config_path: str) -> str | None:
    """The text of ``<config_path>.yaml`` in the search-path entry ``path`` (``file://dir`` or
    ``pkg://module``, as Hydra writes them); None where it is not there (or the entry is a
    structured-config one, typed by the schema)."""
    scheme, _, where = path.partition("://")
    name = f"{config_path}.yaml"
    if scheme == "file":
        file = Path(where) / name
        return file.read_text(encoding="utf-8") if file.is_file() else None
    if scheme == "pkg":
        try:
            res = resources.files(where.replace("/", ".")).joinpath(name)
        except (ModuleNotFoundError, ValueError, TypeError):
            return None
        return res.read_text(encoding="utf-8") if res.is_file() else None
    return None


def _check_file(text: str, package: str, shown: str, deepspeed: bool) -> None:
    """Check each value of one config file, merged at ``package`` ('' for the root); the
    ``deepspeed`` section's too (by DeepSpeed's models) when ``deepspeed``."""
    content = yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a safe loader subclass
    if not isinstance(content, dict):
        return
    for key, value in content.items():
        full = f"{package}.{key}" if package else str(key)
        if key == "defaults" or full.startswith("hydra"):
            continue  # the file's defaults list and Hydra's own config are not the schema's
        try:
            check_value(full, value)
            if deepspeed and full.split(".")[0] == "deepspeed":
                _check_deepspeed(full, value)
        except ConfigError as exc:
            raise ConfigError(exc.key, f"{exc.rule}; set in {shown}") from None


def _check_deepspeed(full: str, value: Any) -> None:
    """DeepSpeed's bool keys (``engine.deepspeed_bools``) in the value a file sets at ``full``
    (``deepspeed`` or a key under it)."""
    from omnimoe_train.engine.deepspeed_bools import deepspeed_bool_problem

    for part in reversed(full.split(".")[1:]):
        value = {part: value}
    problem = deepspeed_bool_problem(value) if isinstance(value, dict) else None
    if problem:
        raise ConfigError(*problem)


def strict_bools_in_files(
    loader: Any, config_name: str, overrides: list[str], deepspeed: bool = False
) -> None:
    """Raise :class:`ConfigError` for a value in a YAML file of the composition that gives a bool
    field of the schema anything but ``true`` / ``false`` (``null`` where it is optional).

    ``loader``: the Hydra config loader of an initialized Hydra (its defaults list and search
    path); ``overrides``: the command line's, ``hydra.searchpath=[...]`` included (a user's own
    config folders, searched after ours as Hydra does); ``deepspeed``: check the ``deepspeed``
    section's bool keys too (``trainer.engine=deepspeed``, DeepSpeed installed)."""
    from hydra.types import RunMode

    defaults = loader.compute_defaults_list(config_name, overrides, RunMode.RUN).defaults
    paths = [element.path for element in loader.get_search_path().get_path()]
    for ov in parsed_overrides(overrides, hydra_keys=True):
        if ov.get_key_element() == "hydra.searchpath" and isinstance(ov.value(), list):
            paths += [str(p) for p in ov.value()]
    for default in defaults:
        if default.config_path is None or (default.package or "").startswith("hydra"):
            continue
        for path in paths:  # the first entry that holds the file is the one Hydra loads
            text = _read_source(path, default.config_path)
            if text is not None:
                shown = f"{default.config_path}.yaml"
                _check_file(text, default.package or "", shown, deepspeed)
                break
