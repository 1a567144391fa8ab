"""Side by side on one GPU: the six MLPs of the paper's Table 1 at one scale, equal active
parameters (conf/model/<scale>_<mlp>.yaml) and equal tokens; held-out loss and tokens/s.

Runs ``omnimoe-train model=<scale>_<mlp>`` once per method, one after another, with the same data,
batch, LR schedule and number of steps, then writes ``results.json`` and ``results.md`` (a
markdown table) to ``--out`` (default ``$OUT`` or ``compare-mlps``) and prints the table.

    source benchmarks/device_env.sh          # on a GPU machine without a registry
    python benchmarks/compare_mlps.py        # A80M, ~8-10 minutes on one H200 (estimate)

Budget (defaults, chosen without a GPU measurement of the baselines; see docs/benchmarks.md):
96 steps x 64 x 1024 tokens = 6.3M tokens per method. OmniMoE at A80M ran at ~140-150k tokens/s
and the dense model at ~300k on one H100/H200 (docs/benchmarks.md), i.e. ~45 s and ~20 s of
training; with ~30 s per run for start-up, model build and evaluation and a first-run data
preparation, six runs take about 8-10 minutes if the megatron MoE and product-key baselines run
at >= 100k tokens/s. ``--steps`` trades tokens for time; ``--run-timeout-s`` bounds each run.

Differences from the paper's setup (all methods share them): the embedded corpus (Python's
standard library, ~3M tokens, so the runs see it about twice; the held-out split is 5% of it),
its 4096-token tokenizer instead of the 128,256 vocabulary (embeddings are excluded from the
active counts, which stay equal), a 65k-token batch and a 10-step warmup with the last 20% of
the steps decaying (WSD), at the paper's A80M peak LR 3e-3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from runs import accounting, run_trainer, steady_state  # the script's folder is on sys.path

METHODS = ("dense", "gshard", "deepseekmoe", "pkm", "peer", "omnimoe")


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every method's run shares (on top of conf/model/<scale>_<mlp>.yaml)."""
    return [
        "model.vocab_size=null",
        "data.max_bytes=null",
        "data.val_fraction=0.05",
        f"data.seq_len={args.seq_len}",
        f"data.micro_batch_size={args.micro_batch}",
        f"data.global_batch_size={args.global_batch}",
        f"trainer.max_steps={args.steps}",
        f"optim.warmup_steps={args.warmup}",
        f"trainer.log_interval={args.log_interval}",
        f"trainer.eval_interval={args.steps}",
        f"trainer.eval_iters={args.eval_iters}",
        "trainer.progress=false",
        "logging=disabled",
        "checkpoint.save_final=false",
        *args.override,
    ]


def model_option(scale: str, method: str) -> str:
    return scale if method == "omnimoe" else f"{scale}_{method}"


def counts(scale: str, method: str, overrides: list[str]) -> dict:
    """Total / active parameters and FLOPs per token (``omnimoe-params``), counted with the
    paper's vocabulary as the scale tables are (the runs size the embedding to the tokenizer)."""
    return accounting(
        [f"model={model_option(scale, method)}", *overrides, "model.vocab_size=128256"]
    )


def markdown(rows: list[dict], command: str) -> str:
    head = (
        "| method | total params | active params | tokens | held-out loss | tokens/s | TFLOP/s "
        "| MFU | peak mem GiB | expert usage | unevenness | load imbalance |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def fmt(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | | | | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['total_params'] / 1e6:.1f}M | {r['active_params'] / 1e6:.1f}M "
            f"| {r['consumed_tokens'] / 1e6:.2f}M | {r['val_loss']:.4f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} "
            f"| {fmt(r.get('mfu'), '.1%')} | {r['peak_memory_gib']:.1f} "
            f"| {fmt(r.get('expert_usage'), '.3f')} | {fmt(r.get('unevenness'), '.3f')} "
            f"| {fmt(r.get('load_imbalance'), '.2f')} |"
        )
    return "\n".join([f"`{command}`", "", *lines, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", default="a80m", choices=("a80m", "a200m", "a680m", "a1_7b"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--log-interval", type=int, default=8)
    ap.add_argument("--eval-iters", type=int, default=16)
    ap.add_argument("--run-timeout-s", type=int, default=240)
    ap.add_argument("--out", default=os.environ.get("OUT", "compare-mlps"))
    ap.add_argument("--override", action="append", default=[], help="extra key=value for every run")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shared = run_overrides(args)
    command = "python benchmarks/compare_mlps.py " + " ".join(sys.argv[1:])
    rows = []
    started = time.perf_counter()
    for method in args.methods.split(","):
        run_dir = out / "runs" / method
        overrides = [f"model={model_option(args.scale, method)}", *shared]
        print(" ".join(overrides), flush=True)
        if args.dry_run:
            continue
        row = {"method": method, **counts(args.scale, method, shared)}
        result = run_trainer(
            overrides, run_dir, timeout_s=args.run_timeout_s, log_path=out / f"{method}.log"
        )
        if result.status == "ok":
            row.update(steady_state(result))
        else:
            row["error"] = f"{result.status.split(':')[0]} (see {method}.log)"
        row["wall_s"] = result.wall_s
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.dry_run:
        return
    total = time.perf_counter() - started
    (out / "results.json").write_text(
        json.dumps({"command": command, "wall_s": total, "runs": rows}, indent=2)
    )
    table = markdown(rows, command)
    (out / "results.md").write_text(table + f"\nwhole command: {total:.0f} s\n")
    print(table)
    print(f"whole command: {total:.0f} s")


if __name__ == "__main__":
    main()
