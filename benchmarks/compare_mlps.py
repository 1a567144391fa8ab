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
import subprocess
import sys
import time
from pathlib import Path

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
    """Total / active parameters and FLOPs per token of the run's model (``omnimoe-params``)."""
    from omnimoe_train.config import register_configs
    from omnimoe_train.model.accounting import model_accounting
    from omnimoe_train.model.gpt import padded_vocab_size
    from omnimoe_train.params_cli import compose

    register_configs()
    # The runs size the embedding to the tokenizer; count the paper's vocabulary as the tables do.
    cfg = compose([f"model={model_option(scale, method)}", *overrides, "model.vocab_size=128256"])
    vocab = padded_vocab_size(cfg.model.vocab_size, cfg.parallel.tp)
    return model_accounting(cfg.model, seq_len=cfg.data.seq_len, vocab_size=vocab).summary()


def read_run(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    steady = train[1:] or train  # the first window includes compilation and warm-up

    def mean(key: str) -> float:
        values = [r[key] for r in steady if r.get(key) is not None]
        return sum(values) / max(1, len(values))

    last = train[-1]
    result = {
        "steps": last["step"],
        "tokens": last["consumed_tokens"],
        "val_loss": evals[-1]["val_loss"],
        "initial_val_loss": evals[0]["val_loss"],
        "train_loss": last["loss"],
        "tokens_per_s": mean("tokens_per_s"),
        "tflops": mean("tflops"),
        "peak_memory_gib": max((r.get("peak_memory_gib") or 0.0) for r in train),
    }
    if any("mfu" in r for r in steady):
        result["mfu"] = mean("mfu")
    for key in ("expert_usage", "unevenness", "load_imbalance", "router_entropy", "aux_loss"):
        if key in last:
            result[key] = last[key]
    return result


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
            f"| {r['tokens'] / 1e6:.2f}M | {r['val_loss']:.4f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} "
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
        cmd = [
            sys.executable,
            "-m",
            "omnimoe_train.cli",
            f"model={model_option(args.scale, method)}",
            *shared,
            f"hydra.run.dir={run_dir}",
        ]
        print(" ".join(cmd[2:]), flush=True)
        if args.dry_run:
            continue
        t0 = time.perf_counter()
        row = {"method": method, **counts(args.scale, method, shared)}
        with (out / f"{method}.log").open("w") as log:
            try:
                proc = subprocess.run(
                    cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.run_timeout_s
                )
                ok = proc.returncode == 0
                row["error"] = None if ok else f"exit {proc.returncode} (see {method}.log)"
            except subprocess.TimeoutExpired:
                row["error"] = f"over {args.run_timeout_s} s"
        if row["error"] is None:
            del row["error"]
            row.update(read_run(run_dir))
        row["wall_s"] = time.perf_counter() - t0
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
