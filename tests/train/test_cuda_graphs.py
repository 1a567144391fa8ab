"""``trainer.cuda_graphs=mlp`` (model/cuda_graphs.py): a graphed run trains like the eager one.

On a GPU: the same tiny OmniMoE run (two micro-batches per step, so the graphs replay within a
step and the router statistics of both reach the step's BatchNorm update; an evaluation in the
middle, eager) with and without the graphs gives the same per-step losses, held-out losses and
expert statistics. On CPU: the layout rules refuse it in one line before any work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnimoe_train.validation import ConfigError, validate
from tests.cli_helpers import run_train_cli, tiny
from tests.train.conftest import compose_config

KEYS = ("loss", "grad_norm", "expert_usage", "router_entropy", "load_imbalance")


def _train(tmp_path: Path, name: str, *extra: str, gpus: int = 1) -> list[dict]:
    run_dir = tmp_path / name
    args = tiny(
        trainer__device="cuda", trainer__precision="fp32", trainer__max_steps=6,
        trainer__eval_interval=3, data__global_batch_size=8 * gpus,
    )  # fmt: skip
    args = [*args, *extra, f"hydra.run.dir={run_dir}"]
    if gpus == 1:
        result = run_train_cli(args, cache=tmp_path / "cache", timeout=600)
    else:  # one rank per GPU, as launch/torchrun.sh starts them
        env = {**os.environ, "OMNIMOE_CACHE": str(tmp_path / "cache")}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc-per-node={gpus}", "-m", "omnimoe_train.cli", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _compare(eager: list[dict], graphed: list[dict], rel: float = 1e-5) -> None:
    """fp32: the graphs replay the eager kernels on the same values; GEMM algorithm choices
    may differ under capture, so not necessarily bitwise (``rel`` 1e-5)."""
    assert len(eager) == len(graphed)
    for a, b in zip(eager, graphed, strict=True):
        assert a.get("step") == b.get("step")
        for key in (*KEYS, "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-7), (a["step"], key)


@pytest.mark.gpu
def test_graphed_mlps_train_like_eager_gpu(tmp_path: Path) -> None:
    eager = _train(tmp_path, "eager")
    graphed = _train(tmp_path, "graphed", "trainer.cuda_graphs=mlp")
    _compare(eager, graphed)
    assert any("val_loss" in r for r in graphed)


@pytest.mark.gpu
def test_graphed_mlps_under_compiled_layers_gpu(tmp_path: Path) -> None:
    """``trainer.compile=layers`` + ``trainer.cuda_graphs=mlp``: inductor compiles the rest of
    each layer, the MLP replays its graph. Against the compiled run without graphs, whose MLP
    inductor compiles between its kernels' graph breaks (other fused float order: rel 1e-4)."""
    compiled = _train(tmp_path, "compiled", "trainer.compile=layers")
    both = _train(tmp_path, "both", "trainer.compile=layers", "trainer.cuda_graphs=mlp")
    _compare(compiled, both, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize(
    "extra",
    [
        ("parallel=ep2_rows", "parallel.ep_overlap=false"),
        ("parallel=ep2_dim", "parallel.ep_overlap=false"),
        ("parallel=ep2_rows",),  # ep_overlap null: on with the graphs, off in the eager run
        ("parallel=ep2_dim", "parallel.ep_overlap=true"),
    ],
    ids=["rows", "dim", "rows_overlap", "dim_overlap"],
)
def test_graphed_mlps_expert_parallel_gpu(tmp_path: Path, extra: tuple[str, ...]) -> None:
    """The NCCL exchanges of either sharding inside the graphs (the overlapped ones on NCCL's
    own stream, forked from and joined to the capture), and the dispatch counters, replayed."""
    eager = _train(tmp_path, "eager", *extra, gpus=2)
    graphed = _train(tmp_path, "graphed", *extra, "trainer.cuda_graphs=mlp", gpus=2)
    _compare(eager, graphed)
    assert any("dispatch_fwd_bytes_per_layer" in r for r in eager)
    for a, b in zip(eager, graphed, strict=True):
        if "dispatch_load_imbalance" in a:
            assert b["dispatch_load_imbalance"] == pytest.approx(a["dispatch_load_imbalance"])
            assert b["dispatch_fwd_bytes_per_layer"] == a["dispatch_fwd_bytes_per_layer"]
            assert b["dispatch_dest_ranks"] == pytest.approx(a["dispatch_dest_ranks"])


@pytest.mark.parametrize(
    ("overrides", "world", "rule"),
    [
        (("trainer.cuda_graphs=full",), 1, "must be one of"),
        (("trainer.engine=deepspeed",), 1, "trainer.engine=megatron"),
        (("model.mlp=peer",), 1, "omnimoe or dense"),
        (("model.mlp=gshard",), 1, "omnimoe or dense"),
        (("parallel=pp2",), 2, "parallel.pp=1"),
        (("parallel=tp2",), 2, "parallel.tp=1"),
    ],
)
def test_cuda_graphs_refuses_what_it_cannot_capture(
    monkeypatch: pytest.MonkeyPatch, overrides: tuple[str, ...], world: int, rule: str
) -> None:
    # As on a GPU machine: the CUDA rule passes, the rule under test must name the problem.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = compose_config(
        "trainer.cuda_graphs=mlp", "trainer.device=cuda", "data.global_batch_size=32", *overrides
    )
    with pytest.raises(ConfigError, match=rule) as err:
        validate(config, world_size=world)
    assert err.value.key in ("trainer.cuda_graphs", "trainer.engine") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "world"),
    [
        ((), 1),
        (("trainer.compile=layers",), 1),
        (("parallel=ep2_rows",), 2),
        (("parallel=ep2_dim",), 2),
        (("parallel=ep2_rows", "parallel.ep_overlap=true"), 2),
        (("parallel=ep2_dim", "parallel.ep_overlap=true"), 2),
        (("parallel.ep=2", "parallel.expert_table_sharding=auto"), 2),
    ],
)
def test_cuda_graphs_accepts_its_layouts(
    monkeypatch: pytest.MonkeyPatch, overrides: tuple[str, ...], world: int
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    validate(
        compose_config(
            "trainer.cuda_graphs=mlp",
            "trainer.device=cuda",
            "data.global_batch_size=32",
            *overrides,
        ),
        world_size=world,
    )


def test_cuda_graphs_without_a_gpu_is_one_line_before_any_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*tiny(trainer__device="cpu"), "trainer.cuda_graphs=mlp", f"hydra.run.dir={run_dir}"]
    result = run_train_cli(args, cache=tmp_path / "cache")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer.cuda_graphs" in lines[0] and "CUDA" in lines[0], lines
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_release_gives_the_mlps_their_eager_forward_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """``release_graphs`` (run before the process group goes) drops every group's graphs and
    restores each MLP's own ``forward``; a second call is a no-op. No capture happens here
    (that needs a GPU): the wrappers are installed as ``graph_mlps`` installs them."""
    from torch import nn

    from omnimoe_train.model import cuda_graphs

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Linear(4, 4)

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = Decoder()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda_graphs, "_LIVE", [])
    model = Model()
    assert cuda_graphs.graph_mlps(model) == 2
    mlps = [layer.mlp for layer in model.decoder.layers]
    assert all(isinstance(vars(m).get("forward"), cuda_graphs._GraphedForward) for m in mlps)
    cuda_graphs.release_graphs()
    assert cuda_graphs._LIVE == [] and all("forward" not in vars(m) for m in mlps)
    x = torch.randn(3, 4)
    assert torch.equal(mlps[0](x), nn.functional.linear(x, mlps[0].weight, mlps[0].bias))
    cuda_graphs.release_graphs()


def test_compiled_layers_break_at_the_graphed_mlp(single_rank: None) -> None:
    """``trainer.compile=layers`` with the graphs: dynamo compiles each layer around the MLP
    call, which it leaves as a graph break (``_GraphedForward.__call__`` is
    ``torch.compiler.disable``d), and the run's losses are the compiled run's. No capture on a
    CPU: each wrapper "replays" its eager core, as a graph replays the captured call."""
    from torch._dynamo.utils import counters

    from omnimoe_train.model import cuda_graphs
    from tests.train.fusion_helpers import BATCH, SEQ, sgd_losses

    def graph(model: torch.nn.Module) -> None:
        mlps = [layer.mlp for layer in model.decoder.layers]
        group = cuda_graphs._GraphGroup(model, mlps)
        group.shape = torch.Size((SEQ, BATCH, model.config.hidden_size))
        for mlp, wrapper in zip(mlps, group.wrappers, strict=True):
            wrapper.graphed = wrapper.core
            mlp.forward = wrapper

    torch._dynamo.reset()
    compiled = sgd_losses(compile_backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    graphed = sgd_losses(compile_backend="aot_eager", prepare=graph)
    breaks = " ".join(counters["graph_break"])
    assert "_GraphedForward.__call__" in breaks, breaks
    assert graphed == pytest.approx(compiled, rel=1e-6)
    assert graphed[-1] < graphed[0]
