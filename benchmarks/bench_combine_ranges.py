"""The expert-parallel ``rows`` layout's combine, with and without pair ranges
(``bench_kernels.py --only combine_ranges``).

Under ``rows`` a rank runs ``combine_rows`` on the group's G = P*T tokens with the pairs of the
other ranks' experts marked "no expert"; with ascending ids each token's pairs on the rank are
one run of its slots and ``pair_ranges`` lets the kernel walk only those runs, tiled in count
order (``rows_routing``, ``rows_dispatch.order_by_count``). Timed at a80m under ep2_rows (T = 16384 tokens per
rank, P = 2, D = 768, N = 76 x 76, K = 64): the masked full-K combine against the ranged one,
in its forward form (y: gated, down table) and its dx form (plain coefficients, up table), for
the id block of every rank, plus the one-GPU reference (T tokens, all N rows, every pair real)
that the ranged combine should approach. Routing: ``cartesian_topk`` of random row and column
log-probabilities (log_softmax of N(0, 1) scores, what the router's BatchNorm produces), which
spreads a token's K pairs unevenly over the ranks, as training does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import omnimoe_kernels
from omnimoe_kernels.experts_pairs import combine_rows
from omnimoe_kernels.rows_routing import rows_routing
from omnimoe_train.parallel.rows_dispatch import order_by_count

COMBINE_RANGES_CONFIGS = [(16384, 2, 768, 76, 64)]  # T per rank, ranks, D, n, K (a80m, ep2)


def routed_ids(tokens: int, n: int, k: int, device: str, seed: int = 0) -> torch.Tensor:
    """(tokens, k) int64 expert ids, ascending per token, of the Cartesian router's top-k over
    an n x n grid of random log-probabilities."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows, cols = (
        torch.randn(tokens, n, generator=gen, device=device).log_softmax(-1) for _ in range(2)
    )
    return omnimoe_kernels.cartesian_topk(rows, cols, k)[1]


def rank_setup(
    ids32_GK: torch.Tensor, num_experts: int, ranks: int, rank: int, backend: str = "auto"
) -> tuple:
    """(local ids (G, K) int32 with E = "no expert", pair ranges) of ``rank``'s id block, as
    ``rows_dispatch._local_experts`` builds them (``rows_routing`` + ``order_by_count``)."""
    experts, tokens = num_experts // ranks, ids32_GK.shape[0] // ranks
    routing = rows_routing(
        ids32_GK, rank * experts, experts, slice(rank * tokens, (rank + 1) * tokens), ranks,
        ascending=True, backend=backend,
    )  # fmt: skip
    order_G = order_by_count(routing.count_G, ids32_GK.shape[1])
    return routing.local_GK, (routing.start_G, routing.count_G, order_G)


def count_stats(count_G: torch.Tensor, order_G: torch.Tensor, tile: int = 32) -> dict:
    """Mean and std of the pairs per token, and the mean over tiles of ``tile`` tokens of the
    tile's largest count, tokens consecutive or in ``order_G`` (the slots a tile walks)."""
    count = count_G.double()
    pad = (-count.numel()) % tile

    def tile_max(c: torch.Tensor) -> float:
        return torch.nn.functional.pad(c, (0, pad)).view(-1, tile).amax(1).mean().item()

    return {
        "count_mean": count.mean().item(),
        "count_std": count.std().item(),
        "tile_max_consecutive": tile_max(count),
        "tile_max_sorted": tile_max(count[order_G.long()]),
    }


def bench_combine_ranges(
    tokens: int, ranks: int, d: int, n: int, k: int, time_ms: Callable, device: str = "cuda"
) -> dict:
    """Milliseconds (``time_ms(fn)``, fn called with one ignored argument: ``graph_time``'s
    input-set index) of the rows combines at G = ranks * tokens, per rank's id
    block: ``fwd`` (gated, bf16 down table) and ``dx`` (fp32 coefficients, bf16 up table),
    ``masked`` (all K slots) and ``ranges``; ``ranges_setup`` the pair ranges' construction
    (once per layer call); ``one_gpu`` the same combines on ``tokens`` tokens and all N rows.
    Also the largest |ranges - masked| of the outputs (fp32 sums in other groups: rounding)."""
    num_experts, group = n * n, ranks * tokens
    ids_GK = routed_ids(group, n, k, device)
    ids32_GK = ids_GK.to(torch.int32)  # as the rows op gathers them
    gen = torch.Generator(device=device).manual_seed(1)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    h_GK, w_GK = randn(group, k), randn(group, k).abs() / k
    row: dict = {"G": group, "ranks": ranks, "E": num_experts // ranks, "K": k, "D": d}
    for rank in range(ranks):
        local_GK, ranges = rank_setup(ids32_GK, num_experts, ranks, rank)
        table = randn(num_experts // ranks, d, dtype=torch.bfloat16)
        row.update({f"rank{rank}_{key}": v for key, v in count_stats(*ranges[1:]).items()})
        outs = {}
        for form, w in (("fwd", w_GK), ("dx", None)):
            for name, rng in (("masked", None), ("ranges", ranges)):
                out = torch.empty(group, d, device=device, dtype=torch.bfloat16)

                def run(_=None, t=table, i=local_GK, o=out, w=w, r=rng) -> None:
                    combine_rows(t, i, h_GK, o, w_TK=w, ranges=r)

                row[f"rank{rank}_{form}_{name}_ms"] = time_ms(run)
                run()
                outs[form, name] = out.float()
            diff = (outs[form, "ranges"] - outs[form, "masked"]).abs().max().item()
            row[f"rank{rank}_{form}_max_abs_diff"] = diff
        # The whole routing pass (local ids, ranges, counters, the order): the fused kernel
        # and the PyTorch ops it replaced.
        for backend in ("triton", "torch"):
            row[f"rank{rank}_ranges_setup_{backend}_ms"] = time_ms(
                lambda _, r=rank, b=backend: rank_setup(ids32_GK, num_experts, ranks, r, b)
            )
    table = randn(num_experts, d, dtype=torch.bfloat16)
    ids_TK, out = ids_GK[:tokens].contiguous(), torch.empty(tokens, d, device=device).bfloat16()
    h_TK, w_TK = h_GK[:tokens].contiguous(), w_GK[:tokens].contiguous()
    row["one_gpu_fwd_ms"] = time_ms(lambda _: combine_rows(table, ids_TK, h_TK, out, w_TK=w_TK))
    row["one_gpu_dx_ms"] = time_ms(lambda _: combine_rows(table, ids_TK, h_TK, out))
    return row


def print_table(rows: list[dict]) -> None:
    """One markdown line per rank's id block: ms of the masked and the ranged combines."""
    print(
        "\n| rows combine G, E, K, D | rank | pairs/token (tile max: consecutive, sorted) | "
        "fwd masked | fwd ranges | dx masked | dx ranges | routing pass: kernel, torch ops | "
        "one GPU fwd, dx |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for rank in range(r["ranks"]):
            p = f"rank{rank}_"
            print(
                f"| {r['G']}, {r['E']}, {r['K']}, {r['D']} | {rank} | "
                f"{r[p + 'count_mean']:.1f} +- {r[p + 'count_std']:.1f} "
                f"({r[p + 'tile_max_consecutive']:.1f}, {r[p + 'tile_max_sorted']:.1f}) | "
                f"{r[p + 'fwd_masked_ms']:.3f} | {r[p + 'fwd_ranges_ms']:.3f} | "
                f"{r[p + 'dx_masked_ms']:.3f} | {r[p + 'dx_ranges_ms']:.3f} | "
                f"{r[p + 'ranges_setup_triton_ms']:.3f}, {r[p + 'ranges_setup_torch_ms']:.3f} | "
                f"{r['one_gpu_fwd_ms']:.3f}, {r['one_gpu_dx_ms']:.3f} |"
            )
