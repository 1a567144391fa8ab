"""The values an enumerated key may take, the model families they group into, and the keys
that must be positive integers (checked in this order, first of all rules)."""

from __future__ import annotations

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
    "model.expert_grad_coef": ("split", "bf16"),
    "model.fused_cross_entropy": ("none", "megatron", "liger"),
    "parallel.expert_table_sharding": ("rows", "dim", "auto"),
    "optim.name": ("adamw",),
    "optim.decay_style": ("linear", "cosine", "sqrt"),
    "trainer.engine": ("megatron", "deepspeed"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.precision": ("auto", "fp32", "bf16"),
    "trainer.compile": ("none", "layers"),
    "trainer.cuda_graphs": ("none", "mlp"),
    "logging.wandb.mode": ("offline", "online", "disabled"),
}
POSITIVE_INTEGERS = (
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
)
