"""Engine and machine rules: ``trainer.engine=deepspeed``, ``trainer.device``, and the
throughput levers ``model.fused_cross_entropy=liger``, ``trainer.compile`` (model/fusions.py)
and ``trainer.cuda_graphs`` (model/cuda_graphs.py). The rules about the machine the check runs on (a visible CUDA device, an
installed package) apply only when it is the machine the run is meant for."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from omnimoe_train.config import ModelConfig, ParallelConfig, TrainerConfig
from omnimoe_train.engine.deepspeed_config import (
    check_deepspeed_keys,
    check_deepspeed_schema,
    check_grad_accum,
    nvme_offloads,
)
from omnimoe_train.validation.choices import MEGATRON_MOE_MLPS, PRODUCT_KEY_MLPS
from omnimoe_train.validation.errors import ConfigError, require


def validate_deepspeed(
    p: ParallelConfig,
    ds: dict[str, Any],
    this_machine: bool = True,
    t: TrainerConfig | None = None,
) -> None:
    """``trainer.engine=deepspeed``: data parallel only, DeepSpeed installed, its keys (the
    root config's ``deepspeed`` section, ``ds``) sane; on ``this_machine``, an NVMe offload's
    async I/O op buildable (DeepSpeed's check, about 2 s, made only when NVMe is asked for).
    ``t``: the trainer section, for the model's dtype that ``data_types.grad_accum_dtype`` must
    match without ZeRO (not checked against the dtype when None)."""
    model_parallel = {"parallel.tp": p.tp, "parallel.pp": p.pp, "parallel.ep": p.ep}
    bad = {key: value for key, value in model_parallel.items() if value != 1}
    require(
        not bad and p.vpp is None,
        "trainer.engine",
        "deepspeed is data parallel only: parallel.tp, parallel.pp and parallel.ep must be 1 and "
        f"parallel.vpp null (got {', '.join(f'{k}={v}' for k, v in bad.items()) or f'vpp={p.vpp}'}"
        "); use trainer.engine=megatron for tensor, pipeline or expert parallelism",
    )
    require(
        not p.sequence_parallel and not p.distributed_optimizer,
        "trainer.engine",
        "deepspeed shards the optimizer with ZeRO (deepspeed=zero1|zero2|zero3...): "
        "parallel.sequence_parallel and parallel.distributed_optimizer must be false",
    )
    require(
        importlib.util.find_spec("deepspeed") is not None,
        "trainer.engine",
        "deepspeed is not installed (pip install -e '.[deepspeed]')",
    )
    bf16 = None if t is None else _model_bf16(t, this_machine)
    problem = check_deepspeed_keys(ds) or check_grad_accum(ds, bf16) or check_deepspeed_schema(ds)
    if problem is not None:
        raise ConfigError(*problem)
    nvme = nvme_offloads(ds)
    if nvme and this_machine:
        require(
            _async_io_available(),
            f"deepspeed.zero_optimization.{nvme[0]}.device",
            "nvme needs DeepSpeed's async_io op, which this machine cannot build (libaio "
            "missing?); use device cpu",
        )


def _async_io_available() -> bool:
    """Whether DeepSpeed's async I/O op (NVMe offload) builds here; without it the engine
    failed with a RuntimeError traceback after the model was built."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as the engine sets it on CPU
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return bool(AsyncIOBuilder().is_compatible(verbose=False))


def validate_device(device: str) -> None:
    """``trainer.device=cuda`` needs a visible GPU (checked as ``distributed.resolve_device``
    does, with ``torch.cuda.is_available``, which does not create a CUDA context)."""
    if device != "cuda":
        return
    import torch

    require(
        torch.cuda.is_available(),
        "trainer.device",
        "cuda but no CUDA device is visible (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use trainer.device=cpu or auto",
    )


def validate_expert_backend(m: ModelConfig, t: TrainerConfig) -> None:
    """``model.expert_backend=triton`` launches the router and expert kernels with Triton, which
    needs a CUDA device or its CPU interpreter (``TRITON_INTERPRET=1``); otherwise Triton fails
    at the first forward ('0 active drivers'). Only the product-key MLPs run those kernels."""
    require(
        m.expert_backend != "triton"
        or m.mlp not in PRODUCT_KEY_MLPS
        or _runs_on_cuda(t.device)
        or os.environ.get("TRITON_INTERPRET") == "1",
        "model.expert_backend",
        f"triton needs a CUDA device (trainer.device={t.device}, none in use) or Triton's CPU "
        "interpreter (TRITON_INTERPRET=1); use model.expert_backend=auto or torch",
    )


def _model_bf16(t: TrainerConfig, this_machine: bool) -> bool | None:
    """Whether the model trains in bf16, as ``distributed.resolve_bf16`` will decide; None when
    that depends on a CUDA device of a machine this check does not run on."""
    if t.precision != "auto":
        return t.precision == "bf16"
    if t.device != "auto" or this_machine:
        return _runs_on_cuda(t.device)
    return None


def _runs_on_cuda(device: str) -> bool:
    """Whether ``trainer.device`` resolves to CUDA (as ``distributed.resolve_device`` does)."""
    import torch

    return device != "cpu" and torch.cuda.is_available()


def _require_cuda_megatron(key: str, what: str, t: TrainerConfig, this_machine: bool) -> None:
    """The rules every CUDA-only lever of the megatron engine shares: a CUDA device (checked
    only on the machine the run is meant for) and ``trainer.engine=megatron``."""
    require(
        _runs_on_cuda(t.device) or (not this_machine and t.device != "cpu"),
        key,
        f"{what} (trainer.device={t.device}, no CUDA device in use); use {key}=none",
    )
    require(t.engine == "megatron", key, f"needs trainer.engine=megatron (got {t.engine})")


def validate_throughput_levers(
    m: ModelConfig, p: ParallelConfig, t: TrainerConfig, this_machine: bool
) -> None:
    """``model.fused_swiglu``, ``model.fused_cross_entropy=liger`` and ``trainer.compile``
    (model/fusions.py); the package and CUDA rules only when ``this_machine``."""
    # A typed schema rejects other values on the command line; configs built in code are not.
    require(
        m.fused_swiglu is None or isinstance(m.fused_swiglu, bool),
        "model.fused_swiglu",
        f"must be true, false or null (got {m.fused_swiglu!r})",
    )
    if m.fused_cross_entropy == "liger":
        key = "model.fused_cross_entropy"
        require(
            p.tp == 1,
            key,
            f"liger's fused linear cross-entropy is not vocab-parallel: needs parallel.tp=1 "
            f"(got {p.tp}); model.fused_cross_entropy=megatron works at any tp",
        )
    if m.fused_cross_entropy == "liger" and this_machine:
        key = "model.fused_cross_entropy"
        require(
            importlib.util.find_spec("liger_kernel") is not None,
            key,
            "liger needs the liger-kernel package: pip install -e '.[liger]'",
        )
        require(
            _runs_on_cuda(t.device) or os.environ.get("TRITON_INTERPRET") == "1",
            key,
            "liger runs Triton kernels: needs a CUDA device (or TRITON_INTERPRET=1)",
        )
    if t.compile != "none":
        key = "trainer.compile"
        _require_cuda_megatron(key, f"{t.compile} compiles for CUDA only", t, this_machine)
        require(
            p.tp == 1,
            key,
            f"needs parallel.tp=1 (got {p.tp}): megatron's tensor-parallel communication "
            "inside a layer is not traced",
        )
        require(
            m.mlp not in MEGATRON_MOE_MLPS,
            key,
            f"megatron's MoE layer (model.mlp={m.mlp}) has data-dependent token dispatch; "
            "use it with trainer.compile=none",
        )


#: MLPs whose training forward and backward are capturable: no host synchronisation, no
#: data-dependent shapes (megatron's MoE dispatch has both).
GRAPHABLE_MLPS = ("omnimoe", "dense")


def validate_cuda_graphs(
    m: ModelConfig, p: ParallelConfig, t: TrainerConfig, this_machine: bool
) -> None:
    """``trainer.cuda_graphs=mlp``: what the capture of every layer's MLP supports."""
    if t.cuda_graphs == "none":
        return
    key = "trainer.cuda_graphs"
    _require_cuda_megatron(key, f"{t.cuda_graphs} captures CUDA graphs", t, this_machine)
    require(
        m.mlp in GRAPHABLE_MLPS,
        key,
        f"captures model.mlp {' or '.join(GRAPHABLE_MLPS)} (got {m.mlp}: not validated under "
        "capture, or with data-dependent shapes)",
    )
    require(
        p.pp == 1 and p.vpp is None,
        key,
        f"needs parallel.pp=1 and parallel.vpp=null (got pp={p.pp}, vpp={p.vpp}): the graphs "
        "replay in the order of one stage's forward and backward",
    )
    require(
        p.tp == 1,
        key,
        f"needs parallel.tp=1 (got {p.tp}): the captured input is the whole [seq, batch, hidden]",
    )
