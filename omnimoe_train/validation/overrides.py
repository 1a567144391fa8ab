"""Rules on the command line's overrides as typed, before composition converts them.

OmegaConf converts a value to its field's type when the config is composed: a bool field takes
``2``, ``yes``, ``on`` or ``1`` as ``True`` (and ``0``, ``no``, ``off`` as ``False``), so a slip
such as ``checkpoint.save_final=2`` would pass silently. These checks read the overrides as
Hydra's grammar parses them (``true`` / ``false`` in any case are bools; anything else is not):

* :func:`strict_bools`: every bool field of the schema (``config.RootConfig``, walked
  generically, also through a mapping value such as ``checkpoint={save_final: 2}``) takes only
  ``true`` or ``false`` (``null`` too where the field is optional);
* :func:`group_given_null`: ``deepspeed=null`` names the group's options, not Hydra's message
  about override types;
* :func:`empty_mappings`: ``deepspeed.zero_optimization={}`` merges into the preset's mapping
  and changes nothing, so it is refused (checked on the composed config, which knows the preset).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from omnimoe_train.config import RootConfig
from omnimoe_train.validation.errors import ConfigError


def parsed_overrides(overrides: list[str], hydra_keys: bool = False) -> list[Any]:
    """Hydra's parsed overrides (``hydra.core.override_parser.types.Override``), the ``hydra.*``
    ones left out unless ``hydra_keys`` (Hydra's own config is not the schema's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [ov for ov in parsed if hydra_keys or not ov.key_or_group.startswith("hydra")]


@functools.cache
def _field_types(schema: type) -> dict[str, Any]:
    """The resolved annotation of each field of dataclass ``schema`` (the module uses
    ``from __future__ import annotations``: the raw annotations are strings)."""
    return typing.get_type_hints(schema)


def _schema_type(dotted: str) -> Any:
    """The annotated type of dotted key ``dotted`` in ``RootConfig``; None when the schema does
    not declare it (a free-form ``deepspeed`` key, or an unknown key, which composition
    rejects)."""
    node: Any = RootConfig
    for part in dotted.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
        node = _field_types(node).get(part)
        if node is None:
            return None
    return node


def _bool_field(annotation: Any) -> tuple[bool, bool]:
    """(is a bool field, accepts None) for a field annotation: ``bool`` or ``bool | None``."""
    if annotation is bool:
        return True, False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and bool in args:
        return True, type(None) in args
    return False, False


def check_value(key: str, value: Any) -> None:
    """Raise :class:`ConfigError` where ``value`` (a plain value or a mapping of them, as an
    override or a YAML file gives it) sets a bool field of the schema at dotted ``key`` (or
    under it) to anything but a bool."""
    annotation = _schema_type(key)
    if isinstance(value, dict):
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            for sub, sub_value in value.items():
                check_value(f"{key}.{sub}", sub_value)
        return
    is_bool, optional = _bool_field(annotation)
    if not is_bool or isinstance(value, bool) or (value is None and optional):
        return
    if isinstance(value, str) and value.startswith("${"):
        return  # an interpolation: its target is another key, checked where it is set
    if value is None:
        return  # a non-optional field given null: composition rejects it with its own line
    allowed = "true, false or null" if optional else "true or false"
    shown = repr(value) if isinstance(value, str) else value
    raise ConfigError(key, f"a bool key: must be {allowed} (got {shown})")


def strict_bools(overrides: list[str]) -> None:
    """Raise :class:`ConfigError` for an override giving a bool field of the schema anything but
    a bool (``2``, ``1``, ``yes``, ``on``, ``"true"`` quoted). Deletions (``~key``) are left to
    Hydra."""
    for ov in parsed_overrides(overrides):
        if ov.is_delete() or ov.is_sweep_override():
            continue  # a sweep is checked combination by combination
        check_value(ov.key_or_group, ov.value())


def group_given_null(overrides: list[str], group_options: Callable[[str], list[str]]) -> None:
    """Raise :class:`ConfigError` for ``group=null`` where ``group`` is a config group: Hydra's own
    error ("Config group override must be a string or a list") names neither the group nor its
    options. ``group_options(group)``: the group's options, empty for a key that is no group."""
    for ov in parsed_overrides(overrides):
        if ov.is_delete() or ov.is_sweep_override() or "." in ov.key_or_group:
            continue
        if ov.value() is None:
            options = group_options(ov.key_or_group)
            if options:
                raise ConfigError(
                    ov.key_or_group, f"must be one of {', '.join(options)} (got null)"
                )


def empty_mappings(overrides: list[str], dcfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for ``key={}`` where the composed config ``dcfg`` holds a
    mapping with keys there: Hydra merges the empty mapping into it, so the preset stays as it
    was while the command line reads as if it were cleared."""
    for ov in parsed_overrides(overrides):
        if ov.is_delete() or ov.is_sweep_override():
            continue
        if ov.value() == {} and isinstance(ov.value(), dict):
            key = ov.key_or_group
            held = OmegaConf.select(dcfg, key, default=None)
            if isinstance(held, DictConfig) and len(held) > 0:
                raise ConfigError(
                    key,
                    "an empty mapping merges into the preset and changes nothing; set its keys "
                    f"({key}.<name>=value) or remove it with ~{key}",
                )
