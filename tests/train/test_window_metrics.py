"""The values of a logged window in metrics.jsonl, against independent computations: the loss
is the token-weighted mean of the window's step losses (from a run logging every step), the
last step's lr and grad norm are that step's, ``tflops`` is the model's FLOPs per token (the
count ``omnimoe-params`` prints) times the logged tokens/s, and ``mfu`` that over the device's
bf16 peak."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omnimoe_data.prepare import prepare
from omnimoe_train import mfu
from omnimoe_train.model.accounting import model_accounting
from omnimoe_train.model.gpt import padded_vocab_size
from tests.cli_helpers import run_train_cli, tiny
from tests.data.helpers import make_docs, write_txt_folder
from tests.train.conftest import compose_config

STEPS = 6


def _train_records(tmp_path: Path, data: Path, log_interval: int) -> dict[int, dict]:
    run_dir = tmp_path / f"run_every_{log_interval}"
    args = tiny(
        data__max_bytes=None, data__vocab_size=None, data__val_fraction=0,
        trainer__device="cpu", trainer__max_steps=STEPS, trainer__log_interval=log_interval,
        trainer__eval_interval=100, checkpoint__save_final="false",
    )  # fmt: skip
    result = run_train_cli(
        [*args, f"data.dir={data}", f"hydra.run.dir={run_dir}"], cache=tmp_path / "cache"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.slow
def test_window_loss_and_throughput_fields(tmp_path: Path) -> None:
    corpus = write_txt_folder(tmp_path / "corpus", make_docs(200))
    data = tmp_path / "ds"
    prepare(
        [corpus], data, vocab_size=300, seq_len=32, samples_per_shard=16, val_fraction=0.0,
        progress=False,
    )  # fmt: skip
    every = _train_records(tmp_path, data, 1)
    windows = _train_records(tmp_path, data, 3)
    assert sorted(every) == list(range(1, STEPS + 1)) and sorted(windows) == [3, 6]
    tokens_per_step = 4 * 32  # global batch x seq_len: every step the same token count
    for end, record in windows.items():
        steps = range(end - 2, end + 1)
        mean = sum(every[s]["loss"] * tokens_per_step for s in steps) / (3 * tokens_per_step)
        assert record["loss"] == pytest.approx(mean, rel=1e-6), (end, record["loss"], mean)
        assert record["loss"] != pytest.approx(every[end]["loss"], rel=1e-6)  # not the last step
        for key in ("lr", "grad_norm"):
            assert record[key] == pytest.approx(every[end][key], rel=1e-6), key
        assert record["consumed_tokens"] == end * tokens_per_step

    cfg = compose_config(*tiny(data__max_bytes=None, data__vocab_size=None))
    flops = model_accounting(
        cfg.model, seq_len=cfg.data.seq_len, vocab_size=padded_vocab_size(300, 1)
    ).flops_per_token
    for record in [*every.values(), *windows.values()]:
        assert record["tokens_per_s"] > 0
        expected = flops * record["tokens_per_s"] / 1e12  # one process: the whole rate
        assert record["tflops"] == pytest.approx(expected, rel=1e-9)
        assert "mfu" not in record  # the CPU has no bf16 peak


def test_mfu_is_tflops_per_device_over_the_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU in the table: tflops per device over its bf16 peak (H200: 989.4 TFLOP/s)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    record = mfu.throughput_metrics(
        1.5e9, 4e5, world_size=4, device=torch.device("cuda", 0)
    )  # 1.5e9 x 4e5 / 4 = 150 TFLOP/s per device
    assert record["tflops"] == pytest.approx(150.0)
    assert record["mfu"] == pytest.approx(150.0 / 989.4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Accelerator")
    record = mfu.throughput_metrics(1.5e9, 4e5, world_size=4, device=torch.device("cuda", 0))
    assert record == {"tflops": pytest.approx(150.0)}  # no peak known: no mfu
