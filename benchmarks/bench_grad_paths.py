"""Compare the two weight-gradient paths of the atomic experts on one GPU, and the layer.

Shapes: T tokens, d hidden, N experts, K experts per token, P = T * K pairs; bf16 rows and
tables, fp32 routing weights, uniform random routing (as ``bench_kernels.py``). Per shape:

- ``pairs ms``: ``experts_grad.expert_grads`` (the segmented pair kernel, with its offsets and
  zero rows) from expert-sorted pairs; the sort is left out (the backward needs it anyway);
  once per variant: the "runs" schedule, the "experts" one, and the "experts" one with hot
  blocks split at each ``--segment-pairs`` S (``experts_grad_blocks.SEGMENT_PAIRS``);
- ``dense ms``: ``experts_dense_grad.dense_table_grads`` (G build + GEMMs, chunked over N
  above ``DENSE_MAX_BYTES``), with the extra memory it allocates (MiB, peak over the call);
- the cost model's two predictions and ``auto``'s choice (``choose_grad_path``);
- ``fb auto / dense / pairs``: ``atomic_experts`` forward + backward with each ``grad_path``
  ("auto" resolved from the owned pairs, as ``rows_dispatch`` does; "pairs" once per schedule).
Rows with an owned share below 1 stand for the expert-parallel ``rows`` layout: the group's
pairs, the others marked "no expert". ``--zipf A`` draws the ids from a Zipf law instead
(P(expert of rank r) ~ (r + 1)^-A over a random order of the experts; A = 0.45 at a80m's N
gives a load imbalance, busiest expert over the mean, of ~27, what a80m's router reached
within 20 training steps); each row reports its imbalance.

Times are medians of CUDA-graph replays (``bench_kernels.graph_time``). The last lines give the
constants the measurements imply (``PAIR_COLUMN_S`` and the dense path's effective TFLOP/s),
to refit the cost model.
Run: ``python benchmarks/bench_grad_paths.py --json grad_paths.json`` (table + JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from collections.abc import Iterator

import torch
from bench_kernels import expert_inputs, fmt, graph_time  # the script's folder is on sys.path

import omnimoe_kernels
from omnimoe_kernels import experts_dense_grad as dense
from omnimoe_kernels import experts_grad, experts_grad_blocks
from omnimoe_kernels.experts_autograd import expert_order
from omnimoe_kernels.experts_grad import expert_grads

CONFIGS = [  # T, d, N, K, owned share of the pairs (the rest carry id N, "no expert")
    (16384, 768, 5776, 64, 1.0),  # a80m, one GPU
    (32768, 768, 2888, 64, 0.5),  # a80m under rows EP = 2: the group's pairs, half owned
    (16384, 1024, 4096, 16, 1.0),
    (16384, 1024, 16384, 64, 1.0),
    (16384, 1024, 65536, 16, 1.0),
    (4096, 1024, 102400, 512, 1.0),
]


#: Zipf exponent of the routing (0: uniform), set from ``--zipf``.
ZIPF = 0.0


def _inputs(T: int, d: int, N: int, K: int, owned: float) -> tuple:
    """``bench_kernels.expert_inputs`` with a (1 - owned) share of the ids set to N, and the
    ids drawn from the Zipf law of exponent ``ZIPF`` when it is not 0."""
    x, up, down, w, idx, dy = expert_inputs(T, d, N, K)
    if ZIPF:
        probs = (torch.arange(N, device="cuda") + 1.0) ** -ZIPF
        ranks = torch.multinomial(probs, T * K, replacement=True)
        idx = torch.randperm(N, device="cuda")[ranks].view(T, K)
    idx = idx.masked_fill(torch.rand(T, K, device="cuda") >= owned, N)
    return x, up, down, w, idx, dy


def _imbalance(idx_TK: torch.Tensor, N: int) -> float:
    """Pairs of the busiest expert over the mean pairs per expert (ids N excluded)."""
    counts = torch.bincount(idx_TK.flatten(), minlength=N + 1)[:N].float()
    return (counts.max() / counts.mean().clamp_min(1e-9)).item()


def _grad_inputs(T: int, d: int, N: int, K: int, owned: float) -> dict:
    x, _, _, _, idx, dy = _inputs(T, d, N, K, owned)
    g = torch.randn(T, K, device="cuda")
    h = torch.randn(T, K, device="cuda")
    w = torch.rand(T, K, device="cuda")
    key_P, order_P, base = expert_order(idx, N)
    e_P = key_P.to(torch.int32) + base
    return {"x": x.detach(), "dy": dy, "idx": idx, "g": g, "h": h, "w": w, "e": e_P, "o": order_P}


#: Pair-kernel variants timed: (schedule, SEGMENT_PAIRS); ``--segment-pairs`` adds more.
VARIANTS = [("runs", 0), ("experts", 0)]


@contextlib.contextmanager
def _variant(schedule: str, segment: int) -> Iterator[None]:
    """``experts_grad.GRAD_SCHEDULE`` and ``experts_grad_blocks.SEGMENT_PAIRS`` for the body."""
    saved = experts_grad.GRAD_SCHEDULE, experts_grad_blocks.SEGMENT_PAIRS
    experts_grad.GRAD_SCHEDULE, experts_grad_blocks.SEGMENT_PAIRS = schedule, segment
    try:
        yield
    finally:
        experts_grad.GRAD_SCHEDULE, experts_grad_blocks.SEGMENT_PAIRS = saved


def _suffix(schedule: str, segment: int) -> str:
    """Key suffix of a variant; the "runs" schedule keeps the old names ("pairs_ms")."""
    if schedule == "runs":
        return ""
    return f"_{schedule}" + (f"_s{segment}" if segment else "")


def _extra_mib(fn) -> float:
    """Peak memory a call allocates beyond what is live before it (MiB)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_shape(T: int, d: int, N: int, K: int, owned: float) -> dict:
    row = {"T": T, "d": d, "N": N, "K": K, "owned": owned}
    real = int(T * K * owned)
    row["model_dense_ms"] = dense.dense_cost_s(T, N, d) * 1e3
    row["model_pairs_ms"] = dense.pairs_cost_s(real, d) * 1e3
    cuda = torch.device("cuda")
    row["auto"] = dense.choose_grad_path("auto", T, N, d, K, torch.bfloat16, cuda, pairs=real)
    a = _grad_inputs(T, d, N, K, owned)
    row["imbalance"] = _imbalance(a["idx"], N)
    dup = torch.empty(N, d, device="cuda", dtype=torch.bfloat16)
    ddown = torch.empty_like(dup)

    def pairs(_i=0):
        expert_grads(
            a["x"], a["dy"], a["o"], a["e"], a["h"], a["w"], a["g"], dup, ddown, K,
            deterministic=False,
        )  # fmt: skip

    def dense_path(_i=0):
        dense.dense_table_grads(
            a["x"], a["dy"], a["idx"], a["g"], a["h"], a["w"], N, dtype=torch.bfloat16
        )

    timed = [(f"pairs{_suffix(*v)}", v, pairs) for v in VARIANTS]
    for name, variant, fn in [*timed, ("dense", VARIANTS[0], dense_path)]:
        try:
            with _variant(*variant):
                row[f"{name}_mib"] = _extra_mib(fn)
                row[f"{name}_ms"] = graph_time(fn, 1)
        except torch.OutOfMemoryError:
            row[f"{name}_ms"] = row[f"{name}_mib"] = None
        torch.cuda.empty_cache()
    a.clear()  # free the inputs before the layer runs
    sets = [_inputs(T, d, N, K, owned)]
    runs = [("auto", VARIANTS[1]), ("dense", VARIANTS[1])]
    runs += [("pairs", v) for v in VARIANTS]
    for path, variant in runs:
        # "auto" as the rows layout resolves it (from the owned pairs), as chosen above.

        def step(i, p=row["auto"] if path == "auto" else path):
            x, up, down, w, idx, gy = sets[i]
            y = omnimoe_kernels.atomic_experts(x, up, down, w, idx, grad_path=p)
            torch.autograd.grad(y, (x, up, down, w), gy)

        key = f"fb_{path}{_suffix(*variant) if path == 'pairs' else ''}_ms"
        try:
            with _variant(*variant):
                row[key] = graph_time(step, 1)
        except torch.OutOfMemoryError:
            row[key] = None
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench_grad_paths.json")
    ap.add_argument("--quick", action="store_true", help="first two shapes only")
    ap.add_argument("--zipf", type=float, default=0.0, help="routing skew (0: uniform)")
    ap.add_argument(
        "--segment-pairs", type=int, nargs="*", default=[],
        help="also time the experts schedule with hot blocks split at these S",
    )  # fmt: skip
    args = ap.parse_args()
    global ZIPF
    ZIPF = args.zipf
    VARIANTS.extend(("experts", s) for s in args.segment_pairs if s > 0)
    from runs import require_cuda  # the script's folder is on sys.path

    require_cuda("bench_grad_paths.py")
    torch.manual_seed(0)
    out = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "dense_max_bytes": dense.DENSE_MAX_BYTES,
        "zipf": ZIPF,
        "variants": VARIANTS,
        "rows": [],
    }
    for cfg in CONFIGS[:2] if args.quick else CONFIGS:
        out["rows"].append(bench_shape(*cfg))
        print("grad_paths", out["rows"][-1], flush=True)
        with open(args.json, "w") as f:  # rewritten per row: a cut-short run keeps its numbers
            json.dump(out, f, indent=1)

    print_tables(out)


def _label(schedule: str, segment: int) -> str:
    return schedule + (f", split at {segment}" if segment else "")


def print_tables(out: dict) -> None:
    """The markdown table (ms; the cost model's prediction in brackets) and the constants the
    measurements imply."""
    variants = [tuple(v) for v in out["variants"]]
    print(f"\n{out['device']}, {out['date']}, zipf {out['zipf']}")
    names = [f"pairs {_label(*v)}" for v in variants] + ["dense (model)", "dense MiB", "auto"]
    names += ["fb auto", "fb dense"] + [f"fb pairs {_label(*v)}" for v in variants]
    print("| T, d, N, K, owned | imbalance | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for r in out["rows"]:
        cells = [fmt(r.get(f"pairs{_suffix(*v)}_ms")) for v in variants]
        cells[0] += f" ({r['model_pairs_ms']:.3f})"
        cells += [f"{fmt(r['dense_ms'])} ({r['model_dense_ms']:.3f})", fmt(r["dense_mib"], 0)]
        cells += [r["auto"], fmt(r["fb_auto_ms"]), fmt(r["fb_dense_ms"])]
        cells += [fmt(r.get(f"fb_pairs{_suffix(*v)}_ms")) for v in variants]
        shape = f"{r['T']}, {r['d']}, {r['N']}, {r['K']}, {r['owned']}"
        print(f"| {shape} | {r['imbalance']:.1f} | " + " | ".join(cells) + " |")
    for r in out["rows"]:
        real = r["T"] * r["K"] * r["owned"] * r["d"]
        per = [f"{_label(*v)} {r[k] * 1e-3 / real:.3g}" for v in variants
               if r.get(k := f"pairs{_suffix(*v)}_ms")]  # fmt: skip
        tflops = (
            8 * r["T"] * r["N"] * r["d"] / (r["dense_ms"] * 1e-3) / 1e12 if r["dense_ms"] else 0
        )
        print(
            f"{r['T']}, {r['d']}, {r['N']}, {r['K']}: PAIR_COLUMN_S {', '.join(per)} s; dense "
            f"{tflops:.0f} TFLOP/s effective (G build and memset included)"
        )


if __name__ == "__main__":
    main()
