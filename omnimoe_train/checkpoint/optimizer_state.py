"""The optimizer's part of the megatron engine's checkpoint: megatron's reshardable
``optimizer.sharded_state_dict`` plus what megatron-core 0.19 needs around it.

* ``optimizer_sharded_state_dict``: megatron's description (``SHARDING_METADATA``: fully
  reshardable, no ``chained_N.`` prefix), except for two bugs with models whose optimizer groups
  hold bf16 *and* fp32 parameters (bf16 training keeps the router fp32): the bf16 plain
  optimizer's id mapping and the distributed optimizer's parameter index.
* ``optimizer_updates`` / ``set_optimizer_updates``: Adam's step count, carried on its own (the
  optimizer's plain state is not loaded from the checkpoint; see ``sharded``).
* ``ensure_optimizer_state``, ``complete_state_copies``: the distributed optimizer's describe and
  load paths on torch Adam (no TransformerEngine/apex).
* ``drop_missing_main_params`` / ``resolve_unloaded``: a checkpoint of the plain fp32 optimizer
  has no main-param copies; they are then refreshed from the loaded weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

# Reshardable over TP, PP, EP, DP; tensor keys independent of megatron's optimizer chaining.
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}

# Main (fp32) parameter copies: the plain bf16 optimizer and the distributed optimizer name them
# differently; a plain fp32 optimizer has none (its main params are the model weights).
_MAIN_PARAM = ("optimizer.state.fp32_param.", "optimizer.state.param.")


def chained(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _torch_optimizers(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizer inside each of megatron's chained optimizers that has one."""
    for opt in chained(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            yield inner


def optimizer_updates(optimizer: Any) -> int:
    """Adam's step count: the number of updates applied (skipped steps excluded)."""
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            if "step" in group:
                return int(group["step"])
        for state in inner.state.values():
            if "step" in state:
                return int(state["step"])
    return 0


def set_optimizer_updates(optimizer: Any, updates: int) -> None:
    """Give every parameter its own step tensor (torch Adam) and every group the count."""
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            if "step" in group:
                group["step"] = updates
        for state in inner.state.values():
            if "exp_avg" in state:
                state["step"] = torch.tensor(float(updates), dtype=torch.float32)


def ensure_optimizer_state(optimizer: Any) -> None:
    """Create Adam's state (zero moments, step 0) where no update has run yet.

    megatron's distributed optimizer reads every parameter's ``step`` when describing its
    state (without TransformerEngine/apex), which a fresh torch Adam does not have yet.
    """
    for opt in chained(optimizer):
        inner = getattr(opt, "optimizer", None)
        init = getattr(opt, "init_state_fn", None)
        if inner is None or init is None or len(inner.state) > 0:
            continue
        init(inner, opt.config)
        for state in inner.state.values():
            if "exp_avg" in state and "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)


def complete_state_copies(optimizer: Any) -> None:
    """Let megatron 0.19's distributed optimizer load a ``fully_reshardable`` state into torch
    Adam (no TransformerEngine/apex): its per-parameter copy visits every tensor of the live
    Adam state, ``step`` included, and of the main param, but the checkpoint's tensors never
    hold ``step`` (megatron keeps it out) and a plain-fp32 checkpoint has no main params. The
    missing entries are filled with the live tensors themselves (a no-op copy); the step count
    and main params are set right after the load."""
    for opt in chained(optimizer):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None or getattr(setter, "_completes_missing", False):
            continue

        def complete(model_param: Any, tensors: dict, _opt: Any = opt, _set: Any = setter) -> None:
            group, order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group]["params"][order]
            live = {k: v for k, v in _opt.optimizer.state[main_param].items() if torch.is_tensor(v)}
            _set(model_param, {"param": main_param, **live, **tensors})

        complete._completes_missing = True  # type: ignore[attr-defined]
        opt._set_main_param_and_optimizer_states = complete


def _fix_distributed_optimizer_index(optimizer: Any) -> None:
    """megatron 0.19's distributed optimizer numbers each parameter within its group in grad-buffer
    order, but orders the group's main params fp32 first, then the fp32 copies of bf16 params: in
    a model with both dtypes (our router stays fp32 in a bf16 model) its checkpoint code would
    pair a parameter with another one's state. Renumber from the groups as they are."""
    for opt in chained(optimizer):
        if not hasattr(opt, "model_param_group_index_map") or not hasattr(opt, "shard_fp32_groups"):
            continue
        if opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue  # main params live in the optimizer; megatron's own order holds there
        for g, group in enumerate(opt.optimizer.param_groups):
            position = {id(p): i for i, p in enumerate(group["params"])}
            pairs = [
                *zip(opt.model_fp32_groups[g], opt.shard_fp32_groups[g], strict=True),
                *zip(
                    opt.model_float16_groups[g], opt.shard_fp32_from_float16_groups[g], strict=True
                ),
            ]
            for model_param, main_param in pairs:
                opt.model_param_group_index_map[model_param] = (g, position[id(main_param)])


def _float16_sharded_state_dict(opt: Any, model_sd: dict[str, Any], is_loading: bool) -> dict:
    """megatron's ``Float16OptimizerWithFloat16Params.sharded_state_dict`` for a model with bf16
    *and* fp32 parameters (ours: the router stays fp32). megatron's maps optimizer state ids to
    parameters by enumerating the bf16 parameters only, which pairs states with the wrong
    parameters (or fails) as soon as a group also holds fp32 ones; here the ids follow the
    optimizer's own groups. Same keys and structure as megatron's, so its ``load_state_dict``
    reads the result."""
    if is_loading:
        opt.init_state_fn(opt.optimizer, opt.config)
    state = opt.state_dict()
    model_of = {id(p): p for group in opt.fp32_from_fp32_groups for p in group}
    for model_group, main_group in zip(
        opt.float16_groups, opt.fp32_from_float16_groups, strict=True
    ):
        for model_param, main_param in zip(model_group, main_group, strict=True):
            model_of[id(main_param)] = model_param
    in_optimizer_order = [model_of[id(p)] for g in opt.optimizer.param_groups for p in g["params"]]
    id_map = get_param_id_to_sharded_param_map(model_sd, in_optimizer_order)
    by_model = {id(in_optimizer_order[i]): sh for i, sh in id_map.items()}
    state["fp32_from_fp16_params"] = [
        [
            make_sharded_optimizer_tensor(
                by_model[id(model_param)], main_param, "optimizer.state.fp32_param"
            )
            for model_param, main_param in zip(model_group, main_group, strict=True)
        ]
        for model_group, main_group in zip(
            opt.float16_groups, opt.fp32_from_float16_groups, strict=True
        )
    ]
    step = opt._extract_common_per_param_step(state["optimizer"])
    optim_state_to_sharding_state(state["optimizer"], id_map, exclude_keys="step")
    if step:
        state["optimizer"]["state"]["common_step"] = step
    return state


def optimizer_sharded_state_dict(
    optimizer: Any, model_sd: dict[str, Any], *, is_loading: bool = False
) -> Any:
    """megatron's ``optimizer.sharded_state_dict`` (``SHARDING_METADATA``), with the bf16 plain
    optimizer and the distributed optimizer's index fixed for mixed-dtype models (above)."""
    _fix_distributed_optimizer_index(optimizer)
    subs = chained(optimizer)
    if not any(isinstance(o, Float16OptimizerWithFloat16Params) for o in subs):
        return optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=dict(SHARDING_METADATA)
        )

    def one(opt: Any) -> Any:
        if isinstance(opt, Float16OptimizerWithFloat16Params):
            return _float16_sharded_state_dict(opt, model_sd, is_loading)
        return opt.sharded_state_dict(model_sd, is_loading, metadata=dict(SHARDING_METADATA))

    if len(subs) == 1:
        return one(subs[0])
    optimizer._synchronize_steps()  # as megatron's ChainedOptimizer.sharded_state_dict
    return {i: one(opt) for i, opt in enumerate(subs)}


def drop_missing_main_params(request: dict[str, Any], stored: set[str]) -> bool:
    """Drop main-param requests a checkpoint lacks (one written by the plain fp32 optimizer,
    whose main params are the model weights). True if any was dropped."""
    dropped = False

    def walk(node: Any) -> None:
        nonlocal dropped
        for key in list(node):
            value = node[key]
            if isinstance(value, ShardedBase):
                if value.key.startswith(_MAIN_PARAM) and value.key not in stored:
                    del node[key]
                    dropped = True
            elif isinstance(value, dict):
                walk(value)

    walk(request)
    return dropped


def resolve_unloaded(node: Any, updates: int) -> None:
    """Turn the rest of a filled sharded optimizer state into a plain one.

    Local-only objects (megatron's param-id lists) are unwrapped; each Adam state gets its own
    ``step`` (megatron leaves it out of the tensors). Tensors not requested because the
    checkpoint lacks them can only be main-param copies: dropped where they are dict entries
    (the distributed optimizer then keeps its live main param), kept as the live tensor in
    lists (the bf16 optimizer's), and refreshed from the loaded weights by the caller.
    """
    if isinstance(node, dict) and "exp_avg" in node and "step" not in node:
        node["step"] = torch.tensor(float(updates), dtype=torch.float32)
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in list(items):
        if isinstance(value, LocalNonpersistentObject):
            node[key] = value.unwrap()
        elif isinstance(value, ShardedBase):
            if not value.key.startswith(_MAIN_PARAM):
                raise KeyError(f"checkpoint has no tensor for {value.key}")
            if isinstance(node, dict):
                del node[key]
            else:
                node[key] = value.data
        elif isinstance(value, (dict, list)):
            resolve_unloaded(value, updates)
