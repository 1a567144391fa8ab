"""Why a CUDA-graph capture of the MLPs fails or holds inside a DDP-wrapped GPT (one GPU).

Each case builds the tiny test GPT (two layers), wraps it in megatron's DDP (or not), routes
its MLPs through ``model.cuda_graphs.graph_mlps`` and trains three micro-batches; one line per
case: OK with the last loss, or the error. Each case runs in its own process (a failed capture
leaves the CUDA context unusable).

    python benchmarks/diag_cuda_graphs.py            # all cases
    python benchmarks/diag_cuda_graphs.py omnimoe:ddp  # one case, in this process

Without a visible GPU, or with an unknown case, it says so in one line (exit code 2) before
any case runs.

Measured on an H200 (torch 2.11): DDP built on the default stream fails
(``operation failed due to a previous error during capture``), plain and DDP built under
``graph_safe_stream`` hold, for the dense and the OmniMoE MLP alike.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from omnimoe_train.exit_codes import exit_usage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny test model's config lives in tests/

CASES = (
    "dense:plain",
    "dense:ddp",
    "dense:ddp_side",
    "omnimoe:plain",
    "omnimoe:ddp",
    "omnimoe:ddp_side",
)


def run_case(mlp: str, wrap: str) -> str:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from omnimoe_train.distributed import init_runtime
    from omnimoe_train.model.cuda_graphs import graph_mlps, graph_safe_stream
    from omnimoe_train.model.gpt import build_model, transformer_config
    from tests.train.conftest import TINY_MODEL, compose_config

    vocab, batch, seq = 128, 3, 16
    init_runtime(compose_config("trainer.device=cuda"))
    cfg = compose_config(*TINY_MODEL, "trainer.device=cuda", f"model.mlp={mlp}")
    tconfig = transformer_config(cfg, bf16=True)
    torch.manual_seed(0)
    model = build_model(cfg, tconfig, vocab_size=vocab).cuda()
    if wrap != "plain":
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        with graph_safe_stream(wrap == "ddp_side"):
            model = DistributedDataParallel(tconfig, ddp_config, model)
    model.train()
    graphed = graph_mlps(model)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device="cuda")
    position = torch.arange(seq, device="cuda").expand(batch, seq)
    for _ in range(3):
        loss = model(tokens[:, :-1], position, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
    torch.cuda.synchronize()
    return f"OK ({graphed} MLPs graphed, loss {float(loss):.4f})"


def main() -> None:
    # Usage errors first, in one line: otherwise every case process fails on its own and
    # prints a "FAILED" line that reads like a failed capture.
    if len(sys.argv) > 2 or (len(sys.argv) == 2 and sys.argv[1] not in CASES):
        exit_usage("diag_cuda_graphs", f"takes no argument or one case of {', '.join(CASES)}")
    if not torch.cuda.is_available():
        exit_usage("diag_cuda_graphs", "captures CUDA graphs: needs a CUDA GPU, none is visible")
    if len(sys.argv) == 2:  # one case, in this process
        mlp, wrap = sys.argv[1].split(":")
        try:
            print(run_case(mlp, wrap))
        except Exception as error:  # noqa: BLE001 -- the diagnosis is the error itself
            print(f"FAILED {type(error).__name__}: {str(error).splitlines()[0][:160]}")
        return
    for case in CASES:
        result = subprocess.run(
            [sys.executable, __file__, case], capture_output=True, text=True, cwd=ROOT
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith(("OK", "FAILED"))]
        print(f"{case:18s} {lines[-1] if lines else 'no result: ' + result.stderr[-300:]}")


if __name__ == "__main__":
    main()
