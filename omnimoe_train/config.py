"""Typed configuration schema, registered in Hydra's ConfigStore.

Every field that a YAML file or a CLI override may set is declared here, so an unknown key or a
value of the wrong type is rejected by composition; the rules between fields live in the
``validation`` package. The YAML files under ``conf/`` only choose values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

SCHEMA_NAME = "omnimoe_schema"


@dataclass
class ModelConfig:
    name: str = "tiny"
    mlp: str = "omnimoe"  # omnimoe | dense | gshard | deepseekmoe | pkm | peer
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA groups; None = one per head
    ffn_hidden_size: int = 256  # shared SwiGLU width (omnimoe, pkm, peer); dense: the MLP width
    vocab_size: int | None = None  # None = taken from the tokenizer, padded for TP
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # OmniMoE layer; PEER and PKM use the same N, K and shared branch (see README "Variants")
    num_experts: int = 1024  # N = n^2 atomic experts (pkm: memory slots)
    top_k: int = 8  # K experts per token (pkm/peer: over all heads, top_k / heads per head)
    shared_expert: bool = True  # False = ablation without the shared SwiGLU branch
    router: str = "cartesian"  # cartesian | dense (ablation: one gate over all N, exact top-K)
    execution: str = "expert"  # expert (expert-centric kernels) | token (per-token gather)
    router_norm: str = "batchnorm"  # batchnorm | none (BatchNorm1d without affine, per gate)
    router_weights: str = "softmax"  # softmax over the K scores (paper Eq. 2) | exp (ref. code)
    # Product-key baselines: query heads and query width (split into two half-keys)
    pkm_heads: int = 4
    pkm_key_dim: int = 256
    peer_heads: int = 8
    peer_key_dim: int = 128
    # megatron-core MoE baselines (gshard, deepseekmoe): its router, alltoall dispatcher, experts
    moe_num_experts: int = 8  # routed experts E
    moe_top_k: int = 2  # routed experts per token
    moe_ffn_hidden_size: int | None = None  # width of one routed expert; None = ffn_hidden_size
    moe_shared_ffn_hidden_size: int | None = None  # deepseekmoe: total width of shared experts
    moe_aux_loss_coeff: float = 1e-2  # load-balancing loss weight (0 disables it)
    expert_backend: str = "auto"  # auto (Triton on CUDA, PyTorch on CPU) | torch | triton
    # No effect: the expert kernels always reduce in a fixed order (bitwise repeatable). Kept so
    # that older configs and checkpoints (their saved config holds it) still load.
    deterministic: bool = False
    # Expert weight gradients: auto (per call, kernels/experts_dense_grad.py's cost model) |
    # dense (two GEMMs over a dense coefficient matrix) | pairs (the segmented pair kernel)
    expert_grad_path: str = "auto"
    # How the dense path holds the coefficients of bf16 rows: bf16 (8 bits, as a bf16 Linear's
    # weight-gradient GEMM gets its output gradient; half the GEMM and its buffer: +6-7%
    # tokens/s at a80m, docs/benchmarks.md) | split (bf16 high part + residual, ~16 bits, the
    # pair kernel's accuracy). fp32 rows ignore it (kernels/experts_dense_grad.py).
    expert_grad_coef: str = "bf16"
    # The pair kernel ("experts" schedule) splits a block of 16 experts holding more than this
    # many pairs over several programs (partial sums, merged in a fixed order): for skewed
    # routing. 0 = never (kernels/experts_grad_blocks.py; at a80m, split at 1024, it trains as
    # fast as the dense path, unsplit 9% slower: docs/benchmarks.md, thirteenth session).
    expert_grad_segment_pairs: int = 0
    # Throughput levers without TransformerEngine / apex (model/fusions.py, docs/throughput.md):
    # megatron's SwiGLU with its own backward (torch.compile'd; megatron bias_activation_fusion).
    # null (default): on for model.mlp=omnimoe with trainer.cuda_graphs=mlp, where it pays
    # (a80m +7-8%), off otherwise (dense a80m: +-0 graphed, -5% under compile + graphs, 0.70x
    # eager; 0.5 GiB less memory); true / false force it (model/fusions.py, docs/throughput.md).
    fused_swiglu: bool | None = None
    # none (megatron's vocab-parallel cross-entropy) | megatron (its fused native one,
    # torch.compile'd) | liger (Liger-Kernel's fused output layer + cross-entropy: no logits
    # tensor; needs the liger extra, parallel.tp=1, CUDA)
    fused_cross_entropy: str = "none"


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    sequence_parallel: bool = False
    expert_table_sharding: str = "auto"  # rows | dim | auto
    # ep > 1: issue the token exchange before routing and overlap the exchanges with the router
    # and the shared SwiGLU (forward and backward); same values, one more collective launch.
    # null (default): on with trainer.cuda_graphs=mlp, where it pays (one rows layer step 5.34 ->
    # 4.94 ms on 2 H200s), off without (eager, the layer is host bound and it did not raise
    # tokens/s); true / false force it (docs/parallelism.md).
    ep_overlap: bool | None = None
    distributed_optimizer: bool = False


@dataclass
class DataConfig:
    name: str = "stdlib"  # prefix of the cache folder
    inputs: list[str] | None = None  # None = the embedded default corpus (stdlib sources)
    # A prepared dataset: a folder, a URL prefix (http, gs, ...) or a pattern with {name}
    # such as "pipe:cat /data/corpus/{name}" (webdataset openers; manifest beside the shards).
    # With data.inputs: the folder to prepare them into. None = a cache folder keyed by every
    # option that changes the data.
    dir: str | None = None
    dirs: list[str] | None = None  # a mixture of prepared datasets (folders or URLs)
    weights: list[float] | None = None  # one per data.dirs entry, normalised; None = equal
    tokenizer: str | None = None  # an existing tokenizer.json; None = train one
    vocab_size: int = 4096  # when training a tokenizer
    tokenizer_sample_bytes: int | None = None  # train it on this much text; None = all
    # Cap on raw text read for preparation; None = no cap on data.inputs (the default corpus
    # then takes its own ~6 MB of stdlib sources). A user's corpus is never cut by default.
    max_bytes: int | None = None
    val_fraction: float = 0.02
    text_field: str = "text"
    samples_per_shard: int = 1024
    prepare_workers: int | None = None  # processes preparing the data; None = every core
    seq_len: int = 128
    micro_batch_size: int = 16
    global_batch_size: int = 16
    num_workers: int = 0  # DataLoader worker processes per rank (0 = in the training process)
    skip_bad_shards: bool = False  # skip (and count) a missing/corrupt shard instead of failing
    seed: int = 0  # held-out split and sample order


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # warmup-stable-decay: last fraction of steps decays
    decay_style: str = "linear"  # linear | cosine | sqrt


@dataclass
class TrainerConfig:
    max_steps: int = 350
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    seed: int = 1234
    engine: str = "megatron"  # megatron (TP/PP/EP/DP) | deepspeed (data parallel with ZeRO)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    progress: bool = True
    # Expert usage / unevenness / entropy / load-imbalance counters of routed MLPs (metrics.jsonl);
    # false skips their per-forward updates (benchmarks/bench_training.py measures the cost).
    expert_stats: bool = True
    # none | layers: torch.compile each transformer layer (norms, attention, RoPE, SwiGLU,
    # residuals; a routed MLP's router and expert kernels stay eager). CUDA, megatron engine, tp=1.
    compile: str = "none"
    # none | mlp: each transformer layer's MLP (router, experts, shared SwiGLU) forward and
    # backward replayed from CUDA graphs (model/cuda_graphs.py): one launch instead of ~100 per
    # layer and direction, for steps that wait on the host. Rules: validation/engine.py.
    cuda_graphs: str = "none"
    # Wall-clock budget of this process, e.g. "23h30m", "90m", "1d2h", "3600s"; when it is used
    # up every rank finishes its step, saves and exits with code 75 (rerun to continue).
    max_time: str | None = None
    # Bad steps: a non-finite loss or grad norm never updates the weights. A loss above
    # mean + spike_zscore * std of the last spike_window accepted steps is a spike: logged, and
    # skipped like a non-finite one when skip_spikes. max_bad_steps skipped steps in a row save
    # and stop the run (exit code 65). spike_zscore 0 turns spike detection off.
    spike_zscore: float = 6.0
    spike_window: int = 50
    skip_spikes: bool = False
    max_bad_steps: int = 10
    # TEST HOOK: the loss of these steps (1-based, as logged) is replaced by NaN after the
    # backward pass, to exercise the bad-step path. Leave empty outside tests.
    nan_loss_steps: list[int] = field(default_factory=list)
    # Profile optimizer step N (1-based, as logged; all its micro-batches, forward, backward and
    # update, on every rank) with torch.profiler: a chrome trace and a kernel table per rank in
    # <run dir>/profile/ (docs/throughput.md). null = off. A run resumed past step N does not
    # profile.
    profile_step: int | None = None


@dataclass
class CheckpointConfig:
    interval: int = 0  # 0 = only the final checkpoint
    keep: int = 2  # newest checkpoints kept
    keep_steps: list[int] = field(default_factory=list)  # also kept, whatever their age
    dir: str = "checkpoints"  # relative to the run directory unless absolute
    # auto: the newest valid checkpoint in dir (a corrupt one falls back to the one before);
    # none: start fresh; or a path: that checkpoint folder (or the newest valid one under it).
    resume: str | None = "auto"
    save_final: bool = True
    async_save: bool = False  # write in a background process; the next save/the end waits


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "omnimoe"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # DeepSpeed config keys (its JSON schema, free-form) for trainer.engine=deepspeed, merged over
    # the keys derived from the sections above (engine/deepspeed_config.py); conf/deepspeed/ holds
    # the ZeRO presets. Read only by the DeepSpeed engine.
    deepspeed: dict[str, Any] = field(default_factory=dict)


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a composed config (an OmegaConf ``DictConfig``) that its schema does not
    declare. Composition rejects them, except those added with ``+key=value``: Hydra lifts the
    schema's struct flag for an addition and ``OmegaConf.to_object`` then sets them as extra
    attributes, so a typo such as ``+trainer.maxsteps=3`` would be ignored. Free-form fields
    (``deepspeed``, typed ``dict``) accept any key."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    if not isinstance(node, DictConfig) or not dataclasses.is_dataclass(schema):
        return []
    declared = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key in node:
        if key not in declared:
            found.append(f"{prefix}{key}")
        else:
            found += unknown_keys(node._get_node(key), f"{prefix}{key}.")
    return found


def register_configs() -> None:
    """Register the schema that ``conf/config.yaml`` lists first in its defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RootConfig)
