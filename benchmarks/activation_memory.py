"""What one MLP layer keeps for its backward, and what its backward allocates: the OmniMoE layer
against the dense MLP of equal active parameters (issue 13, peak memory target), on the CPU.

    python benchmarks/activation_memory.py                      # a80m, Triton interpreter
    python benchmarks/activation_memory.py --tokens 256 --json mem.json
    python benchmarks/activation_memory.py --backend torch      # the PyTorch reference path

Three parts:

saved for backward
    The layer (``OmniMoEMLP``, the trainer's, and megatron's ``MLP`` of width
    ``bench_training.dense_width``) runs one training forward on ``--tokens`` tokens (bf16, as
    the trainer) under ``torch.autograd.graph.saved_tensors_hooks``. Every tensor packed for the
    backward is listed with its shape, dtype, bytes, the stage that saved it (router gates,
    top-K, routing weights, experts, shared SwiGLU; from the Python stack at packing time) and
    the autograd node and slot holding it (from a walk of the graph). Tensors sharing a storage
    count once (the storage's bytes); parameters and the layer input (the pre-MLP norm's
    output, alive in both models) are listed but not counted. Bytes are scaled from
    ``--tokens`` to the micro-batch (``seq_len * micro_batch_size``, a80m: 16,384) for
    tensors whose leading dimension follows the token count (every activation here; found by
    a second forward on one token more, see ``layer_rows``).
    ``--backend triton`` (default) runs the Triton kernels through Triton's CPU interpreter,
    so the autograd functions are the GPU's (``AtomicExperts``, ``CartesianTopK``, the fused
    router gates) and save exactly what they save on the GPU; ``--backend torch`` runs the
    reference path the model takes on a CPU without the interpreter (it saves more).
backward transient
    The backward of the same forward under ``torch.profiler`` (``profile_memory``): the peak of
    live CPU bytes above the level at the start of the backward, and its largest allocations
    with the op that made them, at the token count run (not scaled: the parameter gradients in
    it do not grow with T, and the CPU GEMMs make fp32 copies the GPU does not). On the CPU the weight-gradient path is the pair kernel
    (``experts_dense_grad.choose_grad_path`` takes the dense GEMMs on CUDA bf16 only); the
    dense path's GPU buffers are computed from its shapes in the "dense weight-gradient path"
    rows (``dense_grad_buffers``).
static state
    Parameters, gradients and optimizer state of the whole model per parameter with megatron's
    bf16 mixed precision as the engine configures it (``grad_reduce_in_fp32``, fp32 master
    copies, AdamW): 2 + 4 + 4 + 8 = 18 bytes per bf16 parameter, 4 + 4 + 8 = 16 per fp32 one
    (the router gates), counted on the meta model (``model.accounting.build_meta_model``).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path


def layer_rows(layer, hidden_SBD, swiglu: str, micro: int):  # noqa: ANN001, ANN201
    """(output, rows) of one forward of ``layer`` on ``hidden_SBD`` ([T, 1, D]): the saved
    tensors with bytes scaled from T to ``micro`` tokens for the activations.

    A tensor is an activation when its leading dimension follows the token count: a second
    forward on T + 1 tokens (its graph dropped) saves the same tensors in the same order, and
    those whose leading dimension changed are scaled. (A leading dimension that merely is a
    multiple of T is no proof: the router's concatenated gates (2n, D) are one whenever T
    divides 2n.)"""
    import torch

    from omnimoe_train.model.saved_tensors import saved_for_backward

    tokens = hidden_SBD.shape[0] * hidden_SBD.shape[1]
    out, rows = saved_for_backward(lambda: layer(hidden_SBD)[0], layer, [hidden_SBD])
    more_SBD = torch.cat([hidden_SBD.detach(), hidden_SBD.detach()[:1]]).requires_grad_()
    _, rows_more = saved_for_backward(lambda: layer(more_SBD)[0], layer, [more_SBD])
    if len(rows_more) != len(rows):
        raise RuntimeError(f"{len(rows)} saved tensors at T={tokens}, {len(rows_more)} at T+1")
    for r, r_more in zip(rows, rows_more, strict=True):
        r.stage = swiglu if r.stage == "SwiGLU" else r.stage
        follows_tokens = r.shape[:1] != r_more.shape[:1]
        if r.note != "parameter" and follows_tokens:
            r.nbytes = r.nbytes * micro // tokens
    return out, rows


def backward_transient(out, scale: float) -> tuple[int, list[tuple[int, str]]]:  # noqa: ANN001
    """(peak live CPU bytes above the start of ``out``'s backward, scaled by ``scale``; the five
    largest allocations of the backward as (scaled bytes, op that allocated them))."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    grad = torch.randn_like(out)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out.backward(grad)
    events = prof.profiler.kineto_results.events()
    mem = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    ops = [e for e in events if e.name() != "[memory]" and e.duration_ns() > 0]
    live = peak = 0
    for e in mem:
        live += e.nbytes()
        peak = max(peak, live)

    def op_at(ns: int) -> str:
        inside = [o for o in ops if o.start_ns() <= ns <= o.end_ns()]
        return min(inside, key=lambda o: o.duration_ns()).name() if inside else "?"

    largest = sorted((e for e in mem if e.nbytes() > 0), key=lambda e: -e.nbytes())[:5]
    return int(peak * scale), [(int(e.nbytes() * scale), op_at(e.start_ns())) for e in largest]


def dense_grad_buffers(T: int, N: int, D: int, K: int) -> dict[str, int]:
    """Bytes of the large buffers ``experts_dense_grad.dense_table_grads`` allocates on the GPU
    (bf16 rows) for T tokens: the (T, 2C) bf16 coefficient matrix ([hi | lo] side by side), the
    (2C, D) fp32 GEMM product (C = chunk + 1 columns padded to 8) and its (T, K) coefficient /
    column tensors (the routers promise distinct ids: int64 columns; g, a fp32; hi, lo bf16)."""
    from omnimoe_kernels.experts_dense_grad import DENSE_MAX_BYTES, _chunk_columns

    chunk = _chunk_columns(2 * T, N, 2, DENSE_MAX_BYTES)
    cols = (chunk + 1 + 7) // 8 * 8
    return {
        "coefficient matrix (T, 2C) bf16": 2 * T * cols * 2,
        "GEMM product (2C, D) fp32": 2 * cols * D * 4,
        "pair tensors (T, K): cols int64; g, a fp32; hi, lo bf16": T * K * (8 + 2 * 4 + 2 * 2),
    }  # fmt: skip


def static_bytes(overrides: list[str]) -> dict[str, float]:
    """Parameters (millions) and bytes of parameters + gradients + AdamW state of the model."""
    import torch
    from runs import compose  # the script's folder is on sys.path

    from omnimoe_train.model.accounting import build_meta_model
    from omnimoe_train.model.gpt import padded_vocab_size

    cfg = compose(overrides)
    vocab = padded_vocab_size(cfg.model.vocab_size or cfg.data.vocab_size, cfg.parallel.tp)
    model = build_meta_model(cfg.model, seq_len=cfg.data.seq_len, vocab_size=vocab)
    fp32 = bf16 = 0
    for name, p in model.named_parameters():
        # The router gates stay fp32 in a bf16 model (``router.CartesianRouter``).
        if p.dtype == torch.float32 and ".router." in name and "gate" in name:
            fp32 += p.numel()
        else:
            bf16 += p.numel()
    return {"params_M": (fp32 + bf16) / 1e6, "bytes": 18 * bf16 + 16 * fp32}


def build_layers(overrides: list[str]):  # noqa: ANN201
    """(config, OmniMoE layer, dense MLP of equal active parameters), bf16, training mode."""
    import dataclasses

    from bench_training import dense_width
    from megatron.core.transformer.mlp import MLP
    from runs import compose

    from omnimoe_train.distributed import init_runtime
    from omnimoe_train.model.gpt import omnimoe_settings, transformer_config
    from omnimoe_train.model.omnimoe_layer import OmniMoEMLP
    from omnimoe_train.model.routed_mlp import shared_mlp_submodules

    cfg = compose(overrides)
    init_runtime(cfg)
    tconfig = transformer_config(cfg, bf16=True)
    omni = OmniMoEMLP(tconfig, omnimoe_settings(cfg.model)).train()
    width = dense_width(cfg.model.ffn_hidden_size, cfg.model.top_k)
    dense_config = dataclasses.replace(tconfig, ffn_hidden_size=width)
    dense = MLP(dense_config, shared_mlp_submodules()).train()
    return cfg, omni, dense, width


def gib(n: float) -> str:
    return f"{n / 2**30:.3f}"


def mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (default model=a80m)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens run (bytes are scaled)")
    ap.add_argument("--backend", choices=("triton", "torch"), default="triton")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.backend == "triton":  # before the kernels are imported: @triton.jit reads it
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from runs import markdown_table

    from omnimoe_train.model.saved_tensors import counted_bytes

    base = ["model=a80m", "model.vocab_size=null", "trainer.device=cpu", *args.overrides]
    backend = "triton" if args.backend == "triton" else "torch"
    cfg, omni, dense, width = build_layers([*base, f"model.expert_backend={backend}"])
    micro = cfg.data.seq_len * cfg.data.micro_batch_size
    m = cfg.model
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, 1, m.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    report = {"tokens_run": args.tokens, "micro_batch_tokens": micro, "backend": args.backend}
    table, totals, stage_rows = [], {}, []
    for label, layer, swiglu in (
        ("OmniMoE", omni, "shared SwiGLU"),
        ("dense", dense, "dense SwiGLU"),
    ):
        out, rows = layer_rows(layer, hidden, swiglu, micro)
        peak, largest = backward_transient(out, 1.0)  # not scaled: see the docstring
        totals[label] = {"saved_bytes": counted_bytes(rows), "transient_bytes": peak}
        report[label] = {"saved": [asdict(r) for r in rows], "largest_backward": largest,
                         **totals[label]}  # fmt: skip
        stages = {}
        for r in rows:
            stages[r.stage] = stages.get(r.stage, 0) + (r.nbytes if r.counted else 0)
        stage_rows += [[label, st, mb(b)] for st, b in stages.items()]
        for r in rows:
            table.append([label, r.stage, r.slots, "x".join(map(str, r.shape)), r.dtype,
                          mb(r.nbytes) if r.counted else f"({mb(r.nbytes)})", r.note])  # fmt: skip
    print(f"Saved for backward, one layer, {micro} tokens (run with {args.tokens}, scaled), "
          f"backend {args.backend}; MB = 1e6 bytes, (..) not counted\n")  # fmt: skip
    print(markdown_table(["layer", "stage", "autograd node.slot", "shape (run)", "dtype",
                          "MB", "note"], table))  # fmt: skip
    print("\n" + markdown_table(["layer", "stage", "MB saved"], stage_rows))
    N, D, K = m.num_experts, m.hidden_size, m.top_k
    dense_grad = dense_grad_buffers(micro, N, D, K)
    report["dense_grad_buffers"] = dense_grad
    print("\n" + markdown_table(["GPU dense weight-gradient path (backward)", "MB"],
                                [[k, mb(v)] for k, v in dense_grad.items()]))  # fmt: skip
    largest = [[lab, op, mb(b)] for lab in totals for b, op in report[lab]["largest_backward"]]
    print("\n" + markdown_table(["layer", "largest CPU allocations in backward, tokens run (op)", "MB"],
                                largest))  # fmt: skip
    static = {"OmniMoE": static_bytes(base), "dense": static_bytes(
        [*base, "model.mlp=dense", f"model.ffn_hidden_size={width}"])}  # fmt: skip
    report["static"] = static
    layers = m.num_layers
    per_layer = totals["OmniMoE"]["saved_bytes"] - totals["dense"]["saved_bytes"]
    summary = [
        ["parameters (M)", f"{static['OmniMoE']['params_M']:.2f}", f"{static['dense']['params_M']:.2f}", ""],
        ["params + grads + AdamW (GiB)", gib(static["OmniMoE"]["bytes"]), gib(static["dense"]["bytes"]),
         gib(static["OmniMoE"]["bytes"] - static["dense"]["bytes"])],
        ["saved per layer (MB)", mb(totals["OmniMoE"]["saved_bytes"]), mb(totals["dense"]["saved_bytes"]), mb(per_layer)],
        [f"saved, {layers} layers (GiB)", gib(layers * totals["OmniMoE"]["saved_bytes"]),
         gib(layers * totals["dense"]["saved_bytes"]), gib(layers * per_layer)],
        [f"CPU backward transient, one layer, {args.tokens} tokens (MB)", mb(totals["OmniMoE"]["transient_bytes"]),
         mb(totals["dense"]["transient_bytes"]), ""],
    ]  # fmt: skip
    diff = static["OmniMoE"]["bytes"] - static["dense"]["bytes"] + layers * per_layer
    report["predicted_peak_difference_bytes"] = diff
    print("\n" + markdown_table(["whole model, one micro-batch", "OmniMoE", f"dense ({width})",
                                 "difference"], summary))  # fmt: skip
    print(
        f"\nPredicted step-peak difference (static + {layers} layers' saved tensors; the peak "
        f"taken where every layer's activations are alive): {gib(diff)} GiB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
