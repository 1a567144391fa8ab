"""Where one OmniMoE layer's time goes, forward and backward, on one GPU.

Each stage of ``OmniMoEMLP.forward`` is timed on its own (median of CUDA-graph-free
``triton.testing.do_bench`` runs, L2 left warm as in training, bf16 activations, the model's own
modules and parameters), forward and backward separately; the expert backward is split into the
weight-gradient kernels and the rest with ``torch.profiler`` (CUDA time by kernel name). The last
rows time the whole layer as the trainer runs it, so the sum of the stages shows what is left
over (launch gaps, allocator). Stages:

    router gates   x @ gates (fp32), BatchNorm (batch statistics), log-softmax, both halves:
                   the fused node (``model/router_gates.py``: on the GPU its Triton kernels,
                   ``omnimoe_kernels.router_gates``); also timed as PyTorch ops
    top-K          omnimoe_kernels.cartesian_topk (exact top-K of row_i + col_j)
    weights        softmax over the K selected scores (paper Eq. 2)
    expert fwd     omnimoe_kernels.atomic_experts forward (sort, pair scores, combine)
    expert bwd     its backward without the weight gradients (da, dw, g, dx)
    weight grads   dU, dV (the segmented-reduction kernel and the zero rows; or, where the
                   layer takes the dense path, ``experts_dense_grad.dense_table_grads`` timed
                   on its own: its sort, scatter and GEMM kernels share names with others)
    shared SwiGLU  megatron's MLP (fc1, SwiGLU, fc2)
    statistics     forward: the entropies' sum (ExpertStats.add_entropy); backward: the usage
                   counts off the expert backward's sort (omnimoe_kernels.usage_counts)

    python benchmarks/profile_layer.py --json layer.json                    # a80m's layer
    python benchmarks/profile_layer.py model=a200m data.micro_batch_size=8  # any overrides
    python benchmarks/profile_layer.py --grad-path pairs                    # force one path
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from runs import compose, device_name, markdown_table  # the script's folder is on sys.path
from triton.testing import do_bench

import omnimoe_kernels
from omnimoe_kernels import experts_dense_grad
from omnimoe_kernels.usage_counts import add_pair_counts

WEIGHT_GRAD_KERNELS = ("_pair_block_grad", "_zero_rows")


def ms(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def backward_ms(make_out: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> float:
    """Median ms of the backward alone: the forward runs outside the timed region."""
    outs = [make_out() for _ in range(3)]
    grads = [torch.randn_like(o) for o in outs]
    state = {"i": 0}

    def step() -> None:
        i = state["i"] % len(outs)
        state["i"] += 1
        torch.autograd.grad(outs[i], inputs, grads[i], retain_graph=True)

    return ms(step)


def kernel_split(fn: Callable[[], object], names: tuple[str, ...]) -> tuple[float, float]:
    """(CUDA ms of kernels whose name contains one of ``names``, CUDA ms of the others)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    hit = rest = 0.0
    for evt in prof.key_averages():
        t = evt.device_time_total / 1e3 / 5  # us -> ms, per call
        if any(n in evt.key for n in names):
            hit += t
        elif evt.device_type.name == "CUDA":
            rest += t
    return hit, rest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (default model=a80m)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--grad-path", choices=("auto", "dense", "pairs"), default="auto")
    args = ap.parse_args()
    from runs import require_cuda  # the script's folder is on sys.path

    require_cuda("profile_layer.py")
    experts_dense_grad.FORCE_GRAD_PATH = None if args.grad_path == "auto" else args.grad_path
    overrides = ["model=a80m", "model.vocab_size=null", "trainer.device=cuda", *args.overrides]
    cfg = compose(overrides)

    from omnimoe_train.distributed import init_runtime
    from omnimoe_train.model.gpt import omnimoe_settings, transformer_config
    from omnimoe_train.model.omnimoe_layer import OmniMoEMLP
    from omnimoe_train.model.router import gate_log_probs

    init_runtime(cfg)
    tconfig = transformer_config(cfg, bf16=True)
    layer = OmniMoEMLP(tconfig, omnimoe_settings(cfg.model)).cuda().train()
    S, B, D = cfg.data.seq_len, cfg.data.micro_batch_size, cfg.model.hidden_size
    K = cfg.model.top_k
    hidden = torch.randn(S, B, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = hidden.detach().reshape(S * B, D).requires_grad_()
    r = layer.router

    def gates(fused: bool = True) -> list[torch.Tensor]:
        halves = [r.row_gate_nD, r.col_gate_nD]
        return gate_log_probs(x, halves, [r.row_norm, r.col_norm], fused)[0]

    rows, cols = gates()
    scores, idx = omnimoe_kernels.cartesian_topk(rows, cols, K)
    weights = torch.softmax(scores, dim=-1)
    rows_d, cols_d = rows.detach().requires_grad_(), cols.detach().requires_grad_()
    scores_d = scores.detach().requires_grad_()
    w_d = weights.detach().requires_grad_()
    tables = [x, layer.up_ND, layer.down_ND, w_d]

    def experts() -> torch.Tensor:  # with the promises the layer makes (router ids)
        return omnimoe_kernels.atomic_experts(
            x, layer.up_ND, layer.down_ND, w_d, idx, distinct_ids=True, valid_ids=True
        )

    # As in training: the forward adds the entropies (the gate kernels computed them), the
    # expert backward the usage counts off the expert sort it runs anyway (``usage_N``).
    with torch.no_grad():
        ent = -(rows.exp() * rows).sum(-1) - (cols.exp() * cols).sum(-1)
    e_P = idx.reshape(-1).to(torch.int32).sort().values

    shared_params = [hidden, *layer.shared.parameters()] if layer.shared is not None else []
    y_g = torch.randn(S * B, D, device="cuda", dtype=torch.bfloat16)
    fwd_bwd = lambda: torch.autograd.grad(experts(), tables, y_g)  # noqa: E731
    weight_grads, expert_total = kernel_split(fwd_bwd, WEIGHT_GRAD_KERNELS)
    N = cfg.model.num_experts
    path = experts_dense_grad.choose_grad_path("auto", S * B, N, D, K, x.dtype, x.device)
    if path == "dense":  # its kernels are in expert_total: time it alone, move it over
        g_h = torch.randn(2, S * B, K, device="cuda")
        weight_grads = ms(
            lambda: experts_dense_grad.dense_table_grads(
                x.detach(),
                y_g,
                idx,
                g_h[0],
                g_h[1],
                w_d.detach(),
                N,
                dtype=layer.up_ND.dtype,
                distinct_ids=True,
            )
        )
        expert_total -= weight_grads
    expert_fwd = ms(experts)
    expert_bwd = backward_ms(experts, tables)

    def gates_ms(fused: bool) -> tuple[float, float]:
        fwd = ms(lambda: gates(fused))
        return fwd, backward_ms(lambda: sum(t.sum() for t in gates(fused)), [x])

    stages = {
        "router gates": gates_ms(fused=True),
        "top-K": (
            ms(lambda: omnimoe_kernels.cartesian_topk(rows, cols, K)),
            backward_ms(
                lambda: omnimoe_kernels.cartesian_topk(rows_d, cols_d, K)[0], [rows_d, cols_d]
            ),
        ),
        "weights": (
            ms(lambda: torch.softmax(scores, -1)),
            backward_ms(lambda: torch.softmax(scores_d, -1), [scores_d]),
        ),
        "expert fwd": (expert_fwd, 0.0),
        "expert bwd (da, dw, g, dx)": (0.0, max(0.0, expert_bwd - weight_grads)),
        "weight grads (dU, dV)": (0.0, weight_grads),
        "shared SwiGLU": (
            (
                ms(lambda: layer.shared(hidden)),
                backward_ms(lambda: layer.shared(hidden)[0], shared_params),
            )
            if layer.shared is not None
            else (0.0, 0.0)
        ),
        "statistics": (
            ms(lambda: layer.stats.add_entropy(ent)),
            ms(lambda: add_pair_counts(layer.stats.counts_N, e_P)),
        ),
    }
    # Not part of the sum: the gates as separate PyTorch ops (the path before the fused node).
    unfused_gates = gates_ms(fused=False)
    layer_params = [hidden, *layer.parameters()]
    whole_fwd = ms(lambda: layer(hidden))
    whole_bwd = backward_ms(lambda: layer(hidden)[0], layer_params)
    total_fwd = sum(f for f, _ in stages.values())
    total_bwd = sum(b for _, b in stages.values())
    rows_md = [[name, f"{f:.3f}", f"{b:.3f}", f"{f + b:.3f}"] for name, (f, b) in stages.items()]
    rows_md.append(
        ["sum of stages", f"{total_fwd:.3f}", f"{total_bwd:.3f}", f"{total_fwd + total_bwd:.3f}"]
    )
    rows_md.append(
        ["whole layer", f"{whole_fwd:.3f}", f"{whole_bwd:.3f}", f"{whole_fwd + whole_bwd:.3f}"]
    )
    f, b = unfused_gates
    rows_md.append(["(router gates as PyTorch ops)", f"{f:.3f}", f"{b:.3f}", f"{f + b:.3f}"])
    table = markdown_table(["stage", "fwd ms", "bwd ms", "total ms"], rows_md)
    print(f"{device_name()}, T={S * B}, D={D}, N={N}, K={K}, bf16, weight grads: {path}")
    print(table)
    print(f"(expert fwd+bwd kernels by profiler: {expert_total + weight_grads:.3f} ms)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": device_name(),
                    "date": time.strftime("%Y-%m-%d"),
                    "command": " ".join(sys.argv),
                    "shape": {"T": S * B, "D": D, "N": N, "K": K},
                    "grad_path": path,
                    "stages_ms": {k: {"fwd": f, "bwd": b} for k, (f, b) in stages.items()},
                    "whole_layer_ms": {"fwd": whole_fwd, "bwd": whole_bwd},
                    "router_gates_pytorch_ops_ms": dict(zip(("fwd", "bwd"), unfused_gates)),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
