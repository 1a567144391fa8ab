"""A 2-rank data-parallel run trains on exactly the samples of a 1-rank run with the same
global batch: the real trainer path (``Trainer``: data preparation glue, loader, megatron
engine) on spawned gloo ranks, fp32 on CPU, 5-step training-loss curves within 1e-5.

Training losses are compared (not held-out ones): the router's BatchNorm running statistics,
which only evaluation uses, are another change's subject.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnimoe_data.prepare import prepare
from tests.parallel.distributed import run_distributed

from .helpers import make_docs, write_txt_folder

STEPS = 5
OVERRIDES = (
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.ffn_hidden_size=64",
    "model.num_experts=64",
    "model.top_k=4",
    "data.seq_len=16",
    "data.micro_batch_size=2",
    "data.global_batch_size=8",
    "trainer.device=cpu",
    "trainer.precision=fp32",
    "trainer.max_steps=10",
    "optim.warmup_steps=1",
    "optim.lr=0.01",
    "checkpoint.save_final=false",
    "logging=disabled",
)


def train_losses(data_dir: Path, run_dir: Path, out: Path, num_workers: int) -> None:
    """On every rank: build the Trainer, run STEPS training steps, save rank 0's losses."""
    from megatron.core import parallel_state

    from omnimoe_train.distributed import init_runtime
    from omnimoe_train.trainer import Trainer
    from tests.train.conftest import compose_config

    cfg = compose_config(*OVERRIDES, f"data.dir={data_dir}", f"data.num_workers={num_workers}")
    rt = init_runtime(cfg)
    trainer = Trainer(cfg, rt, run_dir)
    losses = []
    for _ in range(STEPS):
        losses.append(trainer.train_step().loss)  # the global mean loss of the step
    if rt.rank == 0:
        torch.save({"losses": losses, "data": trainer.train_loader.state_dict()}, out)
    parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("curve")
    corpus = write_txt_folder(root / "corpus", make_docs(120, words=60))
    prepare([corpus], root / "data", vocab_size=300, seq_len=16, val_fraction=0.1, progress=False)
    return root / "data"


@pytest.mark.slow
def test_two_rank_loss_curve_equals_one_rank(data_dir: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run_distributed(train_losses, 1, data_dir, tmp_path / "run1", one, 0, timeout_s=300)
    run_distributed(train_losses, 2, data_dir, tmp_path / "run2", two, 2, timeout_s=300)
    a, b = torch.load(one), torch.load(two)
    assert a["data"] == b["data"]  # same position: STEPS global batches of the one order
    assert a["data"]["consumed_samples"] == STEPS * 8
    ref = torch.tensor(a["losses"], dtype=torch.float64)
    got = torch.tensor(b["losses"], dtype=torch.float64)
    error = ((got - ref).abs() / ref.abs()).max().item()
    print(f"max relative difference of the 5-step curves: {error:.2e}")
    assert error <= 1e-5, (a["losses"], b["losses"])
    assert ref[-1] < ref[0]  # it trains
