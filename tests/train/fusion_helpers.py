"""A few plain SGD steps of a tiny GPT, to compare a throughput lever's losses with the
baseline's (tests/train/test_fusions*.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from omnimoe_train.model.fusions import compile_layers
from omnimoe_train.model.gpt import build_model, transformer_config
from tests.train.conftest import TINY_MODEL, compose_config

VOCAB, BATCH, SEQ, LR = 128, 3, 16, 0.5
TINY = TINY_MODEL
assert f"data.seq_len={SEQ}" in TINY


def sgd_losses(
    *overrides: str,
    steps: int = 3,
    compile_backend: str | None = None,
    device: str = "cpu",
    bf16: bool = False,
    prepare: Callable[[nn.Module], None] | None = None,
) -> list[float]:
    """Mean loss of each of ``steps`` SGD steps (lr ``LR``) on fixed random batches, from the
    same initial weights whatever the overrides; ``compile_backend`` compiles the layers with
    that torch.compile backend (``aot_eager``: graph capture without a C compiler); ``prepare``
    is called with the model after that, before the first step."""
    cfg = compose_config(*TINY, f"trainer.device={device}", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg, transformer_config(cfg, bf16=bf16), vocab_size=VOCAB).to(device)
    if compile_backend is not None:
        assert compile_layers(model, backend=compile_backend) == cfg.model.num_layers + 1
    if prepare is not None:
        prepare(model)
    generator = torch.Generator().manual_seed(1)
    positions = torch.arange(SEQ, device=device).expand(BATCH, SEQ)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator).to(device)
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
        losses.append(loss.item())
    return losses


def losses_in_subprocess(*overrides: str, env: dict[str, str]) -> list[float]:
    """:func:`sgd_losses` in a fresh interpreter with ``env`` added: for settings read when
    Triton is first imported (``TRITON_INTERPRET``), which this process has long done."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    # Without this process's rendezvous variables: the child starts its own one-rank world.
    dist_vars = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    child_env = {k: v for k, v in os.environ.items() if k not in dist_vars} | env
    proc = subprocess.run(
        [sys.executable, "-m", "tests.train.fusion_helpers", *overrides],
        env=child_env, cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import json
    import sys

    from omnimoe_train.distributed import init_runtime, shutdown_runtime

    init_runtime(compose_config("trainer.device=cpu"))
    try:
        print(json.dumps(sgd_losses(*sys.argv[1:])))
    finally:
        shutdown_runtime()
