"""Run as ``python -m tests.train.usage_counts_case`` with ``TRITON_INTERPRET=1`` (read when the
kernels are first imported): a tiny OmniMoE layer on the Triton backend counts its experts'
usage through the kernel's backward, once per selection, and through the forward frame where
no backward follows. Exits non-zero (an assertion) on a wrong count."""

from __future__ import annotations

import torch

from omnimoe_train.distributed import init_runtime, shutdown_runtime
from omnimoe_train.model.gpt import build_model, transformer_config
from tests.train.conftest import TINY_MODEL, compose_config


def _expected(indices: list[torch.Tensor], n: int) -> torch.Tensor:
    ids = torch.cat([i.reshape(-1) for i in indices])
    return torch.zeros(n, dtype=torch.float64).index_add_(0, ids, torch.ones(ids.numel()).double())


def main() -> None:
    init_runtime(compose_config("trainer.device=cpu"))
    try:
        cfg = compose_config(*TINY_MODEL, "model.expert_backend=triton")
        model = build_model(cfg, transformer_config(cfg, bf16=False), vocab_size=128)
        layer = model.decoder.layers[0].mlp
        routed = []
        route = layer.router.forward
        layer.router.forward = lambda x: routed.append(r := route(x)) or r
        n = layer.stats.counts_N.numel()
        layer.train()
        x = torch.randn(8, 2, 64, requires_grad=True)
        assert layer.counts_in_routed(x.view(16, 64))
        y, _ = layer(x)
        assert layer.stats.counts_N.sum().item() == 0  # counted by the backward, not here
        assert layer.stats.tokens.item() == 16
        y.sum().backward()
        assert torch.equal(layer.stats.counts_N, _expected([r.indices_TK for r in routed], n))
        with torch.no_grad():  # no backward to come: the frame counts
            assert not layer.counts_in_routed(x.view(16, 64))
            layer(torch.randn(8, 2, 64))
        assert torch.equal(layer.stats.counts_N, _expected([r.indices_TK for r in routed], n))
        layer.eval()
        layer(torch.randn(8, 2, 64)).__getitem__(0).sum().backward()  # evaluation: not counted
        assert torch.equal(layer.stats.counts_N, _expected([r.indices_TK for r in routed[:2]], n))
        layer.train()
        layer.stats.enabled = False  # trainer.expert_stats=false: nothing counted anywhere
        layer(torch.randn(8, 2, 64, requires_grad=True))[0].sum().backward()
        assert torch.equal(layer.stats.counts_N, _expected([r.indices_TK for r in routed[:2]], n))
    finally:
        shutdown_runtime()


if __name__ == "__main__":
    main()
