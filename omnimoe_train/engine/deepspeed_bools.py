"""Strict bools for DeepSpeed's own keys, from DeepSpeed's pydantic config models.

Pydantic's lax mode takes ``yes``, ``on``, ``1`` (and ``"true"``) for a bool field, so
``+deepspeed.zero_optimization.overlap_comm=yes`` passed while the same value for one of our bool
keys is refused (``validation.overrides``). Which keys are bools is read from the models of
``deepspeed_config.SECTION_MODELS`` (a field annotated ``bool`` or ``bool | None``, found by name
or alias, nested models followed), not from a list of ours.
"""

from __future__ import annotations

import importlib
import types
import typing
from typing import Any


def _field(model: type, key: str) -> Any:
    """The annotation of the field of pydantic ``model`` named or aliased ``key``; None when it
    has none (an unknown key: the model's own validation names it)."""
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        if key in (name, info.alias):
            return info.annotation
    return None


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without ``None``, whether it accepts None)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _bad_bool(model: type, values: dict[str, Any], prefix: str) -> tuple[str, str] | None:
    import pydantic

    for key, value in values.items():
        annotation, optional = _unwrap(_field(model, str(key)))
        full = f"{prefix}.{key}"
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            if isinstance(value, dict):
                problem = _bad_bool(annotation, value, full)
                if problem:
                    return problem
            continue
        if annotation is not bool or isinstance(value, bool) or (value is None and optional):
            continue
        if isinstance(value, str) and value.startswith("${"):
            continue  # an interpolation: checked where its target is set
        allowed = "true, false or null" if optional else "true or false"
        shown = repr(value) if isinstance(value, str) else "null" if value is None else value
        return full, f"a bool key of DeepSpeed's {model.__name__}: must be {allowed} (got {shown})"
    return None


def deepspeed_bool_problem(ds: dict[str, Any]) -> tuple[str, str] | None:
    """The first key of the ``deepspeed`` section ``ds`` whose DeepSpeed model field is a bool
    but whose value is not one (``yes``, ``on``, ``1``, ``2``, ``"true"``), as (full key, rule);
    None otherwise. Needs DeepSpeed installed."""
    from omnimoe_train.engine.deepspeed_config import SECTION_MODELS

    for section, (module, name) in SECTION_MODELS.items():
        if isinstance(ds.get(section), dict):
            model = getattr(importlib.import_module(module), name)
            problem = _bad_bool(model, ds[section], f"deepspeed.{section}")
            if problem:
                return problem
    return None
