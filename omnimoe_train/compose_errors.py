"""One line, naming the key, from Hydra's and OmegaConf's multi-line composition errors (an
unknown config-group option, an override that does not parse, a key the schema does not
declare), for ``omnimoe-train``'s pre-check and ``omnimoe-params``."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

import yaml

#: The package holding ``conf/`` (Hydra's ``pkg://`` search-path entry).
CONFIG_MODULE = "omnimoe_conf"


def compose_error(exc: Exception, sweeps: bool = True, typed: Sequence[str] = ()) -> str:
    """One line from Hydra/OmegaConf's multi-line errors, naming the key: a config group's
    unknown option (with the group's options), an override that does not parse, a sweep value
    without ``-m`` (``sweeps``: whether the tool takes ``-m``), else the full key and the first
    line. ``typed``: the overrides as the user typed them, for a hint that repeats one (Hydra
    quotes the one it composed: in a sweep, one combination's value, as Python prints it)."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    inner: BaseException = exc
    chain = [exc]
    while inner.__cause__ is not None:
        inner = inner.__cause__
        chain.append(inner)
    for error in chain:
        if isinstance(error, MissingConfigException) and error.missing_cfg_file:
            return _unknown_group_option(error.missing_cfg_file, error.options)
        if isinstance(error, OverrideParseException):
            return _unparsable_override(error)
        if isinstance(error, yaml.MarkedYAMLError):
            return _yaml_syntax_error(error)
        sweep = _SWEEP_WITHOUT_MULTIRUN.search(str(error))
        if sweep:
            return _sweep_without_multirun(sweep[1] or sweep[2], bool(sweep[1]), sweeps)
    # A bad value or key in a config file (a user's own, through hydra.searchpath): Hydra's
    # message is "In 'experiment/mine': ValidationError raised while composing config:" and
    # the key and the reason on the lines after it; OmegaConf's error, which names the key,
    # is its context (not its cause). Before, only that first line was printed.
    source = None
    if isinstance(inner, ConfigCompositionException) and hasattr(inner.__context__, "full_key"):
        found = re.match(r"In '([^']+)':", str(inner))
        source = found[1] if found else None
        inner = inner.__context__
        chain.append(inner)
    line = _one_line(inner, chain, typed)
    if source is None:
        return line
    group = source.rpartition("/")[0]
    if group and getattr(inner, "full_key", None) == group.replace("/", "."):
        return (
            f"{line} (in {source}.yaml: a file of group {group} puts its keys under "
            f"{group}: unless its first line is '# @package _global_')"
        )
    return f"{line} (in {source}.yaml)"


def _one_line(inner: BaseException, chain: list[BaseException], typed: Sequence[str]) -> str:
    """``<full key>: <rule>`` from OmegaConf's error ``inner`` (``chain``: the errors it came
    through; ``typed``: the overrides as typed), or its first line when it names no key."""
    full_key = getattr(inner, "full_key", None)
    first = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    if "not in" in first and "Key" in first:
        if full_key and str(full_key).startswith("deepspeed."):
            return _deepspeed_append_hint(chain, str(full_key), typed)
        first = "unknown key (not in the config schema)"
    elif "is not a ListConfig, list or tuple" in first:  # data.inputs=a.txt for [a.txt]
        value = getattr(inner, "value", None)
        first = (
            f"a list: write {full_key}=[{value}] (brackets, commas between items; got {value!r})"
        )
    return f"{full_key}: {first}" if full_key else first


def _yaml_syntax_error(error: yaml.MarkedYAMLError) -> str:
    """A config file that is not YAML: where, and the parser's reason (PyYAML spreads them
    over four lines)."""
    mark = error.problem_mark or error.context_mark
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    reason = "; ".join(part for part in (error.context, error.problem) if part)
    return f"{where}not valid YAML ({reason or 'syntax error'})"


# Hydra's two messages for a sweep value (``a=1,2``, ``a=range(1,3)``) in a run without
# ``--multirun``; each quotes the override as typed.
_SWEEP_WITHOUT_MULTIRUN = re.compile(
    r"^Ambiguous value for argument '(.*)'$|^Sweep parameters '(.*)' requires --multirun$",
    re.MULTILINE,
)


def _sweep_without_multirun(override: str, comma: bool, sweeps: bool) -> str:
    """``model=tiny,a80m`` without ``-m``: Hydra's four lines (a list, a quoted string or a
    sweep) in one, naming the key; a comma sweep is the usual intent, so ``-m`` comes first
    (where the tool has no ``-m``, it says so). ``comma``: a bare comma list (which may also be
    meant as a list or a string), not ``range(...)``/``choice(...)``."""
    key = override.partition("=")[0].lstrip("+~")
    line = f"{key}: {override!r} is a sweep; " + (
        "add -m to sweep it" if sweeps else "this tool takes one config (no sweeps)"
    )
    if comma:
        line += " (or write [a,b] for a list, or quote the value for a string with a comma)"
    return line


def _deepspeed_append_hint(chain: list[BaseException], full_key: str, typed: Sequence[str]) -> str:
    """``deepspeed.KEY=value`` for a key the preset does not set: the ``deepspeed`` section is
    DeepSpeed's free-form config, so the key may well be right; Hydra adds it only with ``+``.
    The hint repeats the user's override with ``+`` (``typed``), else Hydra's suggestion (the
    key's override in a config file, e.g. an experiment's sweeper params)."""
    suggested = re.search(
        r"^Could not override '(deepspeed\.[^']+)'\.$\n^To append to your config use (\+.*)$",
        "\n".join(map(str, chain)),
        re.MULTILINE,
    )
    key, append = (suggested[1], suggested[2]) if suggested else (full_key, f"+{full_key}=...")
    mine = [o for o in typed if o.partition("=")[0] == key]  # as typed: no + (it would compose)
    if mine:
        # The last one of a key is the one composed; quoted for the shell where it needs it
        # (``deepspeed.x=range(1,3)``, a space the user's own quotes kept).
        append = shlex.quote(f"+{mine[-1]}")
    return (
        f"{key}: not in the deepspeed preset (conf/deepspeed/); a DeepSpeed key the preset "
        f"does not set is added with + (Hydra's append syntax): {append}"
    )


def _unknown_group_option(missing: str, options: list[str] | None) -> str:
    """``model=nonexistent``: Hydra's message spans the options and its search path, one a
    line; ours names the group, as the choice rules of ``validation`` do."""
    group, _, option = missing.rpartition("/")
    if not group:  # the primary config itself
        return f"config {missing!r} not found"
    if not options:  # Hydra lists them only for some failures (e.g. model=[a,b])
        options = group_options(group)
    return f"{group}: must be one of {', '.join(options)} (got {option!r})"


def group_options(group: str) -> list[str]:
    """The configs Hydra's search path holds for ``group`` (``model``, ``hydra/launcher``)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return list(loader.get_group_options(group, results_filter=ObjectType.CONFIG))


def _unparsable_override(exc: Exception) -> str:
    """An override Hydra's grammar does not parse: its key (the text before ``=``) and the
    parser's reason, without the lines Hydra adds (a link, a caret under the bad character)."""
    override = str(getattr(exc, "override", "") or "")
    lines = str(exc).strip().splitlines()
    reason = "not valid"
    for i, line in enumerate(lines):
        if line.strip() == "^" and i > 0 and override in lines[i - 1]:  # the lexer's caret
            pos = line.index("^") - lines[i - 1].index(override)
            if 0 <= pos < len(override):
                reason = (
                    f"unexpected character {override[pos]!r} at position {pos}; quote the value"
                )
                break
        elif line.strip() and not line.startswith(("See https", "Error parsing override")):
            reason = line.strip()
    key = override.partition("=")[0] or override
    return (
        f"{key}: cannot parse the override {override!r} ({reason}); the form is key=value, "
        "+key=value or ~key"
    )
