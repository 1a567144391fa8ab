"""Tile sweep of the expert kernels: each kernel alone, every tile alternative, on a few configs;
and the router's select-kernel launches (``sweep_router``, ``bench_kernels.py --sweep-router``).

Run through ``bench_kernels.py --sweep-tiles [pair,pair_tokens,combine,grad,grad_experts]``;
the results (ms per tile and config, and the fastest tile in total) go to the benchmark's JSON.
The modules' defaults were set from these tables (docs/benchmarks.md) and are left as they were
after the sweep.
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

import omnimoe_kernels
import omnimoe_kernels.experts_autograd as experts_autograd
import omnimoe_kernels.experts_grad as experts_grad
import omnimoe_kernels.experts_pairs as experts_pairs
import omnimoe_kernels.router_topk as router_topk

PAIR_TILES = [(16, 128, 4), (8, 128, 4), (16, 256, 4), (16, 128, 2), (32, 128, 4)]
PAIR_TILES += [(32, 64, 4), (64, 64, 8), (16, 256, 8), (32, 256, 8), (64, 128, 8), (8, 256, 4)]
COMBINE_TILES = [(32, 8, 128, 8), (32, 4, 64, 4), (64, 8, 128, 8), (32, 16, 128, 8)]
COMBINE_TILES += [(64, 4, 64, 8), (32, 8, 64, 4), (16, 8, 128, 4), (16, 4, 128, 4)]
SWEEP_CONFIGS = [(4096, 1024, 4096, 16), (16384, 1024, 65536, 16), (16384, 2048, 16384, 32)]
SWEEP_CONFIGS += [(4096, 1024, 102400, 512), (16384, 768, 5776, 64)]


def _time_tiles(label: str, tiles: list, apply, run, outputs) -> list:
    """ms of ``run`` per tile (None where the outputs differ from the first tile's)."""
    ref, out = None, []
    for tile in tiles:
        apply(tile)
        for t in outputs:
            t.fill_(float("nan"))  # poison: every output must be written
        try:
            run()
        except Exception as exc:  # a tile that does not compile is reported, not fatal
            print(label, tile, "failed:", str(exc)[:200], flush=True)
            out.append(None)
            continue
        got = [t.float().clone() for t in outputs]
        ref = got if ref is None else ref
        err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref))
        out.append(do_bench(run, warmup=10, rep=100, return_mode="median") if err < 1e-2 else None)
        print(label, tile, "ms", out[-1], "err", err, flush=True)
    return out


def _set_pair(tile: tuple) -> None:
    experts_pairs.PAIR_TILE = tile


def _set_combine(tile: tuple) -> None:
    experts_pairs.COMBINE_TILE = tile


def _set_grad(tile: tuple) -> None:
    experts_grad.GRAD_SCHEDULE = "runs"
    experts_grad.CHUNK_PAIRS, experts_grad.GRAD_BD, experts_grad.GRAD_WARPS = tile[:3]
    experts_grad.BLOCK_PAIRS, experts_grad.GRAD_STAGES = tile[3:]


# BP, BD, warps, pairs per block (0 = chosen from P), pipelining stages
GRAD_TILES = [(16, 128, 2, 0, 2), (16, 128, 2, 0, 1), (16, 128, 2, 0, 3), (16, 128, 2, 0, 4)]
GRAD_TILES += [(16, 64, 2, 0, 3), (16, 64, 1, 0, 3), (16, 64, 2, 0, 1), (16, 256, 4, 0, 1)]
GRAD_TILES += [(16, 128, 4, 0, 1), (16, 128, 1, 0, 3)]

# The "experts" schedule (``experts_grad.GRAD_SCHEDULE``): BP, BD, warps, pipelining stages.
GRAD_EXPERTS_TILES = [(16, 128, 2, 2), (32, 128, 4, 2), (16, 64, 2, 2), (32, 64, 2, 3)]
GRAD_EXPERTS_TILES += [(16, 128, 4, 3), (32, 128, 2, 2), (64, 128, 4, 2), (16, 256, 4, 2)]


def _set_grad_experts(tile: tuple) -> None:
    experts_grad.GRAD_SCHEDULE = "experts"
    experts_grad.CHUNK_PAIRS, experts_grad.GRAD_BD, experts_grad.GRAD_WARPS = tile[:3]
    experts_grad.GRAD_STAGES = tile[3]


# "pair" walks the pairs in expert order (the backward; the forward when the tables exceed L2),
# "pair_tokens" in token order (the forward when both tables fit in L2, e.g. a80m's).
TILE_KNOBS = {"pair": (PAIR_TILES, _set_pair), "pair_tokens": (PAIR_TILES, _set_pair)}
TILE_KNOBS["combine"] = (COMBINE_TILES, _set_combine)
TILE_KNOBS["grad"] = (GRAD_TILES, _set_grad)
TILE_KNOBS["grad_experts"] = (GRAD_EXPERTS_TILES, _set_grad_experts)


def _sweep_config(T: int, d: int, N: int, K: int, only: set) -> dict:
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    up = (torch.randn(N, d, device="cuda") / d**0.5).bfloat16()
    idx = torch.randint(0, N, (T, K), device="cuda")
    w, h, g = (torch.rand(T, K, device="cuda") for _ in range(3))
    key_P, order_P, base = experts_autograd.expert_order(idx, N)
    e_P = key_P.to(torch.int32) + base
    y, dup, ddown = torch.empty_like(x), torch.empty_like(up), torch.empty_like(up)
    runs = {
        "pair": (lambda: experts_pairs.pair_scores(x, up, e_P, order_P, K, h), [h]),
        "pair_tokens": (lambda: experts_pairs.pair_scores(x, up, idx.view(-1), None, K, h), [h]),
        "combine": (lambda: experts_pairs.combine_rows(up, idx, h, y, w_TK=w), [y]),
        "grad": (
            lambda: experts_grad.expert_grads(
                x, dy, order_P, e_P, h, w, g, dup, ddown, K, deterministic=True
            ),
            [dup, ddown],
        ),
    }
    runs["grad_experts"] = runs["grad"]
    res = {}
    for name, (run, outputs) in runs.items():
        if name not in only:
            res[name] = [0.0] * len(TILE_KNOBS[name][0])
            continue
        tiles, apply = TILE_KNOBS[name]
        res[name] = _time_tiles(f"{name} {(T, d, N, K)}", tiles, apply, run, outputs)
    return res


def sweep_tiles(only: set) -> dict:
    """Time each kernel's tile alternatives alone on SWEEP_CONFIGS and report the fastest in
    total; the modules' defaults (set from these tables) are restored for the rest of the run."""
    saved = (experts_pairs.PAIR_TILE, experts_pairs.COMBINE_TILE)
    saved += (experts_grad.CHUNK_PAIRS, experts_grad.GRAD_BD, experts_grad.GRAD_WARPS)
    saved += (experts_grad.BLOCK_PAIRS, experts_grad.GRAD_STAGES, experts_grad.GRAD_SCHEDULE)
    per_cfg = []
    for cfg in SWEEP_CONFIGS:
        per_cfg.append(_sweep_config(*cfg, only))
        torch.cuda.empty_cache()
    best = {}
    for name, (tiles, _) in TILE_KNOBS.items():
        if name not in only:
            continue
        totals = {}
        for i, tile in enumerate(tiles):
            col = [res[name][i] for res in per_cfg]
            if None not in col:
                totals[tile] = sum(col)
        best[name] = min(totals, key=totals.get)
        print("best", name, best[name], "total ms", totals[best[name]], flush=True)
    experts_pairs.PAIR_TILE, experts_pairs.COMBINE_TILE = saved[:2]
    experts_grad.CHUNK_PAIRS, experts_grad.GRAD_BD, experts_grad.GRAD_WARPS = saved[2:5]
    experts_grad.BLOCK_PAIRS, experts_grad.GRAD_STAGES, experts_grad.GRAD_SCHEDULE = saved[5:]
    return {"configs": SWEEP_CONFIGS, "ms": per_cfg, "best": best}


# Select-kernel launches of the router (``router_topk``): (selection mode, rows per compaction
# chunk, warps per token, register cap). Modes: "rows" the row-major selection (cross-lane
# prefix sums; the first entry, the default before, is the bitwise reference of the sweep),
# "lanes" the lane-chunked one, "bracket" lane-chunked from a group-maximum bracket (the
# default). ptxas for sm_90 at (n, K) = (1024, 64): rows/4 80 registers, bracket/4 96.
# They apply to the selection path (K < n) only: at n = 320, K >= 512 they time one kernel.
ROUTER_VARIANTS = [("rows", 4, None, None), ("bracket", 4, None, None), ("bracket", 4, None, 80)]
ROUTER_VARIANTS += [("bracket", 4, None, 64), ("lanes", 4, None, None), ("bracket", 8, None, 80)]
ROUTER_VARIANTS += [("bracket", 4, 2, None), ("rows", 4, None, 64)]


def _hard_inputs(T: int, n: int, gen: torch.Generator) -> list:
    """(rows, cols) pairs where the order rules decide: few distinct values (ties across the
    top-K boundary), and NaN / +-inf / signed zeros mixed into log-probabilities."""
    dev = gen.device
    ties = [torch.randint(0, 3, (T, n), device=dev, generator=gen).float() for _ in range(2)]
    pool = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0], device=dev)
    mixed = []
    for _ in range(2):
        x = torch.randn(T, n, device=dev, generator=gen).log_softmax(-1)
        pick = torch.randint(0, 5 * 8, (T, n), device=dev, generator=gen)
        mixed.append(torch.where(pick < 5, pool[pick.clamp_max(4)], x))
    return [tuple(ties), tuple(mixed)]


def _cell(ms) -> str:
    """A sweep table cell: ms, or why there is none."""
    return "differs" if ms is None else ms if isinstance(ms, str) else f"{ms:.3f}"


def _set_router(variant: tuple) -> None:
    mode, chunk, warps, cap = variant
    router_topk.SELECT_MODE, router_topk.SELECT_CHUNK_ROWS = mode, chunk
    router_topk.SELECT_WARPS, router_topk.SELECT_MAXNREG = warps, cap


def sweep_router(configs: list, timer, device: str = "cuda") -> dict:
    """ms of ``cartesian_topk`` per (T, n, K) config and select-kernel variant, timed by
    ``timer(fn, 1)`` (the benchmark's CUDA-graph replay); None where ids or scores differ
    bitwise from the first (earlier) variant's on the timed inputs or on tie-heavy and
    non-finite ones; where K >= n (no selection) only the first two are timed. A markdown
    table follows. The module's defaults are restored after."""
    saved = (router_topk.SELECT_MODE, router_topk.SELECT_CHUNK_ROWS, router_topk.SELECT_WARPS)
    saved += (router_topk.SELECT_MAXNREG,)
    res = {}
    for T, n, K in configs:
        gen = torch.Generator(device=device).manual_seed(T + n + K)
        rows = torch.randn(T, n, device=device, generator=gen).log_softmax(-1)
        cols = torch.randn(T, n, device=device, generator=gen).log_softmax(-1)
        # Bitwise checks: the timed inputs, and tie-heavy / non-finite ones (512 tokens).
        checks = [(rows, cols), *_hard_inputs(min(T, 512), n, gen)]
        ref, ms = None, []
        for i, variant in enumerate(ROUTER_VARIANTS):
            if n <= K and i >= 2:  # no selection: every variant launches the same kernel
                ms.append("same kernel")
                continue
            _set_router(variant)
            out = [omnimoe_kernels.cartesian_topk(r, c, K) for r, c in checks]
            ref = out if ref is None else ref
            same = all(
                torch.equal(o[1], f[1])
                and torch.equal(o[0].view(torch.int32), f[0].view(torch.int32))
                for o, f in zip(out, ref)
            )
            run = lambda i, r=rows, c=cols, k=K: omnimoe_kernels.cartesian_topk(r, c, k)  # noqa: E731
            ms.append(timer(run, 1))
            ms[-1] = ms[-1] if same else None
            print("router sweep", (T, n, K), variant, "ms", ms[-1], "equal", same, flush=True)
        res["-".join(map(str, (T, n, K)))] = ms
        timed = [(v, m) for v, m in zip(ROUTER_VARIANTS, ms) if isinstance(m, float)]
        print("router sweep", (T, n, K), "best", min(timed, key=lambda vm: vm[1]), flush=True)
    _set_router(saved)
    print(
        "| variant (mode, chunk rows, warps, register cap) | "
        + " | ".join(", ".join(map(str, c)) for c in configs)
        + " |"
    )
    print("|---" * (len(configs) + 1) + "|")
    for i, variant in enumerate(ROUTER_VARIANTS):
        cells = [res["-".join(map(str, c))][i] for c in configs]
        print(f"| {variant} | " + " | ".join(_cell(m) for m in cells) + " |")
    return {"variants": ROUTER_VARIANTS, "ms": res}
