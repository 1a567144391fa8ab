"""Whether a verified checkpoint fits the run about to resume from it, decided from its
``meta.json`` alone -- before the model is built, so a mismatch costs one line, not a megatron
traceback from deep inside the loader.

Three questions, in this order (a run that asks for another model is more likely a mistake than
a finished run, so it is named first):

1. the engine (``trainer.engine``): each engine reads only its own files; under DeepSpeed,
   ZeRO-0 and the ZeRO stages 1-3 neither (ZeRO-0's one file holds no ZeRO partitions to
   convert, and DeepSpeed loads no universal checkpoint without ZeRO), nor ZeRO-0 in another
   precision (its optimizer state is that of the precision's optimizer);
2. the model's shape: the keys that decide which parameters exist and their shapes, per
   ``model.mlp`` (the parallel layout, data-parallel size, optimizer, schedule, logging and
   ``trainer.max_steps`` may all change on resume and are not compared);
3. the data order's seed (``data.seed``): the checkpointed data position is a place in the
   sequence that seed makes (the loader refuses it too, but only once the data is prepared and
   the model built, and without naming the key);
4. whether there is anything left to do: a checkpoint at or past ``trainer.max_steps``.

Checkpoints whose ``meta.json`` lacks ``engine`` or ``config`` (older ones) are not refused for
that: the check is skipped and the loader decides, as before.

A changed learning-rate schedule is allowed, as torchtitan and Megatron allow extending a run
(the scheduler takes its shape from the new config and only its position from the checkpoint,
``engine.optim.wsd_scheduler``), but not silently: :func:`schedule_change` words it in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnimoe_train.checkpoint.session import CheckpointLoadError, data_order
from omnimoe_train.config import ModelConfig, OptimConfig
from omnimoe_train.lr_schedule import SCHEDULE_KEYS, wsd_decay_start

# Parameters every model has.
_COMMON = (
    "mlp",
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "tie_embeddings",
)
_ATOMIC = ("num_experts", "shared_expert", "router", "router_norm")
# The keys that shape each MLP's parameters (model/gpt.py: ``mlp_spec``).
_PER_MLP: dict[str, tuple[str, ...]] = {
    "omnimoe": _ATOMIC,
    "peer": (*_ATOMIC, "peer_heads", "peer_key_dim"),
    "pkm": ("num_experts", "shared_expert", "pkm_heads", "pkm_key_dim"),
    "gshard": ("moe_num_experts", "moe_ffn_hidden_size"),
    "deepseekmoe": ("moe_num_experts", "moe_ffn_hidden_size", "moe_shared_ffn_hidden_size"),
    "dense": (),
}
_ALL = tuple(dict.fromkeys(_COMMON + sum(_PER_MLP.values(), ())))


class RunAlreadyComplete(Exception):
    """The checkpoint to resume from is at or past ``trainer.max_steps``: nothing to train."""

    def __init__(self, step: int, max_steps: int) -> None:
        super().__init__(
            f"run already complete at step {step} >= trainer.max_steps={max_steps}; nothing to do"
        )
        self.step, self.max_steps = step, max_steps


def _shape(model: dict[str, Any]) -> dict[str, Any]:
    """The shape-deciding keys of a model config (a dict as ``meta.json`` stores it)."""
    keys = _COMMON + _PER_MLP.get(str(model.get("mlp")), ())
    shape = {k: model.get(k) for k in keys}
    if "moe_ffn_hidden_size" in shape and shape["moe_ffn_hidden_size"] is None:
        shape["moe_ffn_hidden_size"] = model.get("ffn_hidden_size")  # None means this width
    return shape


def model_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Shape keys whose values differ, in config order (only ``mlp`` if the MLP differs)."""
    if saved.get("mlp") != wanted.get("mlp"):
        return ["mlp"]
    old, new = _shape(saved), _shape(wanted)
    return [k for k in new if old.get(k) != new[k]]


def check_resumable(
    path: Path,
    meta: dict[str, Any],
    *,
    engine: str,
    model: ModelConfig,
    max_steps: int,
    data_seed: int | None = None,
    zero_stage: int | None = None,
    bf16: bool | None = None,
) -> None:
    """Raise unless this run can continue from checkpoint ``path`` (see the module docstring).

    Raises :class:`CheckpointLoadError` (one line naming the key and both values) for another
    engine, ZeRO-0 against a ZeRO stage or in another precision (``zero_stage``, ``bf16``:
    this DeepSpeed run's; None: not compared), model shape or ``data_seed`` (``data.seed``; None: not compared),
    :class:`RunAlreadyComplete` when ``meta["step"] >= max_steps``.
    """
    saved_engine = meta.get("engine")
    if saved_engine is not None and saved_engine != engine:
        raise CheckpointLoadError(
            f"checkpoint {path} was written by trainer.engine={saved_engine}; "
            f"set trainer.engine={saved_engine} (or start a new run dir)"
        )
    layout = meta.get("layout")
    saved_stage = layout.get("zero_stage") if isinstance(layout, dict) else None
    if (
        isinstance(saved_stage, int)
        and zero_stage is not None
        and (saved_stage == 0) != (zero_stage == 0)
    ):
        raise CheckpointLoadError(
            f"checkpoint {path} was written with deepspeed.zero_optimization.stage="
            f"{saved_stage}, this run asks {zero_stage}: DeepSpeed converts only between "
            "stages 1-3 (or ZeRO-0 at any data-parallel size); set deepspeed=zero"
            f"{saved_stage} (or start a new run dir)"
        )
    saved_bf16 = layout.get("bf16") if isinstance(layout, dict) else None
    if saved_stage == 0 == zero_stage and None not in (saved_bf16, bf16) and saved_bf16 != bf16:
        raise CheckpointLoadError(zero0_precision_rule(path, bool(saved_bf16), bool(bf16)))
    saved_model = (meta.get("config") or {}).get("model")
    if isinstance(saved_model, dict):
        wanted = {k: getattr(model, k, None) for k in _ALL}
        keys = model_differences(saved_model, wanted)
        if keys:
            was = ", ".join(f"model.{k}={saved_model.get(k)}" for k in keys)
            now = (
                str(wanted[keys[0]])
                if len(keys) == 1
                else ", ".join(f"model.{k}={wanted[k]}" for k in keys)
            )
            raise CheckpointLoadError(
                f"checkpoint {path} was written with {was}, this run asks {now} "
                "(start a new run dir or match the model)"
            )
    saved_data = (meta.get("config") or {}).get("data")
    saved_seed = saved_data.get("seed") if isinstance(saved_data, dict) else None
    if data_seed is not None and isinstance(saved_seed, int) and saved_seed != data_seed:
        raise CheckpointLoadError(
            f"checkpoint {path} was written with data.seed={saved_seed}, this run asks "
            f"{data_seed} (the data order depends on it: start a new run dir or match it)"
        )
    step = meta.get("step")
    if isinstance(step, int) and step >= max_steps:
        raise RunAlreadyComplete(step, max_steps)


def zero0_precision_rule(path: Path, saved_bf16: bool, bf16: bool) -> str:
    """The line refusing a ZeRO-0 checkpoint in another precision (also the loader's, for a
    checkpoint whose ``meta.json`` does not record it)."""
    was, now = ("bf16" if b else "fp32" for b in (saved_bf16, bf16))
    return (
        f"checkpoint {path} was written by ZeRO-0 in {was}, this run trains in {now}: ZeRO-0's "
        f"files load only in the precision they were written in; set trainer.precision={was} "
        "(or start a new run dir)"
    )


# The config keys that set each key of ``session.data_order``.
_DATA_ORDER_KEYS = {
    "data_ids": "the datasets (data.dir / data.dirs / data.inputs)",
    "weights": "data.weights",
    "seed": "data.seed",
}


def check_data_order(path: Path, meta: dict[str, Any], loader_state: dict[str, Any]) -> None:
    """Raise :class:`CheckpointLoadError` (one line naming the key) unless this run reads the
    data in the order the checkpoint's position belongs to. Runs once the data is prepared,
    before the model is built (the loader refuses it too, but only at the load, without the
    key). Checkpoints whose ``meta.json`` lacks ``data`` (older ones) are left to the loader."""
    saved = meta.get("data")
    if not isinstance(saved, dict):
        return
    now = data_order(loader_state)
    for key, name in _DATA_ORDER_KEYS.items():
        if key in saved and saved[key] != now[key]:
            raise CheckpointLoadError(
                f"checkpoint {path} was written reading other data: {name} differ "
                f"({key} {saved[key]} in the checkpoint, {now[key]} now); the data position "
                "belongs to that order (start a new run dir or give the same data)"
            )


def checkpoint_vocab_size(path: Path, meta: dict[str, Any], vocab: int, tp: int) -> int | None:
    """The padded vocabulary of checkpoint ``path`` when this run (``vocab`` entries, ``tp``
    tensor-parallel ranks) can take it: a checkpoint padded for more TP ranks still loads.
    None when it records none or its padding does not divide over ``tp`` (pad for this layout).
    Raises ``CheckpointLoadError`` when the run asks more entries than it has: megatron's loader
    would take it (the embedding allows a shape mismatch, for padding) and start the rows past
    the checkpoint's at zero, another model with no word said."""
    saved = meta.get("vocab_size")
    if not isinstance(saved, int):
        return None
    if vocab > saved:
        raise CheckpointLoadError(
            f"checkpoint {path} was written with model.vocab_size={saved} (padded), this run "
            f"asks {vocab} (start a new run dir or match the model)"
        )
    return saved if saved % tp == 0 else None


def schedule_change(
    path: Path, meta: dict[str, Any], *, optim: OptimConfig, max_steps: int
) -> str | None:
    """One line when this run's learning-rate schedule differs from the checkpoint's run, or
    None (same schedule, or a ``meta.json`` without the config or the key).

    The line names the checkpoint's step S (from which the new schedule applies), each changed
    key (``trainer.max_steps`` or an ``optim.*`` key of ``lr_schedule.SCHEDULE_KEYS``) with both
    values, and where the WSD decay now starts when that moves.
    """
    saved = meta.get("config")
    saved = saved if isinstance(saved, dict) else {}
    now = {"trainer": {"max_steps": max_steps}, "optim": vars(optim)}
    was: dict[str, Any] = {}
    for section, key in SCHEDULE_KEYS:
        section_of = saved.get(section)
        old = section_of.get(key) if isinstance(section_of, dict) else None
        if old is not None:
            was[f"{section}.{key}"] = old
    changed = [
        f"{name} {was[name]} -> {now[section][key]}"
        for section, key in SCHEDULE_KEYS
        if (name := f"{section}.{key}") in was and was[name] != now[section][key]
    ]
    if not changed:
        return None
    step = meta.get("step")
    at = step if isinstance(step, int) else "?"
    line = (
        f"warning: learning-rate schedule changes from step {at} on: {', '.join(changed)} "
        f"(checkpoint {path.name} was written with the old schedule)"
    )
    try:
        before = wsd_decay_start(
            float(was.get("optim.decay_fraction", optim.decay_fraction)),
            int(was.get("trainer.max_steps", max_steps)),
        )
    except (TypeError, ValueError):
        return line
    after = wsd_decay_start(optim.decay_fraction, max_steps)
    if before != after:
        line += f"; WSD decay now starts after step {after} (was {before})"
    return line
