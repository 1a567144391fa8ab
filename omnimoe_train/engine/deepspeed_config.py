"""The DeepSpeed config (its JSON schema, as a dict) for ``trainer.engine=deepspeed``.

Keys that our config already defines are derived from it -- batch sizes from ``data.*``, clipping
from ``optim.clip_grad``, bf16 from ``trainer.precision`` -- and may not be set again under
``deepspeed.*`` (one source of truth; :func:`check_deepspeed_keys` names the key to set instead).
Everything else comes from the ``deepspeed`` section (a ZeRO preset from ``conf/deepspeed/`` plus
command-line overrides) and is passed through unchanged, so any DeepSpeed key can be set.

The optimizer and the LR schedule are not DeepSpeed's: the engine hands DeepSpeed a client
optimizer and steps our WSD schedule itself (DeepSpeed would step a client scheduler with
``train_batch_size`` as its increment when it does not take keyword arguments).
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

from omnimoe_train.config import RootConfig

#: DeepSpeed keys owned by our config -> the key to set instead.
RESERVED: dict[str, str] = {
    "train_batch_size": "data.global_batch_size",
    "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "data.global_batch_size / (data.micro_batch_size * dp)",
    "gradient_clipping": "optim.clip_grad",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision (fp32 or bf16; fp16 loss scaling is not supported)",
    "optimizer": "optim.* (the engine builds AdamW itself)",
    "scheduler": "optim.* (the engine steps the WSD schedule itself)",
}
OFFLOAD_DEVICES = ("cpu", "nvme", "none")


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offload_device(ds: dict[str, Any], what: str) -> str:
    """``offload_optimizer`` / ``offload_param`` device, ``none`` when not offloaded."""
    section = ds.get("zero_optimization", {}).get(what) or {}
    return str(section.get("device", "none"))


def check_deepspeed_keys(ds: dict[str, Any]) -> tuple[str, str] | None:
    """First violated rule of the ``deepspeed`` section as (key, rule), or None.

    Called by ``validation.validate`` (through ``validation/engine.py``, which turns it into a
    ``ConfigError``) before any process group exists.
    """
    for key, instead in RESERVED.items():
        if key in ds:
            return f"deepspeed.{key}", f"is derived from our config; set {instead} instead"
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return "deepspeed.zero_optimization", "must be a mapping of DeepSpeed ZeRO keys"
    stage = zero.get("stage", 0)
    if type(stage) is not int or stage not in (0, 1, 2, 3):  # not True / 2.0, equal to 1 / 2
        return "deepspeed.zero_optimization.stage", f"must be one of 0, 1, 2, 3 (got {stage!r})"
    for what in ("offload_optimizer", "offload_param"):
        device = offload_device(ds, what)
        if device not in OFFLOAD_DEVICES:
            return (
                f"deepspeed.zero_optimization.{what}.device",
                f"must be one of {', '.join(OFFLOAD_DEVICES)} (got {device!r})",
            )
    if offload_device(ds, "offload_optimizer") != "none" and stage == 0:
        return (
            "deepspeed.zero_optimization.offload_optimizer",
            "needs ZeRO stage 1, 2 or 3 (deepspeed.zero_optimization.stage is 0)",
        )
    if offload_device(ds, "offload_param") != "none" and stage != 3:
        return (
            "deepspeed.zero_optimization.offload_param",
            f"needs ZeRO stage 3 (deepspeed.zero_optimization.stage is {stage})",
        )
    for what in nvme_offloads(ds):
        # ZeRO-1/2 offload to the host only: with nvme DeepSpeed kept the optimizer state on
        # the device while the engine built its host-side CPU Adam; ZeRO-3 without a path
        # failed with a TypeError after the model was built.
        if stage != 3:
            return (
                f"deepspeed.zero_optimization.{what}.device",
                f"nvme needs ZeRO stage 3 (DeepSpeed offloads to NVMe only under ZeRO-3; "
                f"deepspeed.zero_optimization.stage is {stage}); use device cpu",
            )
        if not (zero.get(what) or {}).get("nvme_path"):
            return (
                f"deepspeed.zero_optimization.{what}.nvme_path",
                "is needed with device nvme: a folder on the NVMe drive",
            )
    return None


#: ``data_types.grad_accum_dtype``: DeepSpeed's names of a dtype (``runtime.config.DtypeEnum``)
#: -> ours. int8, which DeepSpeed also names, accumulates nothing usefully and is left out.
GRAD_ACCUM_DTYPES: dict[str, str] = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
}  # fmt: skip
GRAD_ACCUM_KEY = "deepspeed.data_types.grad_accum_dtype"


def grad_accum_dtype(ds: dict[str, Any]) -> str | None:
    """The ``data_types.grad_accum_dtype`` the section sets, as given (None if unset)."""
    data_types = ds.get("data_types")
    return data_types.get("grad_accum_dtype") if isinstance(data_types, dict) else None


def check_grad_accum(ds: dict[str, Any], bf16: bool | None) -> tuple[str, str] | None:
    """The rule ``data_types.grad_accum_dtype`` breaks, as (key, rule), or None.

    ``bf16``: whether the model trains in bf16 (``trainer.precision``; None when it depends on
    a machine this check does not run on). DeepSpeed raised for these only once the model was
    built: a name it does not know (a ``ValueError`` from its ``DtypeEnum``) and, without ZeRO,
    any dtype but the model's (``NotImplementedError: unsupported mix of model_dtype and
    grad_accum_dtype``: without ZeRO it has no separate accumulation buffer)."""
    data_types = ds.get("data_types")
    if data_types is not None and not isinstance(data_types, dict):
        return "deepspeed.data_types", "must be a mapping of DeepSpeed keys"
    given = grad_accum_dtype(ds)
    if given is None:
        return None
    dtype = GRAD_ACCUM_DTYPES.get(str(given))
    if dtype is None:
        return GRAD_ACCUM_KEY, f"must be one of fp32, bf16, fp16 (got {given!r})"
    if zero_stage(ds) == 0 and bf16 is not None and dtype != ("bf16" if bf16 else "fp32"):
        model = "bf16" if bf16 else "fp32"
        return GRAD_ACCUM_KEY, (
            f"without ZeRO (deepspeed.zero_optimization.stage is 0) DeepSpeed accumulates "
            f"gradients only in the model's dtype, {model} (trainer.precision; got {given!r}); "
            "leave it unset or use ZeRO stage 1, 2 or 3"
        )
    return None


def grad_accum_warning(ds: dict[str, Any]) -> str | None:
    """One line to show at the start of a run that accumulates gradients in fp16 under ZeRO
    (allowed, but fp16's range is narrow: small gradients round to zero, large ones overflow,
    and nothing scales the loss), else None."""
    given = grad_accum_dtype(ds)
    if zero_stage(ds) == 0 or GRAD_ACCUM_DTYPES.get(str(given)) != "fp16":
        return None
    return (
        f"warning: {GRAD_ACCUM_KEY}={given}: gradients accumulate in fp16 under ZeRO, without "
        "loss scaling (small ones round to zero, large ones overflow); fp32 is the safe choice"
    )


def nvme_offloads(ds: dict[str, Any]) -> list[str]:
    """The ``offload_*`` sections of the ZeRO config whose device is ``nvme``."""
    return [w for w in ("offload_optimizer", "offload_param") if offload_device(ds, w) == "nvme"]


#: Sections of the DeepSpeed config that DeepSpeed reads through a pydantic model of its own
#: (extra keys forbidden): section -> (module, class). The rest of its config is read with
#: ``dict.get`` and has no schema to check against.
SECTION_MODELS: dict[str, tuple[str, str]] = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "comms_logger": ("deepspeed.comm.config", "CommsLoggerConfig"),
    "tensorboard": ("deepspeed.monitor.config", "TensorBoardConfig"),
    "wandb": ("deepspeed.monitor.config", "WandbConfig"),
    "csv_monitor": ("deepspeed.monitor.config", "CSVConfig"),
}

#: Sections DeepSpeed reads with ``get_scalar_param`` from a fixed set of keys, each named by a
#: constant of its module (section -> (module, constant-name prefix)); with no pydantic model,
#: DeepSpeed would silently ignore a misspelt key (``flops_profiler.enabeld``).
SECTION_KEY_CONSTANTS: dict[str, tuple[str, str]] = {
    "flops_profiler": ("deepspeed.profiling.constants", "FLOPS_PROFILER_"),
    "activation_checkpointing": ("deepspeed.runtime.activation_checkpointing.config", "ACT_CHKPT_"),
}


def string_constants(module: str, prefix: str = "") -> set[str]:
    """The config keys a DeepSpeed module names: the values of its upper-case constants named
    ``<prefix>...`` that are lower-case identifiers (not the ``..._DEFAULT`` values). Empty if
    the module moved in another DeepSpeed version (nothing to check against)."""
    import importlib

    try:
        names = vars(importlib.import_module(module))
    except ImportError:
        return set()
    return {
        value
        for name, value in names.items()
        if name.isupper()
        and name.startswith(prefix)
        and not name.endswith("_DEFAULT")
        and isinstance(value, str)
        and value.isidentifier()
        and value.islower()
    }


def unknown_section_key(ds: dict[str, Any]) -> tuple[str, str] | None:
    """The first key of a ``SECTION_KEY_CONSTANTS`` section that DeepSpeed does not read, as
    (key, rule), or None."""
    for section, (module, prefix) in SECTION_KEY_CONSTANTS.items():
        if section not in ds:
            continue
        if not isinstance(ds[section], dict):
            return f"deepspeed.{section}", "must be a mapping of DeepSpeed keys"
        known = string_constants(module, prefix)
        if not known:
            continue
        for key in ds[section]:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"; did you mean deepspeed.{section}.{close[0]}?" if close else ""
                return (
                    f"deepspeed.{section}.{key}",
                    f"unknown key (DeepSpeed reads {', '.join(sorted(known))}){hint}",
                )
    return None


#: Modules whose lower-case string constants name DeepSpeed's top-level config keys (DeepSpeed
#: reads most of them with ``dict.get``, so a misspelt one is silently ignored), and keys that
#: no such constant names.
KEY_CONSTANT_MODULES = (
    "deepspeed.runtime.constants",
    "deepspeed.runtime.activation_checkpointing.config",
    "deepspeed.profiling.constants",
    "deepspeed.elasticity.constants",
    "deepspeed.autotuning.constants",
    "deepspeed.runtime.data_pipeline.constants",
    "deepspeed.compression.constants",
    "deepspeed.runtime.swap_tensor.constants",
    "deepspeed.comm.constants",
    "deepspeed.monitor.constants",
    "deepspeed.runtime.zero.constants",
)
EXTRA_TOP_LEVEL_KEYS = (
    "elasticity", "compression_training", "nebula", "weight_quantization", "graph_harvesting",
)  # fmt: skip


def known_top_level_keys() -> set[str]:
    """Top-level keys DeepSpeed reads (from its own constants), ours reserved included."""
    keys = set(EXTRA_TOP_LEVEL_KEYS) | set(RESERVED) | set(SECTION_MODELS)
    for module in KEY_CONSTANT_MODULES:
        keys |= string_constants(module)
    return keys


def misspelt_top_level_key(ds: dict[str, Any]) -> tuple[str, str] | None:
    """A top-level key DeepSpeed does not know that is a near miss of one it does, as (key,
    rule). Only near misses are refused: DeepSpeed has no schema for its top level, and a key
    of a newer DeepSpeed that we do not list must still pass."""
    known = known_top_level_keys()
    for key in ds:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
        if close:
            return f"deepspeed.{key}", f"unknown key; did you mean deepspeed.{close[0]}?"
    return None


def check_deepspeed_schema(ds: dict[str, Any]) -> tuple[str, str] | None:
    """The first key of ``ds`` that DeepSpeed's own config models reject, as (key, rule), or
    None: a misspelt key (``zero_optimization.stagee``, ``flops_profiler.enabeld``; at the top
    level, a near miss of a key DeepSpeed reads: ``wall_clock_breakdwn``) or a bad value, found before DeepSpeed builds its
    ops rather than as a multi-line ``pydantic.ValidationError`` inside
    ``deepspeed.initialize`` (or not at all). Needs DeepSpeed installed."""
    import importlib
    import logging

    import pydantic

    from omnimoe_train.engine.deepspeed_bools import deepspeed_bool_problem

    # Importing DeepSpeed logs which accelerator it picked; this check must print nothing. A
    # filter, not a level: DeepSpeed sets its logger's level when it creates it, in the import.
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.addFilter(_errors_only)
    try:
        # Before the models: pydantic's lax mode would take yes / on / 1 for a bool.
        problem = (
            misspelt_top_level_key(ds) or unknown_section_key(ds) or deepspeed_bool_problem(ds)
        )
        if problem:
            return problem
        for section, (module, name) in SECTION_MODELS.items():
            if section not in ds:
                continue
            if not isinstance(ds[section], dict):
                return f"deepspeed.{section}", "must be a mapping of DeepSpeed keys"
            model = getattr(importlib.import_module(module), name)
            try:
                model(**ds[section])
            except pydantic.ValidationError as exc:
                error = exc.errors()[0]
                key = ".".join(["deepspeed", section, *map(str, error["loc"])])
                if error["type"] == "extra_forbidden":
                    return key, f"unknown key (not in DeepSpeed's {name})"
                return key, f"{error['msg']} (got {error.get('input')!r}; DeepSpeed's {name})"
    finally:
        ds_logger.removeFilter(_errors_only)
    return None


def _errors_only(record: Any) -> bool:  # a logging.LogRecord
    return record.levelno >= 40  # logging.ERROR


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_deepspeed_config(cfg: RootConfig, *, dp_size: int, bf16: bool) -> dict[str, Any]:
    """The dict for ``deepspeed.initialize(config=...)``: derived keys, then ``cfg.deepspeed``.

    Gradient accumulation steps = our micro-batches per step, so DeepSpeed's reduction and
    update boundaries are our optimizer steps.
    """
    d = cfg.data
    derived: dict[str, Any] = {
        "train_batch_size": d.global_batch_size,
        "train_micro_batch_size_per_gpu": d.micro_batch_size,
        "gradient_accumulation_steps": d.global_batch_size // (d.micro_batch_size * dp_size),
        "gradient_clipping": cfg.optim.clip_grad,
        "bf16": {"enabled": bf16},
        # Gradients accumulate and reduce in fp32 under bf16, as megatron's grad buffer does
        # (DeepSpeed's default is the model dtype). Without ZeRO DeepSpeed has no fp32
        # accumulation for a bf16 model, so ZeRO-0 keeps bf16 gradients.
        **(
            {"data_types": {"grad_accum_dtype": "fp32"}}
            if bf16 and zero_stage(cfg.deepspeed)
            else {}
        ),
        "zero_optimization": {"stage": 0},
        # Our loop logs one line per logged step; DeepSpeed's own progress lines stay off.
        "steps_per_print": None,
        "wall_clock_breakdown": False,
    }
    return _merge(derived, dict(cfg.deepspeed))
