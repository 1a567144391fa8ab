"""Per-op profile of one OmniMoE layer's experts under expert parallelism (2+ GPUs, NCCL).

Each rank routes its own T tokens with the Cartesian router, runs the atomic experts (``local``:
the full tables on one GPU, what data parallelism runs; ``rows`` / ``dim``: the sharded ops) and
the shared SwiGLU, then the backward. Reported per mode: median ms per layer step (synchronised
wall time, and the CPU time until the step's last launch returned: equal means launch-bound),
the GPU busy time while profiled (union of kernel intervals: wall well above it means the GPU
waits on the host or on the other rank), the host's self time by op, tokens/s of the group, the (token, expert) pairs per rank (max / mean), the CUDA time per
category from ``torch.profiler`` (routing, NCCL exchanges, expert kernels, sorts, copies, rest),
and the bytes the rank sent in one layer step -- counted from the tensors handed to
``torch.distributed`` (ring algorithms: an all-reduce sends 2(P-1)/P of its buffer) -- next to
``parallel.cost_model.predict_bytes`` for the mode and what ``auto`` would choose.

    torchrun --standalone --nproc-per-node 2 benchmarks/profile_expert_parallel.py \\
        --modes local,rows,rows_overlap,dim,dim_overlap --json ep_profile.json

``rows_overlap`` / ``dim_overlap`` run the sharded ops as the layer does with
``parallel.ep_overlap=true`` (token exchange issued before routing, y finished after the shared
SwiGLU); ``rows`` / ``dim`` as with ``parallel.ep_overlap=false``.

Defaults are a80m's layer at the benchmark batch (16 x 1024 tokens per GPU, d = 768,
N = 76^2, K = 64, bf16). ``--cuda-graph`` replays each mode's layer step (forward, backward,
collectives) from one CUDA graph, as ``trainer.cuda_graphs=mlp`` does: the GPU's time without
the host's. ``--dense-max-mib`` sets the dense weight-gradient buffer's cap, ``--grad-coef``
its coefficients (``model.expert_grad_coef``). ``--skew`` (with
``--router-norm none``) biases every token's router input the same way, so routing
concentrates on a few router rows (uneven load for rows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from profile_measures import WireBytes, categorize, gpu_busy_ms  # the script's folder

import omnimoe_kernels
from omnimoe_train.exit_codes import exit_usage
from omnimoe_train.model.router import CartesianRouter
from omnimoe_train.parallel.cost_model import choose_sharding, predict_bytes
from omnimoe_train.parallel.dim_sharding import (
    dim_experts_overlapped,
    sharded_atomic_experts_dim,
    start_dim_tokens,
)
from omnimoe_train.parallel.rows_dispatch import (
    rows_experts_overlapped,
    sharded_atomic_experts_rows,
    start_rows_tokens,
)

# mode -> (table shard of the full (N, D) tables, op(x, up, down, w, idx) -> y)
Shard = Callable[[torch.Tensor, int, int], torch.Tensor]
MODES: dict[str, tuple[Shard, Callable[..., torch.Tensor]]] = {}


def register(name: str, shard: Shard, op: Callable[..., torch.Tensor]) -> None:
    MODES[name] = (shard, op)


def _rows_shard(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return t.chunk(size, 0)[rank]


def _dim_shard(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return t.chunk(size, 1)[rank]


def _local(x, up, down, w, idx):  # noqa: ANN001, ANN202
    # distinct_ids (and ascending_ids for rows): the Cartesian router's promises, which the
    # layer passes on to the kernels
    return omnimoe_kernels.atomic_experts(x, up, down, w, idx, distinct_ids=True)


def _rows(x, up, down, w, idx):  # noqa: ANN001, ANN202
    size = dist.get_world_size()
    n = up.shape[0] * size
    tokens = [x.shape[0]] * size
    return sharded_atomic_experts_rows(
        x, up, down, w, idx, group=None, num_experts=n, group_tokens=tokens, distinct_ids=True,
        ascending_ids=True,
    )[0]  # fmt: skip


def _dim(x, up, down, w, idx):  # noqa: ANN001, ANN202
    tokens = [x.shape[0]] * dist.get_world_size()
    return sharded_atomic_experts_dim(
        x, up, down, w, idx, group=None, group_tokens=tokens, distinct_ids=True
    )[0]


register("local", lambda t, r, s: t, _local)
register("rows", _rows_shard, _rows)
register("dim", _dim_shard, _dim)


def _start_rows(x):  # noqa: ANN001, ANN202
    return start_rows_tokens(x, group=None, group_tokens=[x.shape[0]] * dist.get_world_size())


def _start_dim(x):  # noqa: ANN001, ANN202
    return start_dim_tokens(x, group=None, group_tokens=[x.shape[0]] * dist.get_world_size())


def _rows_overlapped(early, up, down, w, idx):  # noqa: ANN001, ANN202
    n = up.shape[0] * dist.get_world_size()
    return rows_experts_overlapped(
        early, up, down, w, idx, num_experts=n, distinct_ids=True, ascending_ids=True
    )[0]


def _dim_overlapped(early, up, down, w, idx):  # noqa: ANN001, ANN202
    return dim_experts_overlapped(early, up, down, w, idx, distinct_ids=True)[0]


# ``parallel.ep_overlap``: mode -> (sharding mode, start(x) before routing, op(early, ...) ->
# y in flight, finished after the shared SwiGLU), as the layer runs them.
OVERLAPPED: dict[str, tuple[str, Callable, Callable]] = {
    "rows_overlap": ("rows", _start_rows, _rows_overlapped),
    "dim_overlap": ("dim", _start_dim, _dim_overlapped),
}


def run_mode(mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    rank, size = dist.get_rank(), dist.get_world_size()
    T, D, N, K, F_ = args.tokens, args.hidden, args.experts, args.top_k, args.ffn
    gen = torch.Generator(device=device).manual_seed(0)  # same tables on every rank
    up = (torch.randn(N, D, generator=gen, device=device) * 0.02).bfloat16()
    down = (torch.randn(N, D, generator=gen, device=device) * 0.02).bfloat16()
    sharding = OVERLAPPED[mode][0] if mode in OVERLAPPED else mode
    shard, op = MODES[sharding]
    start_tokens = OVERLAPPED[mode][1] if mode in OVERLAPPED else None
    if start_tokens is not None:
        op = OVERLAPPED[mode][2]
    up = shard(up, rank, size).clone().requires_grad_()
    down = shard(down, rank, size).clone().requires_grad_()
    torch.manual_seed(1)
    router = CartesianRouter(D, N, K, norm=args.router_norm).to(device)
    fc1 = (torch.randn(2 * F_, D, device=device) * 0.02).bfloat16().requires_grad_()
    fc2 = (torch.randn(D, F_, device=device) * 0.02).bfloat16().requires_grad_()
    torch.manual_seed(100 + rank)  # each rank its own tokens
    bias = torch.randn(D, generator=torch.Generator().manual_seed(7)).to(device) * args.skew
    x = (torch.randn(T, D, device=device) + bias).bfloat16().requires_grad_()
    gy = torch.randn(T, D, device=device).bfloat16()
    pairs = []

    def step() -> None:
        # The token exchange, before routing (overlapped modes).
        early = start_tokens(x) if start_tokens is not None else None
        with torch.profiler.record_function("routing"):
            routing = router(x)
        with torch.profiler.record_function("experts"):
            y = op(x if early is None else early, up, down, routing.weights_TK, routing.indices_TK)
        with torch.profiler.record_function("shared_swiglu"):
            gate, lin = (x @ fc1.t()).chunk(2, dim=-1)
            shared = (F.silu(gate) * lin) @ fc2.t()
        y = (y if early is None else y.finish()) + shared
        with torch.profiler.record_function("backward"):
            y.backward(gy)
        if len(pairs) < 1:
            with torch.no_grad():
                idx = routing.indices_TK
                if sharding == "rows":
                    per_rank = torch.bincount(idx.flatten() // (N // size), minlength=size)
                    every = [torch.zeros_like(per_rank) for _ in range(size)]
                    dist.all_gather(every, per_rank)
                    total = torch.stack(every).sum(0).double()
                    pairs.append((total.max() / total.mean()).item())
                else:
                    pairs.append(1.0)

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    eager_step = step
    if args.cuda_graph:
        step = _graphed(step)
    times, cpu_times = [], []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        cpu_times.append((time.perf_counter() - start) * 1e3)  # until the last launch returned
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    sync()
    with WireBytes() as wire:  # one more (eager) step, its collectives counted
        eager_step()
        sync()
    dist.barrier()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.profile_iters):
            step()
        sync()
    by_category: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0)
        if evt.device_type == torch.autograd.DeviceType.CUDA and cuda_us > 0:
            ms = cuda_us / 1e3 / args.profile_iters
            by_category[categorize(evt.key)] = by_category.get(categorize(evt.key), 0.0) + ms
            kernels.append((ms, evt.key[:90]))
    kernels.sort(reverse=True)
    # Host time by op (self CPU time: launches, Python-side work of autograd functions, NCCL
    # bookkeeping): where a launch-bound step spends its CPU time.
    host_ops = sorted(
        (
            (evt.self_cpu_time_total / 1e3 / args.profile_iters, evt.count // args.profile_iters,
             evt.key[:70])
            for evt in prof.key_averages()
            if evt.device_type == torch.autograd.DeviceType.CPU and evt.self_cpu_time_total > 0
        ),
        reverse=True,
    )  # fmt: skip
    median = statistics.median(times)
    busy_ms = gpu_busy_ms(prof.events()) / args.profile_iters if cuda else 0.0
    result = {
        "mode": mode,
        "cuda_graph": bool(args.cuda_graph),
        "skew": args.skew,
        "ms_per_layer_step": median,
        "cpu_ms_per_layer_step": statistics.median(cpu_times),
        "gpu_busy_ms_per_layer_step": busy_ms,
        "group_tokens_per_s": T * size / median * 1e3,
        "pair_imbalance_max_over_mean": pairs[0],
        "cuda_ms_by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": kernels[:15],
        "kernels_ms": kernels,
        "host_self_ms_by_op": host_ops[:25],
        "host_self_ms_total": sum(ms for ms, _, _ in host_ops),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "sent_mb_measured": wire.sent / 1e6,
    }
    if sharding in ("rows", "dim"):
        predicted = predict_bytes(
            sharding, tokens=T, d=D, k=K, num_experts=N, ranks=size, dtype_bytes=x.element_size()
        )
        result["sent_mb_predicted"] = predicted["total"] / 1e6
        result["auto_choice"] = choose_sharding(
            tokens=T, d=D, k=K, num_experts=N, ranks=size, dtype_bytes=x.element_size()
        )[0]
    if args.trace_dir and rank == 0:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace_dir) / f"{mode}_skew{args.skew}.json"))
    return result


def _graphed(step: Callable[[], None]) -> Callable[[], None]:
    """The layer step (forward and backward, collectives included) captured in one CUDA graph,
    as ``trainer.cuda_graphs=mlp`` replays it: the GPU's own time, the host out of the way.
    Warmed up on a side stream first, as ``torch.cuda.graph`` asks; the gradients accumulate
    into the tensors the warm-up made (static addresses)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        step()
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="local,rows,dim")
    parser.add_argument("--tokens", type=int, default=16 * 1024)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--experts", type=int, default=76 * 76)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--router-norm", default="batchnorm")
    parser.add_argument("--skew", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--profile-iters", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument(
        "--dense-max-mib",
        type=int,
        default=None,
        help="cap of the dense weight-gradient buffer (experts_dense_grad.DENSE_MAX_BYTES), MiB",
    )
    parser.add_argument(
        "--grad-coef",
        choices=("split", "bf16"),
        default="split",
        help="coefficients of the dense weight-gradient GEMMs (experts_dense_grad.DENSE_COEF)",
    )
    parser.add_argument(
        "--cuda-graph", action="store_true", help="replay each mode's layer step from a CUDA graph"
    )
    args = parser.parse_args()
    from omnimoe_kernels import experts_dense_grad

    experts_dense_grad.DENSE_COEF = args.grad_coef
    if args.dense_max_mib is not None and args.dense_max_mib < 1:
        exit_usage(
            "profile_expert_parallel.py", f"--dense-max-mib must be >= 1 (got {args.dense_max_mib})"
        )
    if args.dense_max_mib is not None:
        experts_dense_grad.DENSE_MAX_BYTES = args.dense_max_mib << 20
    if args.cuda_graph and not torch.cuda.is_available():
        exit_usage("profile_expert_parallel.py", "--cuda-graph needs a CUDA GPU, none is visible")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:  # smoke runs of this script on CPU (gloo, PyTorch reference kernels)
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    results = []
    for mode in args.modes.split(","):
        result = run_mode(mode, args, device)
        results.append(result)
        if dist.get_rank() == 0:
            cats = ", ".join(f"{k} {v:.2f}" for k, v in result["cuda_ms_by_category"].items())
            print(
                f"{mode:>9} skew={args.skew}: {result['ms_per_layer_step']:.2f} ms/layer step "
                f"(CPU {result['cpu_ms_per_layer_step']:.2f}, GPU busy "
                f"{result['gpu_busy_ms_per_layer_step']:.2f} profiled), "
                f"{result['group_tokens_per_s'] / 1e3:.0f}k tok/s (group), pairs max/mean "
                f"{result['pair_imbalance_max_over_mean']:.3f}; CUDA ms: {cats}",
                flush=True,
            )
            if "sent_mb_predicted" in result:
                measured, predicted = result["sent_mb_measured"], result["sent_mb_predicted"]
                print(
                    f"           sent per rank: {measured:.2f} MB measured, {predicted:.2f} MB "
                    f"predicted ({measured / predicted:.3f}x); auto -> {result['auto_choice']}",
                    flush=True,
                )
            for ms, name in result["top_kernels_ms"][:8]:
                print(f"           {ms:7.3f} ms  {name}", flush=True)
            print(
                f"           host (self CPU, profiled): {result['host_self_ms_total']:.2f} ms",
                flush=True,
            )
            for ms, calls, name in result["host_self_ms_by_op"][:12]:
                print(f"           {ms:7.3f} ms host  {calls:4d} calls  {name}", flush=True)
    if args.json and dist.get_rank() == 0:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
