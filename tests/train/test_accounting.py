"""Parameter and FLOP accounting: the paper scales, the meta build against the real model, FLOPs
by hand, ``omnimoe-params`` and the MFU device table."""

from __future__ import annotations

import json

import pytest
import torch

from omnimoe_train.mfu import peak_tflops, throughput_metrics
from omnimoe_train.model.accounting import build_meta_model, model_accounting
from omnimoe_train.model.gpt import build_model, transformer_config
from omnimoe_train.params_cli import main as params_main
from omnimoe_train.validation import ConfigError, validate
from tests.train.conftest import compose_config

# Paper Table B: total / active parameters (active without the embedding and output layer).
PAPER = {
    "a80m": (280e6, 80e6),
    "a200m": (800e6, 200e6),
    "a680m": (2.7e9, 680e6),
    "a1_7b": (6.4e9, 1.7e9),
}
BASELINES = ("dense", "gshard", "deepseekmoe", "pkm", "peer")


def _accounting(model: str):  # noqa: ANN202
    cfg = compose_config(f"model={model}")
    return cfg, model_accounting(cfg.model, seq_len=cfg.data.seq_len, vocab_size=128256)


@pytest.mark.parametrize("scale", list(PAPER))
def test_paper_scale_and_its_matched_baselines(scale: str) -> None:
    total, active = PAPER[scale]
    cfg, omni = _accounting(scale)
    assert cfg.model.vocab_size == 128256 and cfg.model.mlp == "omnimoe"
    assert abs(omni.total_params / total - 1) <= 0.05, omni.total_params
    assert abs(omni.active_params / active - 1) <= 0.05, omni.active_params
    for mlp in BASELINES:
        cfg, acc = _accounting(f"{scale}_{mlp}")
        assert cfg.model.mlp == mlp and cfg.model.name == scale
        # Equal active parameters (within the granularity of the widths).
        assert abs(acc.active_params / omni.active_params - 1) <= 0.01, (mlp, acc.active_params)
        assert abs(acc.active_params / active - 1) <= 0.05, (mlp, acc.active_params)
        if mlp in ("pkm", "peer"):
            assert abs(acc.total_params / omni.total_params - 1) <= 0.01, (mlp, acc.total_params)
        elif mlp != "dense":  # an even whole number of GShard experts: within 10%
            assert abs(acc.total_params / omni.total_params - 1) <= 0.10, (mlp, acc.total_params)


def test_paper_training_setups() -> None:
    expected = {
        "a80m": (128, 3e-3),
        "a200m": (192, 2e-3),
        "a680m": (384, 1e-3),
        "a1_7b": (1024, 1e-3),
    }
    for scale, (sequences, lr) in expected.items():
        cfg = compose_config(f"model={scale}_peer")
        assert cfg.data.global_batch_size == sequences and cfg.data.seq_len == 1024
        assert cfg.optim.lr == lr
        assert cfg.optim.warmup_steps == cfg.trainer.max_steps // 100


TINY = (
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=48",
    "model.num_experts=64",
    "model.top_k=8",
    "model.pkm_heads=2",
    "model.pkm_key_dim=16",
    "model.peer_heads=2",
    "model.peer_key_dim=16",
    "model.moe_num_experts=4",
    "model.moe_ffn_hidden_size=24",
    "model.moe_shared_ffn_hidden_size=16",
    "data.seq_len=16",
)


@pytest.mark.parametrize("mlp", ["omnimoe", "dense", "gshard", "deepseekmoe", "pkm", "peer"])
@pytest.mark.parametrize("tied", [True, False])
def test_meta_build_has_the_real_models_parameters(single_rank: None, mlp: str, tied: bool) -> None:
    cfg = compose_config(*TINY, f"model.mlp={mlp}", f"model.tie_embeddings={tied}")
    real = build_model(cfg, transformer_config(cfg, bf16=False), vocab_size=256)
    meta = build_meta_model(cfg.model, seq_len=16, vocab_size=256)
    shapes = {n: tuple(p.shape) for n, p in real.named_parameters()}
    assert {n: tuple(p.shape) for n, p in meta.named_parameters()} == shapes
    assert all(p.device.type == "meta" for p in meta.parameters())
    rng = torch.get_rng_state()
    acc = model_accounting(cfg.model, seq_len=16, vocab_size=256)
    assert torch.equal(torch.get_rng_state(), rng)  # counting leaves the run's stream alone
    assert acc.total_params == sum(p.numel() for p in real.parameters())
    assert acc.embedding_params == 256 * 32 * (1 if tied else 2)


def test_flops_by_hand() -> None:
    L, d, F, V, S, N, K = 2, 32, 48, 256, 16, 64, 8
    attention = d * (d + 2 * 2 * 8) + d * d  # qkv (GQA: 2 groups of head dim 8) + output
    dense = model_accounting(
        compose_config(*TINY, "model.mlp=dense").model, seq_len=S, vocab_size=V
    )
    macs = L * (attention + 3 * d * F) + V * d
    assert dense.active_matmul_params == macs
    assert dense.active_params == L * (attention + 3 * d * F + 2 * d) + d  # + norms
    assert dense.flops_per_token == 6 * macs + 12 * L * d * S
    omni = model_accounting(compose_config(*TINY).model, seq_len=S, vocab_size=V)
    router = 2 * 8 * d  # two gates of n = 8
    assert omni.active_matmul_params == L * (attention + 3 * d * F + router + 2 * K * d) + V * d
    assert omni.total_params == dense.total_params + L * (router + 2 * N * d)
    # PEER's product keys are read by each of its 2 heads.
    peer = model_accounting(compose_config(*TINY, "model.mlp=peer").model, seq_len=S, vocab_size=V)
    keys, query = 8 * 16, 2 * 16 * d
    assert (
        peer.active_matmul_params
        == L * (attention + 3 * d * F + query + 2 * keys + 2 * K * d) + V * d
    )


def test_omnimoe_params_prints_a_table_then_one_json_line(capsys: pytest.CaptureFixture) -> None:
    params_main(["model=a80m_gshard", "model.moe_top_k=1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("routed experts" in line for line in lines[:-1])
    summary = json.loads(lines[-1])
    cfg = compose_config("model=a80m_gshard", "model.moe_top_k=1")
    expected = model_accounting(cfg.model, seq_len=1024, vocab_size=128256)
    assert summary["total_params"] == expected.total_params
    assert summary["active_params"] == expected.active_params
    assert summary["flops_per_token"] == expected.flops_per_token
    with pytest.raises(SystemExit) as exit_info:
        params_main(["model.mlp=gshard", "model.moe_top_k=9"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "omnimoe-params: error: model.moe_top_k: must be in [1, model.moe_num_experts=8] (got 9)"
    ]


def test_omnimoe_params_counts_a_gpu_config_on_a_machine_without_one(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rules about the machine the check runs on (a visible GPU, Liger's Triton kernels) are
    omnimoe-train's, not the counter's; rules about the config itself still hold."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    params_main(["model=a80m"])
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    gpu_only = ["trainer.compile=layers", "model.fused_cross_entropy=liger", "trainer.device=cuda"]
    for override in [*gpu_only, " ".join(gpu_only)]:
        params_main(["model=a80m", *override.split()])
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == expected, override
    for override, rule in (
        ("trainer.device=cpu", "trainer.compile: layers compiles for CUDA only"),
        ("parallel.tp=2", "trainer.compile: needs parallel.tp=1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            params_main(["model=a80m", "trainer.compile=layers", override])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"omnimoe-params: error: {rule}"), err


def test_omnimoe_params_skips_the_batch_rules_but_not_the_layout_rules(
    capsys: pytest.CaptureFixture,
) -> None:
    """Counting parameters needs no batch: the default global batch (16 = one micro-batch of 16)
    does not split over ep2_rows's two data-parallel ranks, which omnimoe-train refuses, yet
    the count is printed (and equals the single-rank one). Layout rules still hold."""
    with pytest.raises(ConfigError, match=r"^data\.global_batch_size: must be a multiple"):
        validate(compose_config("parallel=ep2_rows"), world_size=2)
    params_main(["parallel=ep2_rows"])
    ep2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    params_main([])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == ep2
    with pytest.raises(SystemExit) as exit_info:
        params_main(["parallel=ep2_rows", "model.num_experts=9"])  # 3 rows over 2 ranks
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "omnimoe-params: error: parallel.ep: invalid parallel layout: rows sharding"
    ), err


def test_device_peaks_and_mfu_fields() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA GH200 480GB") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA A10") == 125.0
    assert peak_tflops("NVIDIA L40S") == 362.1
    assert peak_tflops("Some Accelerator") is None
    record = throughput_metrics(2e9, 1e5, world_size=2, device=torch.device("cpu"))
    assert record == {"tflops": pytest.approx(100.0)}  # per device; no mfu on the CPU


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_omnimoe_params_help_prints_the_usage_and_exits_0(
    capsys: pytest.CaptureFixture, flag: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        params_main(["model=a80m", flag])
    assert exit_info.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: omnimoe-params [key=value ...]") and err == ""
    with pytest.raises(SystemExit) as exit_info:  # any other option is still refused
        params_main(["--json"])
    assert exit_info.value.code == 2
