"""``omnimoe-train``: the Hydra entry point.

Before Hydra starts a run, the overrides are composed and validated here (for ``-m`` sweeps, every
combination), so a bad key or value costs no model, data or process-group work: it prints one
line naming the key and the rule and exits with code 2.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from omnimoe_train.config import RootConfig, register_configs
from omnimoe_train.exit_codes import EXIT_USAGE
from omnimoe_train.validation import ConfigError, validate

CONFIG_MODULE = "omnimoe_conf"


def _fail(message: str) -> None:
    print(f"omnimoe-train: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def to_root_config(dcfg: DictConfig) -> RootConfig:
    return OmegaConf.to_object(dcfg)  # type: ignore[return-value]


def _compose_error(exc: Exception) -> str:
    """One line from Hydra/OmegaConf's multi-line errors: the full key and the first line."""
    inner: BaseException = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    full_key = getattr(inner, "full_key", None)
    first = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    if "not in" in first and "Key" in first:
        first = "unknown key (not in the config schema)"
    return f"{full_key}: {first}" if full_key else first


def _sweep_combinations(overrides: list[str]) -> list[list[str]]:
    """Expand ``a=1,2 b=x,y`` into every combination, as Hydra's basic sweeper would."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for ov in parsed:
        if ov.is_sweep_override():
            key = ov.get_key_element()
            choices.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            choices.append([ov.input_line])
    return [list(combo) for combo in itertools.product(*choices)]


def precheck(argv: list[str]) -> None:
    """Compose and validate the config(s) that ``argv`` asks for; exit 2 on the first error."""
    from hydra import compose, initialize_config_module

    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-") and not a.startswith("hydra")]
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # --help, --cfg, --info ...: Hydra answers those itself
    try:
        combos = _sweep_combinations(overrides) if multirun else [overrides]
    except Exception as exc:  # noqa: BLE001 - a parse error in the overrides themselves
        _fail(_compose_error(exc))
    for combo in combos:
        try:
            with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
                dcfg = compose(config_name="config", overrides=combo)
            cfg = to_root_config(dcfg)
            validate(cfg)
        except ConfigError as exc:
            _fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - Hydra/OmegaConf composition errors
            _fail(_compose_error(exc))


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def _hydra_main(dcfg: DictConfig) -> float | None:
    from omnimoe_train.run import run

    try:
        cfg = to_root_config(dcfg)
        validate(cfg)
    except ConfigError as exc:
        _fail(str(exc))
    summary = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    return summary.get("final_val_loss")


def main() -> None:
    from omnimoe_train.run import quiet_libraries

    quiet_libraries()
    register_configs()
    precheck(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
