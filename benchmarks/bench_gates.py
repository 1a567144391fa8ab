"""The router's gate scores alone (``bench_kernels.py --only gates``): PyTorch ops, the PyTorch
node, the Triton kernels with split-bf16 and with fp32 GEMMs, forward and backward, at a80m's
shape and at n = 1024, d = 2048; and how far the two GEMM modes' outputs are apart
(``gate_gemm_diffs``, which also runs on CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

import omnimoe_kernels
import omnimoe_kernels.gate_gemms as gate_gemms

GATE_CONFIGS = [(16384, 768, 76), (16384, 2048, 1024)]  # T, d, n (a80m; a large router)


def _gate_gemm(mode: str, fn):
    """``fn`` run with ``gate_gemms.GATE_GEMM = mode`` at every gate width (no
    ``SPLIT_MIN_SCORES``: both modes are timed everywhere; the node's backward follows the mode
    its forward ran with, so timing a backward needs only the forward under the mode)."""

    def run():
        saved = gate_gemms.GATE_GEMM, gate_gemms.SPLIT_MIN_SCORES
        gate_gemms.GATE_GEMM, gate_gemms.SPLIT_MIN_SCORES = mode, 0
        try:
            return fn()
        finally:
            gate_gemms.GATE_GEMM, gate_gemms.SPLIT_MIN_SCORES = saved

    return run


def gate_gemm_diffs(x, gates, dys) -> dict:
    """Max |split - fp32| of the router-gates node's log-probabilities, dx and gate gradients
    between its split-bf16 GEMMs and its fp32 GEMMs (``gate_gemms.GATE_GEMM``), and the max of
    |fp32 GEMMs| of each for scale. Any device the node runs on (CPU: TRITON_INTERPRET=1)."""
    from omnimoe_train.model import router_gates

    got = {}
    for mode in gate_gemms.GATE_GEMMS:
        xg = x.detach().clone().requires_grad_()
        gs = [g.detach().clone().requires_grad_() for g in gates]
        logp = _gate_gemm(mode, lambda xg=xg, gs=gs: router_gates.gate_log_probs(
            xg, gs, stats="batch", backend="triton"
        ))()[0]  # fmt: skip
        grads = torch.autograd.grad(logp, [xg, *gs], dys)
        got[mode] = {"logp": torch.stack(logp), "dx": grads[0], "dgates": torch.stack(grads[1:])}
    row = {}
    for key, fp32 in got["fp32"].items():
        diff = (got["split_bf16"][key].float() - fp32.float()).abs().max().item()
        row[f"split_vs_fp32_max_abs_{key}"] = diff
        row[f"fp32_max_abs_{key}"] = fp32.float().abs().max().item()
    return row


def bench_gates(T, d, n):
    """Router gate scores (2 gates, batch statistics, bf16 x), forward and backward ms: as
    PyTorch ops (``reference.gate_log_probs_reference``), the PyTorch node
    (``router_gates.gate_log_probs`` on backend="torch": the path before the kernels) and the
    Triton kernels (backend="triton") with their GEMMs on split bf16 operands ("triton") and as
    fp32 SGEMMs ("triton_fp32_gemm"; ``gate_gemms.GATE_GEMM``). Timed without CUDA graphs:
    launch latency is part of what the kernels remove. The kernels' outputs are checked against
    the PyTorch node, and the split GEMMs' against the fp32 ones (``gate_gemm_diffs``)."""
    from omnimoe_train.model import router_gates

    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gates = [(torch.randn(n, d, device="cuda") * 0.02).requires_grad_() for _ in range(2)]
    inputs = [x, *gates]

    def kernels():
        return router_gates.gate_log_probs(x, gates, stats="batch", backend="triton")[0]

    paths = {
        "pytorch_ops": lambda: omnimoe_kernels.gate_log_probs_reference(x, gates, "batch")[0],
        "pytorch_node": lambda: router_gates.gate_log_probs(
            x, gates, stats="batch", backend="torch"
        )[0],
        "triton": _gate_gemm("split_bf16", kernels),
        "triton_fp32_gemm": _gate_gemm("fp32", kernels),
    }
    row = {"T": T, "d": d, "n": n}
    dys = [torch.randn(T, n, device="cuda") for _ in range(2)]
    for name, fn in paths.items():
        row[f"{name}_fwd_ms"] = do_bench(fn, warmup=10, rep=100, return_mode="median")
        outs = fn()
        row[f"{name}_bwd_ms"] = do_bench(
            lambda outs=outs: torch.autograd.grad(outs, inputs, dys, retain_graph=True),
            warmup=10,
            rep=100,
            return_mode="median",
        )
    ref, got = paths["pytorch_node"](), paths["triton"]()
    row["max_abs_diff_logp"] = max((a - b).abs().max().item() for a, b in zip(ref, got))
    row.update(gate_gemm_diffs(x, gates, dys))
    return row


def _fmt(v: float | None, nd: int = 3) -> str:
    return "OOM" if v is None else f"{v:.{nd}f}"


def print_gates(rows: list[dict]) -> None:
    """The timings and the split-vs-fp32 differences as markdown tables."""
    print(
        "\n| router gates T, d, n (G=2) | path | fwd ms | bwd ms | total ms |\n|---|---|---|---|---|"
    )
    for r in rows:
        for path in ("pytorch_ops", "pytorch_node", "triton", "triton_fp32_gemm"):
            f, b = r[f"{path}_fwd_ms"], r[f"{path}_bwd_ms"]
            print(
                f"| {r['T']}, {r['d']}, {r['n']} | {path} | {_fmt(f)} | {_fmt(b)} | {_fmt(f + b)} |"
            )
    print(
        "\n| router gates T, d, n | max abs split - fp32 GEMMs (max abs fp32): logp | dx | dgates |"
    )
    print("|---|---|---|---|")
    for r in rows:
        cells = [
            f"{r[f'split_vs_fp32_max_abs_{k}']:.2e} ({r[f'fp32_max_abs_{k}']:.2e})"
            for k in ("logp", "dx", "dgates")
        ]
        print(f"| {r['T']}, {r['d']}, {r['n']} | " + " | ".join(cells) + " |")
