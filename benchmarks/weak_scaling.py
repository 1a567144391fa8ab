"""Weak scaling from 1 to N GPUs at the same per-GPU batch: tokens/s, MFU, memory per layout.

For each GPU count (default: 1 and every visible GPU) it runs the trainer under ``torchrun``
for plain data parallelism and, on more than one GPU, expert parallelism (rows and dim tables),
tensor + sequence parallelism and pipeline parallelism, each at the largest size of that kind
the model's shape allows on that many GPUs (the rest is data parallel), with the global batch
``per_gpu_batch x GPUs`` sequences. From each run's ``metrics.jsonl`` it reports tokens/s per
GPU early (the first logging window after the first, which holds compilation) and late (the last
window), the scaling efficiency against one GPU, MFU and peak memory; a markdown table goes to
stdout and everything to ``--json``.

Throughput on a shared host drifts by ~10% between runs minutes apart, so ``--repeats R`` runs
the layouts R times in rotated order (round r starts at layout r) and compares each run with the
data-parallel run of its own round; the summary gives the median over rounds of tokens/s and of
that ratio, beside the spread.

    python benchmarks/weak_scaling.py --json weak.json                 # 1 and all GPUs
    python benchmarks/weak_scaling.py --gpus 1 2 4 8 --steps 40 --json weak.json
    python benchmarks/weak_scaling.py --gpus 2 --layouts dp ep_rows ep_dim --repeats 3
    python benchmarks/weak_scaling.py --model wide8b --gpus 2 --layouts ep_rows \\
        --extra parallel.distributed_optimizer=true                  # the table-sharding model

MFU is what the trainer logs: active-parameter training FLOPs per token (the count of
``omnimoe-params``, ``omnimoe_train.model.accounting``) over the device's bf16 peak. The embedding
is sized to the tokenizer (``model.vocab_size=null``) as in the earlier measurements.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from runs import device_name, run_trainer, steady_state  # the script's folder is on sys.path

from omnimoe_train.parallel.layout import LayoutError, ParallelLayout, validate_layout

LAYOUTS = ("dp", "ep_rows", "ep_dim", "tp_sp", "pp")


def model_shape(model: str, overrides: list[str]) -> dict:
    """The resolved model config (Hydra composition, as the trainer sees it)."""
    from hydra import compose, initialize_config_module

    from omnimoe_train.cli import to_root_config
    from omnimoe_train.config import register_configs

    register_configs()
    with initialize_config_module(config_module="omnimoe_conf", version_base="1.3"):
        cfg = to_root_config(
            compose(config_name="config", overrides=[f"model={model}", *overrides])
        )
    return {"model": cfg.model, "data": cfg.data}


def layout_overrides(kind: str, gpus: int, m) -> tuple[list[str], str] | None:  # noqa: ANN001
    """CLI overrides for the largest valid ``kind`` layout on ``gpus`` GPUs (None: none fits)."""
    if kind == "dp":
        return ["parallel=single"], f"dp{gpus}"
    shape = dict(
        num_layers=m.num_layers,
        num_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        num_experts=m.num_experts,
        hidden_size=m.hidden_size,
    )
    for size in sorted((s for s in range(2, gpus + 1) if gpus % s == 0), reverse=True):
        if kind.startswith("ep"):
            mode = kind.split("_")[1]
            layout = ParallelLayout(gpus, ep=size, expert_table_sharding=mode)
            args = [
                "parallel=single",
                f"parallel.ep={size}",
                f"parallel.expert_table_sharding={mode}",
            ]
            name = f"ep{size}_{mode}"
        elif kind == "tp_sp":
            layout = ParallelLayout(gpus, tp=size, sequence_parallel=True)
            args = ["parallel=tp2_sp", f"parallel.tp={size}"]
            name = f"tp{size}_sp"
        else:
            layout = ParallelLayout(gpus, pp=size)
            args = ["parallel=pp2", f"parallel.pp={size}"]
            name = f"pp{size}"
        try:
            validate_layout(layout, **shape)
        except LayoutError:
            continue
        dp = gpus // (layout.tp * layout.pp)
        return args, name + (f"_dp{dp}" if dp > 1 and not kind.startswith("ep") else "")
    return None


def rotated(items: list[str], shift: int) -> list[str]:
    """``items`` rotated left by ``shift``: each round starts at another layout, so a drift of
    the machine over the call does not always favour the same one."""
    shift %= max(1, len(items))
    return list(items[shift:]) + list(items[:shift])


def finished(row: dict) -> bool:
    """A run that exited 0 and logged throughput (a crashed or timed-out run may have logged
    some windows: they are in its row, not in the comparisons)."""
    return row.get("status") == "ok" and "tokens_per_s_per_gpu" in row


def add_ratios_vs_dp(rows: list[dict]) -> None:
    """Set ``ratio_vs_dp`` on each finished row whose round has a finished data-parallel run
    on as many GPUs: expert parallelism's target is relative to plain data parallelism."""
    dp_tokens = {
        (r["round"], r["gpus"]): r["tokens_per_s_per_gpu"]
        for r in rows
        if r["layout"].startswith("dp") and finished(r)
    }
    for r in rows:
        if finished(r) and (r["round"], r["gpus"]) in dp_tokens:
            r["ratio_vs_dp"] = r["tokens_per_s_per_gpu"] / dp_tokens[r["round"], r["gpus"]]


def summarize(rows: list[dict]) -> list[dict]:
    """Per (GPUs, layout): the runs that finished, their median tokens/s per GPU, and the
    median, min and max ratio to the data-parallel run of the same round over the rounds that
    have one (``runs_vs_dp``). None where there is no such run (a layout that never ran or
    never finished): no number is made up."""
    out = []
    for key in dict.fromkeys((r["gpus"], r["layout"]) for r in rows):
        done = [r for r in rows if (r["gpus"], r["layout"]) == key and finished(r)]
        ratios = sorted(r["ratio_vs_dp"] for r in done if "ratio_vs_dp" in r)
        tokens = [r["tokens_per_s_per_gpu"] for r in done]
        out.append(
            {
                "gpus": key[0],
                "layout": key[1],
                "runs": len(done),
                "runs_vs_dp": len(ratios),
                "median_tokens_per_s_per_gpu": statistics.median(tokens) if tokens else None,
                "median_ratio_vs_dp": statistics.median(ratios) if ratios else None,
                "ratio_vs_dp_min": ratios[0] if ratios else None,
                "ratio_vs_dp_max": ratios[-1] if ratios else None,
            }
        )
    return out


def summary_table(summary: list[dict]) -> str:
    """The markdown table of :func:`summarize`'s rows ("–" where there is no number)."""

    def number(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    lines = [
        "| GPUs | layout | runs | median tok/s/GPU | median vs DP | min–max vs DP |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        spread = (
            f"{s['ratio_vs_dp_min']:.2f}–{s['ratio_vs_dp_max']:.2f}" if s["runs_vs_dp"] else "–"
        )
        lines.append(
            f"| {s['gpus']} | {s['layout']} | {s['runs']} "
            f"| {number(s['median_tokens_per_s_per_gpu'], ',.0f')} "
            f"| {number(s['median_ratio_vs_dp'], '.2f')} | {spread} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=None)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--model", default="a80m")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--per-gpu-batch", type=int, default=128, help="sequences per GPU per step")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--max-bytes", type=int, default=3_000_000, help="corpus text prepared")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--extra", nargs="*", default=[], help="more trainer overrides")
    parser.add_argument("--runs-dir", default="outputs/weak_scaling")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds of every layout, in rotated order"
    )
    args = parser.parse_args()
    if args.repeats < 1:  # zero rounds would run nothing and print empty tables
        parser.error(f"--repeats must be >= 1 (got {args.repeats})")

    import torch

    gpu_counts = args.gpus or sorted({1, max(1, torch.cuda.device_count())})
    shape = model_shape(args.model, [f"data.seq_len={args.seq_len}", *args.extra])
    m = shape["model"]
    common = [
        f"model={args.model}", "model.vocab_size=null", f"data.seq_len={args.seq_len}",
        f"data.micro_batch_size={args.micro_batch}", f"data.max_bytes={args.max_bytes}",
        f"trainer.max_steps={args.steps}", f"trainer.log_interval={args.log_interval}",
        f"trainer.eval_interval={10 * args.steps}", "trainer.eval_iters=1",
        f"optim.warmup_steps={min(5, args.steps - 1)}",
        "trainer.progress=false", "logging=disabled", "checkpoint.save_final=false",
        "checkpoint.resume=null", *args.extra,
    ]  # fmt: skip
    device = device_name()
    rows, baseline = [], None
    schedule = [
        (round_, gpus, kind)
        for round_ in range(args.repeats)
        for gpus in gpu_counts
        for kind in rotated(args.layouts, round_)
    ]
    for round_, gpus, kind in schedule:
        if gpus == 1 and kind != "dp":
            continue
        found = layout_overrides(kind, gpus, m)
        if found is None:
            rows.append(
                {"round": round_, "gpus": gpus, "layout": kind, "status": "no valid layout"}
            )
            continue
        layout_args, name = found
        run_dir = Path(args.runs_dir) / f"{gpus}gpu_{name}_{int(time.time())}"
        batch = [f"data.global_batch_size={args.per_gpu_batch * gpus}"]
        result = run_trainer(
            common + layout_args + batch, run_dir, gpus=gpus, timeout_s=args.timeout
        )
        row = {"round": round_, "gpus": gpus, "layout": name, "status": result.status}
        row["wall_s"] = result.wall_s
        if result.train:
            steady = steady_state(result)
            windows = [r["tokens_per_s"] / gpus for r in result.train]
            early = windows[1] if len(windows) > 1 else windows[0]
            late = windows[-1]
            row.update(
                tokens_per_s_per_gpu_early=early,
                tokens_per_s_per_gpu_late=late,
                tokens_per_s_per_gpu=steady["tokens_per_s"] / gpus,
                windows_per_gpu=windows,
                mfu=steady.get("mfu"),
                peak_memory_gib=steady["peak_memory_gib"],
                load_imbalance=steady.get("dispatch_load_imbalance"),
                loss_late=steady["loss"],
            )
            if gpus == 1 and kind == "dp" and finished(row):
                baseline = row["tokens_per_s_per_gpu"]
            if baseline:
                row["efficiency_vs_1gpu"] = row["tokens_per_s_per_gpu"] / baseline
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "windows_per_gpu"}), flush=True)

    add_ratios_vs_dp(rows)

    def ratio(r: dict, key: str) -> str:
        return f"{r[key]:.2f}" if key in r else "–"

    header = "| round | GPUs | layout | tok/s/GPU | early | late | vs 1 GPU | vs DP | MFU | peak GiB | status |"
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['gpus']} | {r['layout']} | {r.get('tokens_per_s_per_gpu', 0):,.0f} "
            f"| {r.get('tokens_per_s_per_gpu_early', 0):,.0f} "
            f"| {r.get('tokens_per_s_per_gpu_late', 0):,.0f} | {ratio(r, 'efficiency_vs_1gpu')} "
            f"| {ratio(r, 'ratio_vs_dp')} "
            f"| {100 * (r.get('mfu') or 0):.1f}% | {r.get('peak_memory_gib', 0):.1f} | {r['status'][:40]} |"
        )
    print("\n".join(lines))
    summary = summarize(rows)
    if args.repeats > 1:
        print("\n" + summary_table(summary))
    if args.json:
        meta = {
            "device": device, "date": time.strftime("%Y-%m-%d"), "command": sys.argv,
            "common": common,
        }  # fmt: skip
        Path(args.json).write_text(
            json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1)
        )


if __name__ == "__main__":
    main()
