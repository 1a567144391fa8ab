"""Every ``model.mlp`` variant and OmniMoE ablation trains through the real engine (megatron DDP,
optimizer, schedule) at tiny size: 20 steps on two fixed batches, the loss falls, nothing is NaN,
and every routed variant fills its routing statistics (GShard / DeepSeekMoE also megatron's aux
loss)."""

from __future__ import annotations

import itertools

import pytest
import torch

from omnimoe_train.distributed import init_runtime
from omnimoe_train.engine.megatron import MegatronEngine
from omnimoe_train.model.expert_stats import ExpertStats, collect_aux_loss, collect_expert_metrics
from tests.train.conftest import compose_config

VOCAB = 128
TINY = (
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=48",
    "model.num_experts=64",
    "model.top_k=8",
    "model.pkm_heads=2",
    "model.pkm_key_dim=16",
    "model.peer_heads=2",
    "model.peer_key_dim=16",
    "model.moe_num_experts=4",
    "model.moe_ffn_hidden_size=24",
    f"model.vocab_size={VOCAB}",
    "data.seq_len=16",
    "data.micro_batch_size=4",
    "data.global_batch_size=8",
    "trainer.device=cpu",
    "trainer.max_steps=20",
    "optim.warmup_steps=2",
    "optim.lr=0.01",
    "checkpoint.save_final=false",
)
VARIANTS = {
    "omnimoe": ("model.mlp=omnimoe",),
    "dense": ("model.mlp=dense",),
    "gshard": ("model.mlp=gshard",),
    "deepseekmoe": ("model.mlp=deepseekmoe", "model.moe_shared_ffn_hidden_size=16"),
    "pkm": ("model.mlp=pkm",),
    "peer": ("model.mlp=peer",),
    "omnimoe-no-shared-mlp": ("model.shared_expert=false",),
    "omnimoe-dense-router": ("model.router=dense",),
    "omnimoe-token-centric": ("model.execution=token",),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_with_falling_loss(single_rank: None, variant: str) -> None:
    cfg = compose_config(*TINY, *VARIANTS[variant])
    rt = init_runtime(cfg)
    engine = MegatronEngine(cfg, rt, VOCAB)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, VOCAB, (8, 17), generator=gen) for _ in range(2)]
    losses = []
    for batch in itertools.islice(itertools.cycle(batches), 20):
        total = engine.forward_backward_step(iter(batch.split(4)))
        losses.append(engine.mean_loss(total))
        engine.optimizer_step()
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.8 * first, (variant, losses)

    stats = [m for c in engine.model for m in c.modules() if isinstance(m, ExpertStats)]
    metrics = collect_expert_metrics(stats, sequence_parallel=False)
    if cfg.model.mlp == "dense":
        assert stats == [] and metrics == {}
        return
    assert len(stats) == cfg.model.num_layers
    assert 0 < metrics["expert_usage"] <= 1 and metrics["unevenness"] >= 0
    assert metrics["load_imbalance"] >= 1 and metrics["router_entropy"] > 0
    aux = collect_aux_loss(num_layers=2, microbatches=20 * engine.num_microbatches)
    if cfg.model.mlp in ("gshard", "deepseekmoe"):
        # The switch loss E * sum_e f_e P_e is 1 when balanced and grows with imbalance.
        assert aux["aux_loss"] >= 0.99
    else:
        assert aux.get("aux_loss", 0.0) == 0.0


def test_aux_loss_reaches_the_router_gradient(single_rank: None) -> None:
    """megatron's MoEAuxLossAutoScaler adds the load-balancing loss's gradient in the backward."""
    grads = {}
    batch = torch.randint(0, VOCAB, (8, 17), generator=torch.Generator().manual_seed(1))
    for coeff in (0.0, 0.5):
        cfg = compose_config(*TINY, "model.mlp=gshard", f"model.moe_aux_loss_coeff={coeff}")
        engine = MegatronEngine(cfg, init_runtime(cfg), VOCAB)  # reseeded: the same weights
        engine.forward_backward_step(iter(batch.split(4)))
        layer = engine.model[0].module.decoder.layers[0].mlp
        grads[coeff] = (layer.router.weight.detach().clone(), layer.router.weight.main_grad.clone())
    (weight0, without), (weight1, with_aux) = grads[0.0], grads[0.5]
    assert torch.equal(weight0, weight1) and without.abs().sum() > 0
    assert (with_aux - without).abs().max() > 1e-3 * without.abs().max()
