"""``omnimoe-train``: the Hydra entry point.

Before Hydra starts a run, the overrides are composed and validated here (for ``-m`` sweeps, every
combination), so a bad key or value costs no model, data or process-group work: it prints one
line naming the key and the rule and exits with code 2.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from omnimoe_train import names, sweep_jobs
from omnimoe_train.checkpoint.signals import StartupStop, StoppedBeforeTraining
from omnimoe_train.compose_errors import CONFIG_MODULE, compose_error, group_options
from omnimoe_train.config import RootConfig, register_configs, unknown_keys
from omnimoe_train.exit_codes import exit_usage
from omnimoe_train.validation import (
    ConfigError,
    data_facts_before_preparation,
    validate,
    validate_against_data,
    validate_data_paths,
    validate_output_folder,
    validate_resume_path,
)
from omnimoe_train.validation.config_files import strict_bools_in_files
from omnimoe_train.validation.overrides import empty_mappings, group_given_null, strict_bools


def given_run_dir(argv: list[str]) -> Path | None:
    """The run directory that ``argv`` (``hydra.run.dir=...``) or ``$OMNIMOE_RUN_DIR`` (which
    ``conf/config.yaml`` reads) fixes before any config is composed, as a rerun does. None for a
    ``-m`` sweep, a directory made of config values (``${...}``) or the default one (named
    after the start time, so it is a new one)."""
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    given = [a.partition("=")[2] for a in argv if a.lstrip("+").startswith("hydra.run.dir=")]
    value = given[-1] if given else os.environ.get("OMNIMOE_RUN_DIR")
    return Path(value) if value and "${" not in value else None


def _job_dir() -> Path | None:
    """The run directory of the Hydra job under way; before Hydra has chosen one, the one the
    command line fixes (``given_run_dir``), else None."""
    if not HydraConfig.initialized():
        return given_run_dir(sys.argv[1:])
    out_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None)
    return Path(out_dir) if out_dir else None


# SIGTERM and SIGUSR1 until the trainer's own handler takes over: one line and exit 143 or 75,
# not a silent death.
_STARTUP_STOP = StartupStop(_job_dir)


def _fail(message: str) -> NoReturn:
    exit_usage("omnimoe-train", message)


def to_root_config(dcfg: DictConfig) -> RootConfig:
    """The typed config; raises ``ConfigError`` for a key the schema does not declare."""
    unknown = unknown_keys(dcfg)
    if unknown:
        raise ConfigError(unknown[0], "unknown key (not in the config schema)")
    return OmegaConf.to_object(dcfg)  # type: ignore[return-value]


def _sweep_combinations(overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """Expand ``a=1,2 b=x,y`` into every combination, as Hydra's basic sweeper would (a later
    override of the same key replaces an earlier one); also return the swept keys. A
    ``glob(...)`` sweep of a config group is expanded over the group's options, which only the
    config loader knows (the parser needs it, as Hydra's sweeper gives it)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices: dict[str, list[str]] = {}
    swept: dict[str, bool] = {}
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(overrides)
        for ov in parsed:
            key = ov.get_key_element()
            swept[key] = ov.is_sweep_override()
            if swept[key]:
                choices[key] = [f"{key}={v}" for v in ov.sweep_string_iterator()]
            else:
                choices[key] = [ov.input_line]
    combos = [list(combo) for combo in itertools.product(*choices.values())]
    return combos, [key for key, is_sweep in swept.items() if is_sweep]


def _sweeper_params(overrides: list[str]) -> list[str]:
    """The ``hydra.sweeper.params`` a config (e.g. ``+experiment=...``) declares, as overrides."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        dcfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    params = dcfg.hydra.sweeper.get("params") or {}
    return [f"{key}={value}" for key, value in params.items()]


def _check_hydra_dirs(argv: list[str]) -> None:
    """Output folders given whole on the command line must fit the file system (the folders
    Hydra names itself are bounded by ``names``)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir"):
            part = names.long_component(value)
            if part is not None:
                _fail(
                    f"{key}: a path component has {len(part.encode())} bytes, more than the "
                    f"file system's {names.COMPONENT_MAX_BYTES} ({part[:40]}...)"
                )


def _check_hydra_config(
    hydra_overrides: list[str], job_overrides: list[str], multirun: bool, typed: list[str]
) -> None:
    """Hydra's own part of the config, before Hydra starts: the ``hydra/...`` group options and
    ``hydra.*`` values the command line sets (an unknown launcher, a run directory that does not
    resolve: Hydra would print them as a traceback or a multi-line error), and the launcher's
    rule when it is ours (``sweep_jobs.job_layout``: one rank per GPU, for
    ``hydra/launcher=slurm_torchrun``) before a sweep submits anything. ``typed``: the
    overrides as typed (``job_overrides`` may be a sweep's first combination)."""
    from hydra import compose, initialize_config_module

    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            dcfg = compose(
                config_name="config",
                overrides=hydra_overrides + job_overrides,
                return_hydra_config=True,
            )
        # The folder Hydra is about to create; resolving it shows a bad interpolation now, and
        # a file in its way (Hydra's makedirs would end in a traceback).
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        validate_output_folder(key, str(OmegaConf.select(dcfg, key)))
        launcher = dcfg.hydra.launcher
        if multirun and "torchrun" in launcher:  # ours; other launchers keep their own rules
            sweep_jobs.job_layout(launcher)
    except ConfigError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - Hydra/OmegaConf composition errors
        _fail(compose_error(exc, typed=typed))


def _deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _is_searchpath(arg: str) -> bool:
    return arg.lstrip("+").startswith("hydra.searchpath=")


_CONFIG_DIR = ("--config-dir", "-cd")


def _take_config_dir(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without Hydra's ``--config-dir DIR`` / ``-cd DIR`` (also ``--config-dir=DIR``),
    and ``DIR`` made absolute (as Hydra makes it), None when not given; the last one counts, as
    in Hydra's parser. Exits 2 in one line for a missing value or a ``DIR`` that is not a
    folder (Hydra's own message was its multi-line error and exit 1)."""
    rest: list[str] = []
    given: tuple[str, str] | None = None
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag not in _CONFIG_DIR:
            rest.append(arg)
            continue
        if not eq:
            value = next(args, "")
        if not value or (not eq and value.startswith("-")):
            _fail(f"{flag}: needs a folder (--config-dir DIR)")
        given = (flag, value)
    if given is None:
        return rest, None
    flag, value = given
    if not Path(value).expanduser().is_dir():
        _fail(f"{flag}: {value} is not a folder (the extra config folder Hydra searches)")
    return rest, os.path.abspath(Path(value).expanduser())


def _with_config_dir(overrides: list[str], config_dir: str) -> list[str]:
    """``overrides`` with ``config_dir`` first in ``hydra.searchpath``: where Hydra puts a
    ``--config-dir`` (before the ``hydra.searchpath`` entries, after our ``conf/``), so the
    pre-check composes from the same folders as the run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entries: list[str] = []
    kept = []
    for arg in overrides:
        if _is_searchpath(arg):  # the last one counts, as in Hydra
            value = OverridesParser.create().parse_override(arg).value()
            entries = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        else:
            kept.append(arg)
    items = [f"file://{config_dir}", *entries]
    quoted = ",".join("'" + item.replace("'", "\\'") + "'" for item in items)
    return [f"hydra.searchpath=[{quoted}]", *kept]


def _check_overrides(overrides: list[str]) -> None:
    """The rules on overrides as typed, before composition converts them (``validation.
    overrides``): strict bools, and a config group given ``null``."""
    strict_bools(overrides)
    group_given_null(overrides, group_options)


def precheck(argv: list[str], world_size: int | None = None) -> None:
    """Compose and validate the config(s) that ``argv`` asks for; exit 2 on the first error.

    For ``-m`` sweeps this is every combination of the command-line sweeps and of the
    ``hydra.sweeper.params`` the composed config declares (the ready-made experiments).
    ``world_size``: the number of ranks the run will have (default: ``$WORLD_SIZE``, 1).
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    multirun = any(a in ("-m", "--multirun") for a in argv)
    argv, config_dir = _take_config_dir(argv)
    # Hydra's own keys are checked apart (_check_hydra_config), but for its search path: a
    # user's config folders hold options of our groups (hydra.searchpath=[file://my_conf]).
    overrides = [a for a in argv if not a.startswith(("-", "hydra")) or _is_searchpath(a)]
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # --help, --cfg, --info, --config-name ...: Hydra answers those itself
    if config_dir is not None:
        try:
            overrides = _with_config_dir(overrides, config_dir)
        except Exception as exc:  # noqa: BLE001 - a hydra.searchpath that does not parse
            _fail(compose_error(exc))
    _check_hydra_dirs(argv)
    try:
        combos, swept = [overrides], []
        if multirun:
            first = _sweep_combinations(overrides)[0][0]
            _check_overrides(first)  # before composing it for its sweeper params
            combos, swept = _sweep_combinations(_sweeper_params(first) + overrides)
        for combo in combos:
            _check_overrides(combo)
    except ConfigError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - a parse or composition error in the overrides
        _fail(compose_error(exc, typed=overrides))
    hydra_overrides = [a for a in argv if a.startswith("hydra") and not _is_searchpath(a)]
    _check_hydra_config(hydra_overrides, combos[0], multirun, overrides)
    names.set_swept_keys(swept)  # a sweep job's folder shows these keys' values
    sweep_jobs.pass_swept_keys(swept)  # and on SLURM, where the job names its own folder
    for combo in combos:
        try:
            with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
                dcfg = compose(config_name="config", overrides=combo)
                loader = GlobalHydra.instance().config_loader()
                deepspeed = dcfg.trainer.engine == "deepspeed" and _deepspeed_installed()
                strict_bools_in_files(loader, "config", combo, deepspeed)
            empty_mappings(combo, dcfg)
            cfg = to_root_config(dcfg)
            validate(cfg, world_size)
            validate_data_paths(cfg.data)
            validate_resume_path(cfg.checkpoint)
            if Path(cfg.checkpoint.dir).expanduser().is_absolute():  # else under the run dir
                validate_output_folder("checkpoint.dir", cfg.checkpoint.dir)
            # What the data already tells (a given tokenizer, a prepared data.dir); the rest is
            # checked right after preparation, before any model work.
            for facts in data_facts_before_preparation(cfg.data):
                validate_against_data(cfg, facts)
        except ConfigError as exc:
            _fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - Hydra/OmegaConf composition errors
            _fail(compose_error(exc, typed=overrides))


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
def _hydra_main(dcfg: DictConfig) -> float | None:
    from omnimoe_train.run import run

    try:
        cfg = to_root_config(dcfg)
        validate(cfg)
    except ConfigError as exc:
        _fail(str(exc))
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    if not sweep_jobs.in_slurm_sweep_job():
        _STARTUP_STOP.install()  # each job of a local -m sweep (submitit keeps its own)
        return run(cfg, out_dir).get("final_val_loss")
    # A job of a `-m hydra/launcher=slurm` sweep.
    launcher = hydra_cfg.launcher
    with sweep_jobs.requeue_on_early_stop(int(launcher.get("max_num_timeout", 0))):
        if launcher.get("torchrun", False):  # one task per node: torchrun's agent
            from omnimoe_train.sweep_torchrun import run_job

            return run_job(cfg, out_dir, sweep_jobs.job_layout(launcher).nproc_per_node)
        sweep_jobs.export_distributed_env()  # one task per GPU, each a rank
        return run(cfg, out_dir).get("final_val_loss")


def _register() -> None:
    sweep_jobs.register_repo_resolver()
    sweep_jobs.register_launcher_plugin()
    register_configs()
    names.register_resolvers()


def check_before_launch(argv: list[str], world_size: int) -> None:
    """``precheck`` for a launcher about to start ``world_size`` ranks of ``omnimoe-train
    *argv`` (``omnimoe_train.torchrun``): a bad config is refused once, in one line on the
    console, instead of by every rank into its own log. Exits 2 on the first error.

    First, as the ranks about to start would, it removes the exit status an earlier run left in
    the run directory the command fixes: a refused config must not leave that one current."""
    _clear_given_exit_status(argv)
    _register()
    precheck(argv, world_size)


def _clear_given_exit_status(argv: list[str]) -> None:
    from omnimoe_train.run import clear_exit_status

    run_dir = given_run_dir(argv)
    if run_dir is not None:
        clear_exit_status(run_dir)


# Hydra's modes: it takes one at most, and answers two with a ValueError traceback.
_MODES = {
    "-m": "--multirun", "--multirun": "--multirun", "-r": "--run", "--run": "--run",
    "-c": "--cfg", "--cfg": "--cfg", "-i": "--info", "--info": "--info",
    "-sc": "--shell-completion", "--shell-completion": "--shell-completion",
}  # fmt: skip


def multirun_first(argv: list[str]) -> list[str]:
    """``argv`` with ``-m``/``--multirun`` (if given) moved to the front, the rest in order.
    Exits 2 in one line when it names two of Hydra's modes (``-m --cfg job``)."""
    modes = sorted({_MODES[a] for a in argv if a in _MODES})
    if len(modes) > 1:
        _fail(f"{modes[0]}, {modes[1]}: give one of them (each is a mode of its own)")
    flags = [a for a in argv if a in ("-m", "--multirun")]
    return flags[:1] + [a for a in argv if a not in ("-m", "--multirun")]


def main() -> None:
    from omnimoe_train.run import quiet_libraries, say_stop_after_training, stopped_before_training

    # Hydra's parser takes -m only before the overrides (after them: "unrecognized
    # arguments"); where it is makes no difference to the user, so it goes first.
    sys.argv[1:] = argv = multirun_first(sys.argv[1:])
    # A -m sweep's process may only submit jobs and wait for them: each local job installs it.
    if not any(a in ("-m", "--multirun") for a in argv):
        _STARTUP_STOP.install()
    try:
        # A rerun's directory is known now: an exit before the run's own status (a usage
        # error, a signal during the checks) must not leave the previous run's status current.
        _clear_given_exit_status(argv)
        quiet_libraries()
        sweep_jobs.use_usr1_for_preemption()
        _register()
        precheck(argv)
        _hydra_main()
    except StoppedBeforeTraining as exc:
        stopped_before_training(exc)
    # A stop signal after the (last) job's training, noted since (StopRequest.restore).
    say_stop_after_training(_STARTUP_STOP.hand_over())


if __name__ == "__main__":
    main()
