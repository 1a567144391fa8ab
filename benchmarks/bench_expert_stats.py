"""Expert usage statistics on one GPU: what they add to each layer and micro-batch.

Issue 13 asks that the statistics (usage, unevenness, entropy) not cost a measurable share of
the step. Per layer and micro-batch a training forward adds the routing's T x K selections into
an N-vector of fp64 counts and the T token entropies into a sum (``model.expert_stats``). Two
ways to count, at the shapes of a80m (T = 16,384, K = 64, N = 5,776) and a200m (T = 8,192,
K = 128, N = 14,400):

- ``scatter``: ``ExpertStats.update``, an fp64 ``index_add_`` of T x K ones (the forward frame's
  path: PKM, PEER, the token-centric ablation, expert parallelism, the reference backend);
- ``sorted``: ``usage_counts.add_pair_counts`` on the expert-sorted ids (the OmniMoE Triton
  backward's path: the sort is there anyway) and ``ExpertStats.add_entropy``;
- ``searchsorted``: the same counts from ``torch.searchsorted`` of the N + 1 run bounds in the
  sorted ids (what the first version of that path did), and the entropy.

Ids are uniform or Zipf-skewed (P(rank r) ~ (r + 1)^-0.45 over a random order of the experts,
a load imbalance near the ~30 that a80m's router reaches in its first steps). Each time is one
CUDA graph of 96 calls (an a80m step: 12 layers x 8 micro-batches) replayed, divided by 96, the
median of triton's ``do_bench``; ``per step`` multiplies by the step's layer-micro-batches.
Run: ``python benchmarks/bench_expert_stats.py [--json stats.json]`` (table + JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from runs import require_cuda  # the script's folder is on sys.path
from triton.testing import do_bench

from omnimoe_kernels.usage_counts import add_pair_counts
from omnimoe_train.model.expert_stats import ExpertStats

CALLS = 96  # graph length: one a80m step's layer-micro-batches
SHAPES = {"a80m": (16384, 64, 76 * 76, 96), "a200m": (8192, 128, 120 * 120, 16 * 16)}


def _ids(T: int, K: int, N: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    if skew == 0.0:
        return torch.randint(0, N, (T, K), generator=gen, device="cuda")
    p = (torch.arange(N, device="cuda", dtype=torch.float64) + 1) ** -skew
    p = p[torch.randperm(N, generator=gen, device="cuda")]
    return torch.multinomial(p, T * K, replacement=True, generator=gen).view(T, K)


def _graph_ms(fn) -> float:  # noqa: ANN001
    """ms per call: ``fn`` CALLS times in one captured graph, replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    return do_bench(graph.replay, warmup=25, rep=200, return_mode="median") / CALLS


def measure(T: int, K: int, N: int, skew: float, gen: torch.Generator) -> dict:
    """µs per call of each way to count, on one draw of ids; checks they agree."""
    idx_TK = _ids(T, K, N, skew, gen).to(torch.int32)
    e_P = idx_TK.reshape(-1).sort().values
    entropy_T = torch.rand(T, device="cuda", generator=gen) * 8
    stats = ExpertStats(N).cuda()

    def sorted_counts() -> None:
        add_pair_counts(stats.counts_N, e_P)
        stats.add_entropy(entropy_T)

    bounds_N1 = torch.arange(N + 1, device="cuda", dtype=torch.int32)

    def searched_counts() -> None:
        stats.counts_N.add_(torch.searchsorted(e_P, bounds_N1).diff())
        stats.add_entropy(entropy_T)

    scatter_ms = _graph_ms(lambda: stats.update(idx_TK, entropy_T))
    sorted_ms = _graph_ms(sorted_counts)
    searched_ms = _graph_ms(searched_counts)
    stats.reset()
    sorted_counts()  # the same counts, or the comparison means nothing
    want = torch.bincount(idx_TK.reshape(-1).long(), minlength=N).double()
    assert torch.equal(stats.counts_N, want), "add_pair_counts disagrees with bincount"
    return {
        "imbalance": round((want.max() / want.mean()).item(), 1),
        "scatter_us": scatter_ms * 1e3,
        "sorted_us": sorted_ms * 1e3,
        "searchsorted_us": searched_ms * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    require_cuda("bench_expert_stats.py")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for scale, (T, K, N, per_step) in SHAPES.items():
        for skew in (0.0, 0.45):
            row = {"scale": scale, "T": T, "K": K, "N": N} | measure(T, K, N, skew, gen)
            row["scatter_ms_per_step"] = row["scatter_us"] * per_step / 1e3
            row["sorted_ms_per_step"] = row["sorted_us"] * per_step / 1e3
            rows.append(row)
    device = torch.cuda.get_device_name()
    print(f"{device}, {datetime.date.today()}: python benchmarks/bench_expert_stats.py")
    print("| scale | T, K, N | load imbalance | scatter µs | searchsorted µs | sorted µs "
          "| per step: scatter ms | per step: sorted ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scale']} | {r['T']}, {r['K']}, {r['N']} | {r['imbalance']} "
            f"| {r['scatter_us']:.1f} | {r['searchsorted_us']:.1f} | {r['sorted_us']:.1f} "
            f"| {r['scatter_ms_per_step']:.2f} | {r['sorted_ms_per_step']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "date": str(datetime.date.today()), "rows": rows}, f)


if __name__ == "__main__":
    main()
