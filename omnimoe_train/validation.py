"""One validation step for the whole configuration, and the rules that need the data.

:func:`validate` runs before any model, data or process-group work. Each violated rule raises a
:class:`ConfigError` whose message is one line naming the key and the rule; the CLI prints it and
exits with code 2. The limits of the Triton kernels are rules here too (``omnimoe_kernels.limits``
defines them once, for the kernels and for these rules).

:func:`validate_against_data` holds the rules that compare the config with the data: the
tokenizer's vocabulary, a prepared dataset's sample length and its validation split. They run as
early as the facts exist: in the CLI's pre-check when ``data.tokenizer`` or an already prepared
``data.dir`` is given, and in any case right after data preparation, before any model work.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from omnimoe_data.urls import is_url
from omnimoe_kernels.limits import (
    EXPERTS_MAX_HIDDEN,
    EXPERTS_MAX_NUM,
    EXPERTS_MAX_PAIRS,
    ROUTER_MAX_TOP_K,
)
from omnimoe_train.checkpoint.signals import parse_duration
from omnimoe_train.config import DataConfig, ModelConfig, ParallelConfig, RootConfig
from omnimoe_train.engine.deepspeed_config import check_deepspeed_keys, check_deepspeed_schema
from omnimoe_train.names import COMPONENT_MAX_BYTES, long_component
from omnimoe_train.parallel.layout import LayoutError, ParallelLayout, validate_layout

# The prepared dataset's manifest (``omnimoe_data.shards.MANIFEST_NAME``; not imported, so the
# pre-check stays free of numpy and torch).
MANIFEST_NAME = "manifest.json"

MLPS = ("omnimoe", "dense", "gshard", "deepseekmoe", "pkm", "peer")
ATOMIC_EXPERT_MLPS = ("omnimoe", "peer")  # tables U, V: expert-parallel table sharding applies
PRODUCT_KEY_MLPS = ("omnimoe", "pkm", "peer")  # N = n*n experts / slots, top_k of them
MEGATRON_MOE_MLPS = ("gshard", "deepseekmoe")
CHOICES: dict[str, tuple[str, ...]] = {
    "model.mlp": MLPS,
    "model.router": ("cartesian", "dense"),
    "model.execution": ("expert", "token"),
    "model.router_norm": ("batchnorm", "none"),
    "model.router_weights": ("softmax", "exp"),
    "model.expert_backend": ("auto", "torch", "triton"),
    "model.expert_grad_path": ("auto", "dense", "pairs"),
    "model.fused_cross_entropy": ("none", "megatron", "liger"),
    "parallel.expert_table_sharding": ("rows", "dim", "auto"),
    "optim.name": ("adamw",),
    "optim.decay_style": ("linear", "cosine", "sqrt"),
    "trainer.engine": ("megatron", "deepspeed"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.precision": ("auto", "fp32", "bf16"),
    "trainer.compile": ("none", "layers"),
    "logging.wandb.mode": ("offline", "online", "disabled"),
}


class ConfigError(ValueError):
    """An invalid configuration value: ``key`` and the ``rule`` it breaks."""

    def __init__(self, key: str, rule: str) -> None:
        super().__init__(f"{key}: {rule}")
        self.key = key
        self.rule = rule


def _get(cfg: RootConfig, dotted: str) -> object:
    node: object = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _require(ok: bool, key: str, rule: str) -> None:
    if not ok:
        raise ConfigError(key, rule)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_parallel_size(cfg: RootConfig, world_size: int) -> int:
    return world_size // (cfg.parallel.tp * cfg.parallel.pp)


def validate(cfg: RootConfig, world_size: int | None = None, *, this_machine: bool = True) -> None:
    """Check every cross-field rule; raise :class:`ConfigError` on the first violation.

    ``this_machine=False`` leaves out the rules about the machine the check runs on (a visible
    CUDA device, an installed package): ``omnimoe-params`` describes a config meant for another
    machine."""
    world_size = world_size_from_env() if world_size is None else world_size
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        _require(value in allowed, key, f"must be one of {', '.join(allowed)} (got {value!r})")

    m, p, d, o, t, c = cfg.model, cfg.parallel, cfg.data, cfg.optim, cfg.trainer, cfg.checkpoint
    for key in (
        "model.num_layers",
        "model.hidden_size",
        "model.num_attention_heads",
        "model.ffn_hidden_size",
        "data.seq_len",
        "data.micro_batch_size",
        "data.global_batch_size",
        "data.samples_per_shard",
        "trainer.max_steps",
        "trainer.log_interval",
        "trainer.eval_interval",
        "trainer.eval_iters",
        "parallel.tp",
        "parallel.pp",
        "parallel.ep",
    ):
        value = _get(cfg, key)
        _require(value >= 1, key, f"must be a positive integer (got {value})")

    _require(
        m.hidden_size % m.num_attention_heads == 0,
        "model.hidden_size",
        f"must be divisible by model.num_attention_heads ({m.hidden_size} % {m.num_attention_heads} != 0)",
    )
    groups = m.num_query_groups or m.num_attention_heads
    _require(
        groups >= 1 and m.num_attention_heads % groups == 0,
        "model.num_query_groups",
        f"must divide model.num_attention_heads={m.num_attention_heads} (got {groups})",
    )
    _require(
        (m.hidden_size // m.num_attention_heads) % 2 == 0,
        "model.hidden_size",
        "head dimension (hidden_size / num_attention_heads) must be even for RoPE",
    )
    if m.vocab_size is not None:
        _require(m.vocab_size >= 2, "model.vocab_size", f"must be >= 2 (got {m.vocab_size})")

    # A typed schema rejects other values on the command line; configs built in code are not.
    _require(
        isinstance(p.ep_overlap, bool),
        "parallel.ep_overlap",
        f"must be true or false (got {p.ep_overlap!r})",
    )
    _validate_mlp(m, p)
    if m.mlp in PRODUCT_KEY_MLPS and m.expert_backend != "torch":
        _validate_kernel_limits(cfg)

    if t.engine == "deepspeed":
        _validate_deepspeed(cfg)
    # Parallel layout: rules that can be checked from the config and the launcher's world size,
    # before any process group exists (parallel.layout holds them; here they get config keys).
    _validate_layout(cfg, world_size, groups)
    dp = data_parallel_size(cfg, world_size)
    _require(
        d.global_batch_size % (d.micro_batch_size * dp) == 0,
        "data.global_batch_size",
        f"must be a multiple of data.micro_batch_size * data-parallel size "
        f"({d.micro_batch_size} * {dp}) (got {d.global_batch_size}); "
        + _batch_fix(d.global_batch_size, d.micro_batch_size, dp),
    )
    if p.vpp is not None:
        # megatron's interleaved schedule runs micro-batches in groups of pp per model chunk.
        num_microbatches = d.global_batch_size // (d.micro_batch_size * dp)
        _require(
            num_microbatches % p.pp == 0,
            "data.global_batch_size",
            f"with parallel.vpp the micro-batches per step ({num_microbatches} = global_batch_size "
            f"/ (micro_batch_size * dp={dp})) must be a multiple of parallel.pp={p.pp}",
        )
    _validate_data(d)

    _require(o.lr > 0, "optim.lr", f"must be positive (got {o.lr})")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(0.0 <= o.decay_fraction <= 1.0, "optim.decay_fraction", "must be in [0, 1]")
    _require(
        0 <= o.warmup_steps < t.max_steps,
        "optim.warmup_steps",
        f"must be in [0, trainer.max_steps={t.max_steps}) (got {o.warmup_steps})",
    )
    _require(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables clipping)")
    _require(c.interval >= 0, "checkpoint.interval", "must be >= 0 (0 = final only)")
    _require(c.keep >= 1, "checkpoint.keep", f"must be >= 1 (got {c.keep})")
    _require(
        all(s >= 0 for s in c.keep_steps),
        "checkpoint.keep_steps",
        f"must be steps >= 0 (got {list(c.keep_steps)})",
    )
    _validate_robustness(cfg)
    _validate_names(cfg)
    if this_machine:
        _validate_device(t.device)
    _validate_throughput_levers(cfg, this_machine)


def _validate_device(device: str) -> None:
    """``trainer.device=cuda`` needs a visible GPU (checked as ``distributed.resolve_device``
    does, with ``torch.cuda.is_available``, which does not create a CUDA context)."""
    if device != "cuda":
        return
    import torch

    _require(
        torch.cuda.is_available(),
        "trainer.device",
        "cuda but no CUDA device is visible (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use trainer.device=cpu or auto",
    )


def _runs_on_cuda(device: str) -> bool:
    """Whether ``trainer.device`` resolves to CUDA (as ``distributed.resolve_device`` does)."""
    import torch

    return device != "cpu" and torch.cuda.is_available()


def _validate_throughput_levers(cfg: RootConfig, this_machine: bool) -> None:
    """``model.fused_cross_entropy=liger`` and ``trainer.compile`` (model/fusions.py); the
    package and CUDA rules only when ``this_machine``."""
    m, p, t = cfg.model, cfg.parallel, cfg.trainer
    if m.fused_cross_entropy == "liger":
        key = "model.fused_cross_entropy"
        _require(
            p.tp == 1,
            key,
            f"liger's fused linear cross-entropy is not vocab-parallel: needs parallel.tp=1 "
            f"(got {p.tp}); model.fused_cross_entropy=megatron works at any tp",
        )
    if m.fused_cross_entropy == "liger" and this_machine:
        key = "model.fused_cross_entropy"
        _require(
            importlib.util.find_spec("liger_kernel") is not None,
            key,
            "liger needs the liger-kernel package: pip install -e '.[liger]'",
        )
        _require(
            _runs_on_cuda(t.device) or os.environ.get("TRITON_INTERPRET") == "1",
            key,
            "liger runs Triton kernels: needs a CUDA device (or TRITON_INTERPRET=1)",
        )
    if t.compile != "none":
        key = "trainer.compile"
        _require(
            _runs_on_cuda(t.device) or (not this_machine and t.device != "cpu"),
            key,
            f"{t.compile} compiles for CUDA only (trainer.device={t.device}, "
            "no CUDA device in use); use trainer.compile=none",
        )
        _require(t.engine == "megatron", key, f"needs trainer.engine=megatron (got {t.engine})")
        _require(
            p.tp == 1,
            key,
            f"needs parallel.tp=1 (got {p.tp}): megatron's tensor-parallel communication "
            "inside a layer is not traced",
        )
        _require(
            m.mlp not in MEGATRON_MOE_MLPS,
            key,
            f"megatron's MoE layer (model.mlp={m.mlp}) has data-dependent token dispatch; "
            "use it with trainer.compile=none",
        )


def _batch_fix(global_batch: int, micro_batch: int, dp: int) -> str:
    """The overrides that satisfy global = micro * dp * accumulation: the next larger global
    batch, or the largest smaller micro-batch that divides it."""
    step = micro_batch * dp
    fixes = [f"data.global_batch_size={-(-global_batch // step) * step}"]
    if global_batch % dp == 0:
        micro = max(m for m in range(1, micro_batch + 1) if (global_batch // dp) % m == 0)
        fixes.append(f"data.micro_batch_size={micro}")
    return "set " + " or ".join(fixes)


def _validate_robustness(cfg: RootConfig) -> None:
    """Time limit and bad-step rules."""
    t = cfg.trainer
    if t.max_time is not None:
        try:
            parse_duration(t.max_time)
        except ValueError as exc:
            raise ConfigError("trainer.max_time", str(exc)) from None
    _require(
        t.spike_zscore >= 0, "trainer.spike_zscore", f"must be >= 0 (0 = off; got {t.spike_zscore})"
    )
    _require(t.spike_window >= 2, "trainer.spike_window", f"must be >= 2 (got {t.spike_window})")
    _require(t.max_bad_steps >= 1, "trainer.max_bad_steps", f"must be >= 1 (got {t.max_bad_steps})")
    _require(
        all(s >= 1 for s in t.nan_loss_steps),
        "trainer.nan_loss_steps",
        f"must be steps >= 1 (a test hook; got {list(t.nan_loss_steps)})",
    )


# W&B refuses a run whose tags are empty or longer than this (wandb.Settings.validate_tags).
WANDB_TAG_MAX_CHARS = 64


def _validate_names(cfg: RootConfig) -> None:
    """Folders the run creates from paths given whole, and W&B's tag rule: checked here, not
    at the first write (the checkpoint folder is first made at the end of training)."""
    for key in ("data.dir", "checkpoint.dir"):
        path = _get(cfg, key)
        part = long_component(path) if path is not None else None
        _require(
            part is None,
            key,
            f"a path component has {len(part.encode()) if part else 0} bytes, more than the "
            f"file system's {COMPONENT_MAX_BYTES} ({(part or '')[:40]}...)",
        )
    w = cfg.logging.wandb
    if w.mode != "disabled":
        for tag in w.tags:
            _require(
                1 <= len(str(tag)) <= WANDB_TAG_MAX_CHARS,
                "logging.wandb.tags",
                f"each tag must have 1 to {WANDB_TAG_MAX_CHARS} characters, W&B's rule "
                f"(got {len(str(tag))}: {str(tag)[:40]!r})",
            )


def _validate_kernel_limits(cfg: RootConfig) -> None:
    """What the Triton kernels support (``auto`` takes them on CUDA; the reference has no
    limits). One expert-kernel call sees the pairs of a whole micro-batch of every rank of the
    expert-parallel group (the dispatch gathers them), hence the factor ep."""
    m, d, ep = cfg.model, cfg.data, cfg.parallel.ep
    torch_only = "; model.expert_backend=torch has no such limit"
    # PKM and PEER search top_k / heads per head; the dense-router ablation uses torch.topk.
    heads = {"pkm": m.pkm_heads, "peer": m.peer_heads}.get(m.mlp, 1)
    if m.router == "cartesian":
        _require(
            m.top_k // heads <= ROUTER_MAX_TOP_K,
            "model.top_k",
            f"per head must be <= {ROUTER_MAX_TOP_K}, the Triton router's limit "
            f"(got {m.top_k // heads}){torch_only}",
        )
    if m.mlp not in ATOMIC_EXPERT_MLPS:
        return  # PKM reads its values with embedding_bag, not the expert kernels
    _require(
        m.num_experts <= EXPERTS_MAX_NUM,
        "model.num_experts",
        f"must be <= {EXPERTS_MAX_NUM}, the Triton expert kernels' limit "
        f"(got {m.num_experts}){torch_only}",
    )
    # The kernels see hidden_size / ep columns under dim sharding: the full width is the bound.
    _require(
        m.hidden_size <= EXPERTS_MAX_HIDDEN,
        "model.hidden_size",
        f"must be <= {EXPERTS_MAX_HIDDEN}, the Triton expert kernels' limit "
        f"(got {m.hidden_size}){torch_only}",
    )
    pairs = d.micro_batch_size * d.seq_len * m.top_k * ep
    _require(
        pairs <= EXPERTS_MAX_PAIRS,
        "data.micro_batch_size",
        f"micro_batch_size * seq_len * model.top_k * parallel.ep = {pairs} token-expert pairs in "
        f"one expert-kernel call, above the Triton kernels' limit {EXPERTS_MAX_PAIRS}{torch_only}",
    )


@dataclass(frozen=True)
class DataFacts:
    """What the data-dependent rules know about a tokenizer or a prepared dataset."""

    where: str  # names the source in messages: "data.dir=..." or "data.tokenizer=..."
    vocab_size: int | None  # the tokenizer's vocabulary: token ids are below it
    seq_len: int | None = None  # a prepared dataset's sample length - 1
    split_samples: dict[str, int] | None = None  # samples per split of a prepared dataset


def dataset_facts(data_dir: Path, where: str) -> DataFacts | None:
    """The facts of the dataset prepared in ``data_dir`` (its manifest), or None if none is."""
    try:
        manifest = json.loads((data_dir / MANIFEST_NAME).read_text())
        splits = {
            name: sum(int(shard["samples"]) for shard in split["shards"])
            for name, split in manifest["splits"].items()
        }
        return DataFacts(where, int(manifest["vocab_size"]), int(manifest["seq_len"]), splits)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: preparation makes (or refuses) it


def tokenizer_facts(path: str) -> DataFacts:
    """The vocabulary of an existing ``tokenizer.json`` (what preparation would use)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(Path(path).expanduser()))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("data.tokenizer", f"cannot load {path} ({reason})") from None
    return DataFacts(f"data.tokenizer={path}", tok.get_vocab_size(with_added_tokens=True))


def data_facts_before_preparation(d: DataConfig) -> list[DataFacts]:
    """The facts known before any data work: a given tokenizer, a dataset already in data.dir."""
    facts = [tokenizer_facts(d.tokenizer)] if d.tokenizer is not None else []
    if d.dir is not None:
        found = dataset_facts(Path(d.dir).expanduser(), f"data.dir={d.dir}")
        facts += [found] if found is not None else []
    return facts


def validate_against_data(cfg: RootConfig, facts: DataFacts) -> None:
    """Rules between the config and the data; raise :class:`ConfigError` on the first broken."""
    m, d = cfg.model, cfg.data
    if m.vocab_size is not None and facts.vocab_size is not None:
        _require(
            m.vocab_size >= facts.vocab_size,
            "model.vocab_size",
            f"must be >= the tokenizer's vocabulary of {facts.vocab_size} tokens "
            f"({facts.where}) (got {m.vocab_size}; leave it unset to take the tokenizer's)",
        )
    if facts.seq_len is not None:
        # A prepared dataset is never re-cut: data.dir may hold the user's only copy.
        _require(
            facts.seq_len == d.seq_len,
            "data.seq_len",
            f"must equal the prepared dataset's seq_len={facts.seq_len} ({facts.where}) "
            f"(got {d.seq_len})",
        )
    train = (facts.split_samples or {}).get("train")
    if train is not None and not d.dirs:  # in a mixture, a small source repeats by design
        _require(
            d.global_batch_size <= train,
            "data.global_batch_size",
            f"must not exceed the training split's {train} samples ({facts.where}): every step "
            f"would repeat samples (got {d.global_batch_size}; give more data or a smaller batch)",
        )
    if facts.split_samples is not None and d.val_fraction > 0:
        _require(
            facts.split_samples.get("val", 0) > 0,
            "data.val_fraction",
            f"the validation split is empty ({facts.where}); set data.val_fraction=0 to train "
            f"without evaluation, or give more data or a larger fraction (got {d.val_fraction})",
        )


def _validate_mlp(m: ModelConfig, p: ParallelConfig) -> None:
    """Rules of the chosen ``model.mlp`` and its ablation switches."""
    _require(
        m.router == "cartesian" or m.mlp == "omnimoe",
        "model.router",
        f"router=dense is an ablation of model.mlp=omnimoe (got model.mlp={m.mlp})",
    )
    _require(
        m.execution == "expert" or m.mlp in ATOMIC_EXPERT_MLPS,
        "model.execution",
        f"execution=token needs atomic experts (model.mlp=omnimoe or peer; got {m.mlp})",
    )
    _require(
        m.execution == "expert" or p.ep == 1,
        "model.execution",
        f"execution=token gathers from whole local tables: needs parallel.ep=1 (got {p.ep})",
    )
    if m.mlp in PRODUCT_KEY_MLPS:
        n = math.isqrt(m.num_experts) if m.num_experts > 0 else 0
        _require(
            m.num_experts > 0 and n * n == m.num_experts,
            "model.num_experts",
            f"must be a perfect square n*n for the "
            f"{'Cartesian' if m.mlp == 'omnimoe' else 'product-key'} router (got {m.num_experts})",
        )
        _require(
            1 <= m.top_k <= m.num_experts,
            "model.top_k",
            f"must be in [1, model.num_experts={m.num_experts}] (got {m.top_k})",
        )
    for heads_key, dim_key, mlp in (
        ("model.pkm_heads", "model.pkm_key_dim", "pkm"),
        ("model.peer_heads", "model.peer_key_dim", "peer"),
    ):
        if m.mlp != mlp:
            continue
        heads, key_dim = _get_model(m, heads_key), _get_model(m, dim_key)
        _require(heads >= 1, heads_key, f"must be a positive integer (got {heads})")
        _require(
            m.top_k % heads == 0,
            "model.top_k",
            f"must be a multiple of {heads_key}={heads} (top_k counts all heads; got {m.top_k})",
        )
        _require(
            key_dim >= 2 and key_dim % 2 == 0,
            dim_key,
            f"must be a positive even integer (two half-keys; got {key_dim})",
        )
    if m.mlp in MEGATRON_MOE_MLPS:
        _validate_megatron_moe(m, p)


def _get_model(m: ModelConfig, dotted: str) -> int:
    return getattr(m, dotted.split(".", 1)[1])


def _validate_megatron_moe(m: ModelConfig, p: ParallelConfig) -> None:
    E = m.moe_num_experts
    _require(E >= 1, "model.moe_num_experts", f"must be a positive integer (got {E})")
    _require(
        1 <= m.moe_top_k <= E,
        "model.moe_top_k",
        f"must be in [1, model.moe_num_experts={E}] (got {m.moe_top_k})",
    )
    _require(
        E % p.ep == 0,
        "model.moe_num_experts",
        f"must be divisible by parallel.ep={p.ep} (megatron places E / ep experts per rank)",
    )
    width = m.moe_ffn_hidden_size
    _require(
        width is None or width >= 1,
        "model.moe_ffn_hidden_size",
        f"must be a positive integer or null (= model.ffn_hidden_size; got {width})",
    )
    shared = m.moe_shared_ffn_hidden_size
    if m.mlp == "deepseekmoe":
        _require(
            shared is not None and shared >= 1,
            "model.moe_shared_ffn_hidden_size",
            f"deepseekmoe needs shared experts: a positive width (got {shared})",
        )
    else:
        _require(
            shared is None,
            "model.moe_shared_ffn_hidden_size",
            f"gshard has no shared experts: must be null (got {shared}; use deepseekmoe)",
        )
    _require(
        m.moe_aux_loss_coeff >= 0,
        "model.moe_aux_loss_coeff",
        f"must be >= 0 (got {m.moe_aux_loss_coeff})",
    )
    _require(
        p.tp == 1 or p.sequence_parallel,
        "parallel.sequence_parallel",
        f"megatron's MoE layer with tp={p.tp} > 1 needs sequence_parallel=true in training",
    )


def _validate_data(d: DataConfig) -> None:
    """Where the data comes from must be unambiguous; preparation options must be usable."""
    _require(0.0 <= d.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0 (got {d.num_workers})")
    _require(
        d.tokenizer is not None or d.vocab_size >= 257,
        "data.vocab_size",
        f"must be >= 257 (256 bytes + end-of-document) to train a tokenizer (got {d.vocab_size})",
    )
    for key in ("max_bytes", "tokenizer_sample_bytes", "prepare_workers"):
        value = getattr(d, key)
        _require(value is None or value >= 1, f"data.{key}", f"must be >= 1 or null (got {value})")
    if d.dirs is not None:
        _require(len(d.dirs) >= 1, "data.dirs", "must list at least one prepared dataset")
        _require(
            d.dir is None, "data.dirs", "set either data.dir (one dataset) or data.dirs, not both"
        )
        _require(
            d.inputs is None,
            "data.inputs",
            "cannot be prepared into a mixture: prepare each dataset, then list them in data.dirs",
        )
    if d.weights is not None:
        _require(d.dirs is not None, "data.weights", "needs data.dirs (one weight per dataset)")
        _require(
            len(d.weights) == len(d.dirs),
            "data.weights",
            f"needs one weight per data.dirs entry ({len(d.dirs)}), got {len(d.weights)}",
        )
        _require(
            all(math.isfinite(w) and w > 0 for w in d.weights),
            "data.weights",
            f"must be positive numbers (got {list(d.weights)})",
        )
    if d.dir is not None and d.inputs is not None:
        _require(
            not is_url(d.dir),
            "data.dir",
            f"data.inputs are prepared into a local folder, not a URL (got {d.dir!r})",
        )


def _validate_deepspeed(cfg: RootConfig) -> None:
    """``trainer.engine=deepspeed``: data parallel only, DeepSpeed installed, its keys sane."""
    p = cfg.parallel
    model_parallel = {"parallel.tp": p.tp, "parallel.pp": p.pp, "parallel.ep": p.ep}
    bad = {key: value for key, value in model_parallel.items() if value != 1}
    _require(
        not bad and p.vpp is None,
        "trainer.engine",
        "deepspeed is data parallel only: parallel.tp, parallel.pp and parallel.ep must be 1 and "
        f"parallel.vpp null (got {', '.join(f'{k}={v}' for k, v in bad.items()) or f'vpp={p.vpp}'}"
        "); use trainer.engine=megatron for tensor, pipeline or expert parallelism",
    )
    _require(
        not p.sequence_parallel and not p.distributed_optimizer,
        "trainer.engine",
        "deepspeed shards the optimizer with ZeRO (deepspeed=zero1|zero2|zero3...): "
        "parallel.sequence_parallel and parallel.distributed_optimizer must be false",
    )
    _require(
        importlib.util.find_spec("deepspeed") is not None,
        "trainer.engine",
        "deepspeed is not installed (pip install -e '.[deepspeed]')",
    )
    problem = check_deepspeed_keys(cfg.deepspeed) or check_deepspeed_schema(cfg.deepspeed)
    if problem is not None:
        raise ConfigError(*problem)


def layout_from_config(cfg: RootConfig, world_size: int) -> ParallelLayout:
    p = cfg.parallel
    return ParallelLayout(
        world_size=world_size,
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp,
        ep=p.ep,
        sequence_parallel=p.sequence_parallel,
        expert_table_sharding=p.expert_table_sharding,
        distributed_optimizer=p.distributed_optimizer,
    )


def _validate_layout(cfg: RootConfig, world_size: int, groups: int) -> None:
    m = cfg.model
    try:
        validate_layout(
            layout_from_config(cfg, world_size),
            num_layers=m.num_layers,
            num_heads=m.num_attention_heads,
            num_query_groups=groups,
            # Only atomic-expert tables are sharded by these rules; the other variants have none
            # (megatron's MoE checks its own): any square count >= ep passes the expert rules.
            num_experts=m.num_experts
            if m.mlp in ATOMIC_EXPERT_MLPS
            else max(cfg.parallel.ep, 1) ** 2,
            hidden_size=m.hidden_size,
        )
    except LayoutError as exc:
        prefix = {"world_size": "", "num_experts": "model."}.get(exc.key, "parallel.")
        key = prefix + exc.key
        raise ConfigError(key, f"invalid parallel layout: {exc.rule}") from None
