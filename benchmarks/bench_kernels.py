"""Benchmark the OmniMoE kernels on one GPU: atomic experts, Cartesian router, full layer.

Shapes: T tokens, d hidden, N experts, n = sqrt(N), K experts per token, P = T * K pairs.
Times are medians of CUDA-graph replays (``triton.testing.do_bench``), bf16 activations and
expert tables, fp32 routing weights, uniform random routing. The floor is bytes / measured
copy bandwidth, with U = experts actually touched (counted on the host, outside the timings):
  forward:  up + down rows of U experts read, x read, y written, indices (int64) and weights read
  backward: the same rows and indices again, dy and x read, dx written, dup + ddown rows of the
            U experts written, dw written; forward+backward floor = forward + backward bytes.
Run: ``python benchmarks/bench_kernels.py --json out.json`` (prints a table, writes JSON);
``--sweep-router --only router:16384-1024-64,router:4096-320-4096`` first times the router's
select-kernel variants (the earlier kernel among them) at those configs, outputs compared.
``--only gates`` times the router gate scores alone (``bench_gates``).
``--only combine_ranges`` times the expert-parallel rows layout's combine, masked against pair
ranges, at a80m under ep2 (``bench_combine_ranges``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math

import torch
import torch.nn.functional as F
from bench_combine_ranges import COMBINE_RANGES_CONFIGS, bench_combine_ranges, print_table
from bench_gates import GATE_CONFIGS, bench_gates, print_gates
from tile_sweep import sweep_router, sweep_tiles  # the script's folder is on sys.path
from triton.testing import do_bench

import omnimoe_kernels
import omnimoe_kernels.experts_dense_grad as experts_dense_grad
import omnimoe_kernels.experts_grad as experts_grad
import omnimoe_kernels.experts_pairs as experts_pairs
import omnimoe_kernels.router_topk as router_topk

EXPERT_CONFIGS = [  # T, d, N, K
    (4096, 1024, 4096, 16),
    (16384, 1024, 65536, 16),
    (16384, 2048, 16384, 32),
    (16384, 2048, 262144, 32),
    (16384, 2048, 1048576, 64),
    (4096, 1024, 102400, 512),
    (4096, 1024, 102400, 1024),
    (4096, 1024, 102400, 2048),
    (4096, 1024, 102400, 4096),
]
ROUTER_CONFIGS = [(16384, 1024, 64), (4096, 320, 512), (4096, 320, 1024), (4096, 320, 2048)]
ROUTER_CONFIGS += [(4096, 320, 4096)]
LAYER_KS = [512, 1024, 2048, 4096]


def copy_bandwidth() -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def graph_time(fn, n_sets: int) -> float:
    """Median ms of replaying one captured graph per input set, in rotation."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(n_sets):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for i in range(n_sets):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(i)
        graphs.append(g)
    state = {"i": 0}

    def replay():
        graphs[state["i"] % n_sets].replay()
        state["i"] += 1

    return do_bench(replay, warmup=25, rep=200, return_mode="median")


def peer_gather(x, up, down, w, idx):
    """PEER-style PyTorch baseline: gather the K expert rows of every token."""
    h = torch.einsum("td,tkd->tk", x, up[idx]).float()
    a = (F.silu(h) * w).to(x.dtype)
    return torch.einsum("tk,tkd->td", a, down[idx])


def expert_inputs(T: int, d: int, N: int, K: int) -> tuple:
    """(x, up, down, w, idx, dy): bf16 rows and tables, fp32 weights, uniform random routing."""
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    up = (torch.randn(N, d, device="cuda") / d**0.5).bfloat16().requires_grad_()
    down = torch.randn(N, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = torch.rand(T, K, device="cuda").requires_grad_()
    idx = torch.randint(0, N, (T, K), device="cuda")
    return x, up, down, w, idx, torch.randn(T, d, device="cuda", dtype=torch.bfloat16)


def bench_experts(T, d, N, K, bw, deterministic=False, peer=True):
    P = T * K
    set_bytes = 2 * N * d * 2 + 2 * T * d * 2 + P * 12
    n_sets = max(1, min(4, (256 << 20) // set_bytes))
    sets = [expert_inputs(T, d, N, K) for _ in range(n_sets)]
    U = torch.unique(sets[0][4]).numel()
    b = 2  # bf16
    fwd_bytes = 2 * U * d * b + 2 * T * d * b + P * 12
    bwd_bytes = 4 * U * d * b + 3 * T * d * b + P * 16
    row = {"T": T, "d": d, "N": N, "K": K, "touched": U}
    row["floor_fwd_ms"] = fwd_bytes / bw * 1e3
    row["floor_fb_ms"] = (fwd_bytes + bwd_bytes) / bw * 1e3

    def ours(i, backward):
        x, up, down, w, idx, gy = sets[i]
        # valid_ids: as the OmniMoE layer calls it (the router's ids are all < N)
        y = omnimoe_kernels.atomic_experts(
            x, up, down, w, idx, deterministic=deterministic, valid_ids=True
        )
        if backward:
            torch.autograd.grad(y, (x, up, down, w), gy)

    def base(i, backward):
        x, up, down, w, idx, gy = sets[i]
        y = peer_gather(x, up, down, w, idx)
        if backward:
            torch.autograd.grad(y, (x, up, down, w), gy)

    for name, fn in (("ours", ours), ("peer", base))[: 2 if peer else 1]:
        for key, backward in (("fwd", False), ("fb", True)):
            if name == "peer" and P * d * b * (6 if backward else 3) > 40e9:
                row[f"{name}_{key}_ms"] = None  # the gathered (P, d) rows do not fit
                continue
            try:
                row[f"{name}_{key}_ms"] = graph_time(lambda i, f=fn, bk=backward: f(i, bk), n_sets)
            except torch.OutOfMemoryError:
                row[f"{name}_{key}_ms"] = None
            torch.cuda.empty_cache()
    return row


def bench_router(T, n, K):
    rows = torch.randn(T, n, device="cuda").log_softmax(-1)
    cols = torch.randn(T, n, device="cuda").log_softmax(-1)
    ms = graph_time(lambda i: omnimoe_kernels.cartesian_topk(rows, cols, K), 1)
    return {"T": T, "n": n, "K": K, "ms": ms}


class Layer(torch.nn.Module):
    """Router (fp32) + Cartesian top-K + softmax weights + atomic experts + shared SwiGLU."""

    def __init__(self, d: int, N: int, K: int, shared: int = 1024) -> None:
        super().__init__()
        n = math.isqrt(N)
        self.K = K
        self.row_gate = torch.nn.Linear(d, n, bias=False)
        self.col_gate = torch.nn.Linear(d, n, bias=False)
        self.row_norm = torch.nn.BatchNorm1d(n, affine=False)
        self.col_norm = torch.nn.BatchNorm1d(n, affine=False)
        self.up = torch.nn.Parameter(torch.randn(N, d).bfloat16() / d**0.5)
        self.down = torch.nn.Parameter(torch.randn(N, d).bfloat16() / d**0.5)
        self.gate_up = torch.nn.Linear(d, 2 * shared, bias=False).bfloat16()
        self.proj = torch.nn.Linear(shared, d, bias=False).bfloat16()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rows = F.log_softmax(self.row_norm(self.row_gate(xf)), dim=-1)
        cols = F.log_softmax(self.col_norm(self.col_gate(xf)), dim=-1)
        scores, idx = omnimoe_kernels.cartesian_topk(rows, cols, self.K)
        w = torch.softmax(scores, dim=-1)
        y = omnimoe_kernels.atomic_experts(x, self.up, self.down, w, idx)
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return y + self.proj(F.silu(g) * u)


def bench_layer(K, T=4096, d=1024, N=102400):
    layer = Layer(d, N, K).cuda()
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ms = graph_time(lambda i: layer(x), 1)
    return {"T": T, "d": d, "N": N, "K": K, "ms": ms}


PROFILE_EXPERT_CONFIGS = [(16384, 2048, 262144, 32), (4096, 1024, 102400, 512)]


def profile(expert_configs: list) -> None:
    """Per-kernel device time of one fwd+bwd at each expert config (``--only experts:...``, else
    ``PROFILE_EXPERT_CONFIGS``), and of two router calls."""
    acts = [torch.profiler.ProfilerActivity.CUDA]
    for T, d, N, K in expert_configs:
        x, up, down, w, idx, gy = expert_inputs(T, d, N, K)

        def step(x=x, up=up, down=down, w=w, idx=idx, gy=gy):
            y = omnimoe_kernels.atomic_experts(x, up, down, w, idx, valid_ids=True)
            torch.autograd.grad(y, (x, up, down, w), gy)

        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=acts) as prof:
            step()
            torch.cuda.synchronize()
        print(f"fwd+bwd T={T} d={d} N={N} K={K}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    for T, n, K in ((16384, 1024, 64), (4096, 320, 4096)):
        rows = torch.randn(T, n, device="cuda").log_softmax(-1)
        cols = torch.randn(T, n, device="cuda").log_softmax(-1)
        omnimoe_kernels.cartesian_topk(rows, cols, K)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=acts) as prof:
            omnimoe_kernels.cartesian_topk(rows, cols, K)
            torch.cuda.synchronize()
        print(f"router T={T} n={n} K={K}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


def _dump(out: dict, path: str) -> None:
    """Rewrite the JSON after every row, so a run cut short still leaves its numbers."""
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def fmt(v, nd=3):
    return "OOM" if v is None else f"{v:.{nd}f}"


def _parse_only(spec: str) -> dict | None:
    """``--only`` -> {section: None (all configs) or a set of config tuples}; None = everything.
    A config is written with '-' between its numbers (layer configs are just K)."""
    if not spec:
        return None
    want: dict = {}
    for item in spec.split(","):
        name, _, cfg = item.strip().partition(":")
        if name not in ("experts", "router", "layer", "gates", "combine_ranges"):
            raise SystemExit(f"--only: unknown section {name!r}")
        if not cfg:
            want[name] = None
        elif want.get(name, set()) is not None:
            nums = tuple(int(v) for v in cfg.split("-"))
            want.setdefault(name, set()).add(nums[0] if name == "layer" else nums)
    return want


def _pick(want: dict | None, name: str, configs: list) -> list:
    """The configs of one section that ``--only`` keeps."""
    if want is None:
        return list(configs)
    if name not in want:
        return []
    return list(configs) if want[name] is None else [c for c in configs if c in want[name]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench_kernels.json")
    ap.add_argument("--quick", action="store_true", help="first three expert configs only")
    ap.add_argument("--profile", action="store_true", help="per-kernel breakdown, then exit")
    ap.add_argument("--no-peer", action="store_true", help="skip the PyTorch gather baseline")
    ap.add_argument(
        "--expert-grad-coef",
        choices=experts_dense_grad.COEF_MODES,
        default=experts_dense_grad.DENSE_COEF,
        help="how the expert weight gradients take each pair's coefficient (the kernels' "
        "default: split, ~16 bits; training's default, model.expert_grad_coef: bf16)",
    )
    ap.add_argument(
        "--sweep-tiles",
        nargs="?",
        const="pair,combine,grad",
        default="",
        help="time the tile alternatives of these kernels first (default: pair, combine, grad; "
        'grad_experts: the weight gradients\' "experts" schedule)',
    )
    ap.add_argument(
        "--sweep-router",
        action="store_true",
        help="first time the select-kernel variants (tile_sweep.ROUTER_VARIANTS, the earlier "
        "kernel first) at the router configs that --only keeps",
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated subset, e.g. 'router,layer:512,experts:16384-1024-65536-16'",
    )
    args = ap.parse_args()
    from runs import require_cuda  # the script's folder is on sys.path

    require_cuda("bench_kernels.py")
    want = _parse_only(args.only)
    experts_dense_grad.DENSE_COEF = args.expert_grad_coef
    if args.profile:
        only = _pick(want, "experts", EXPERT_CONFIGS) if want and "experts" in want else []
        profile(only or PROFILE_EXPERT_CONFIGS)
        return
    torch.manual_seed(0)
    bw = copy_bandwidth()
    out = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "copy_bw_TBps": bw / 1e12,
        "expert_grad_coef": args.expert_grad_coef,
        "experts": [],
        "router": [],
        "layer": [],
        "gates": [],
        "combine_ranges": [],
    }
    if args.sweep_tiles:
        out["tile_sweep"] = sweep_tiles(set(args.sweep_tiles.split(",")))
    if args.sweep_router:
        out["router_sweep"] = sweep_router(_pick(want, "router", ROUTER_CONFIGS), graph_time)
        _dump(out, args.json)
    out["tiles"] = {
        "pair": experts_pairs.PAIR_TILE,
        "combine": experts_pairs.COMBINE_TILE or experts_pairs.COMBINE_TILES,
        "grad": [experts_grad.CHUNK_PAIRS, experts_grad.GRAD_BD, experts_grad.GRAD_WARPS,
                 experts_grad.BLOCK_PAIRS, experts_grad.GRAD_STAGES],
        "router_select": [router_topk.SELECT_MODE, router_topk.SELECT_CHUNK_ROWS,
                          router_topk.SELECT_WARPS, router_topk.SELECT_MAXNREG],
    }  # fmt: skip
    print("tiles used:", out["tiles"], flush=True)
    configs = EXPERT_CONFIGS[:3] if args.quick else EXPERT_CONFIGS
    for cfg in _pick(want, "experts", configs):
        out["experts"].append(bench_experts(*cfg, bw, peer=not args.no_peer))
        print("experts", out["experts"][-1], flush=True)
        _dump(out, args.json)
    for cfg in _pick(want, "router", ROUTER_CONFIGS):
        out["router"].append(bench_router(*cfg))
        print("router", out["router"][-1], flush=True)
        _dump(out, args.json)
    for cfg in _pick(want, "gates", GATE_CONFIGS):
        out["gates"].append(bench_gates(*cfg))
        print("gates", out["gates"][-1], flush=True)
        _dump(out, args.json)
    for cfg in _pick(want, "combine_ranges", COMBINE_RANGES_CONFIGS):
        out["combine_ranges"].append(bench_combine_ranges(*cfg, lambda f: graph_time(f, 1)))
        print("combine_ranges", out["combine_ranges"][-1], flush=True)
        _dump(out, args.json)
    for k in _pick(want, "layer", LAYER_KS):
        out["layer"].append(bench_layer(k))
        print("layer", out["layer"][-1], flush=True)
    _dump(out, args.json)

    print(
        f"\n{out['device']}, {out['date']}, copy bandwidth {out['copy_bw_TBps']:.2f} TB/s, "
        f"expert weight-gradient coefficients: {args.expert_grad_coef}"
    )
    print(
        "| T, d, N, K | floor fwd | ours fwd (x floor) | PEER fwd | floor f+b | ours f+b (x floor) | PEER f+b |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in out["experts"]:
        of, ofb = r["ours_fwd_ms"], r["ours_fb_ms"]
        print(
            f"| {r['T']}, {r['d']}, {r['N']}, {r['K']} | {fmt(r['floor_fwd_ms'])} | "
            f"{fmt(of)} ({of / r['floor_fwd_ms']:.1f}x) | {fmt(r.get('peer_fwd_ms'))} | "
            f"{fmt(r['floor_fb_ms'])} | {fmt(ofb)} ({ofb / r['floor_fb_ms']:.1f}x) | "
            f"{fmt(r.get('peer_fb_ms'))} |"
        )
    print("\n| router T, n, K | ms |\n|---|---|")
    for r in out["router"]:
        print(f"| {r['T']}, {r['n']}, {r['K']} | {fmt(r['ms'])} |")
    print_gates(out["gates"])
    print_table(out["combine_ranges"])
    print("\n| layer forward T, d, N, K | ms |\n|---|---|")
    for r in out["layer"]:
        print(f"| {r['T']}, {r['d']}, {r['N']}, {r['K']} | {fmt(r['ms'])} |")


if __name__ == "__main__":
    main()
