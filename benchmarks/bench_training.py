"""Training throughput on one GPU: OmniMoE against the dense model of equal active parameters.

For each scale (default ``a80m`` and ``a200m``) it trains, one after the other with the same data,
batch and steps: the OmniMoE model, the same model with its expert statistics off
(``trainer.expert_stats=false``, to show what they cost), and the dense SwiGLU model whose MLP
width is the shared width + 2K/3 rounded to 64 (same backbone; the K atomic experts a token reads
hold 2K x D weights, a SwiGLU column holds 3 x D). It reports tokens/s, step time, peak memory,
TFLOP/s and MFU (active-parameter FLOPs, the trainer's own count), the OmniMoE/dense step-time and
memory ratios, and writes a markdown table + JSON. ``profile_layer.py`` gives the per-op
breakdown of one layer.

    python benchmarks/bench_training.py --json training.json
    python benchmarks/bench_training.py --scales a80m --steps 40

``--variants`` measures the throughput levers instead (model/fusions.py, docs/throughput.md):
each of ``--models`` (omnimoe, dense) with the baseline, each lever alone and all of them
together, with each run's speed-up over its model's baseline:

    python benchmarks/bench_training.py --scales a80m --steps 20 --variants
    python benchmarks/bench_training.py --scales a80m --models dense --variants baseline compile

``--repeats R`` runs the whole list R times in turn (A B A B ...), so that a slow spell of the
host hits both models: the table gives each run's median and every round's OmniMoE/dense step
ratio (the dense model's speed moves by up to 20% between runs, docs/benchmarks.md).

``--profile-step N`` profiles step N of every run (``trainer.profile_step``) and adds the step's
device kernel time and its OmniMoE/dense ratio: what the GPU itself spends, which the host's
speed does not move (a graphed dense step at a80m leaves the GPU idle a quarter of the time).

The embedding is sized to the tokenizer (``model.vocab_size=null``, 4096 entries on the embedded
corpus) as in the earlier measurements in docs/benchmarks.md, not to the paper's 128,256.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from runs import compose, device_name, markdown_table, run_trainer, steady_state

# Per-GPU micro-batch that fits each scale on one 80+ GB GPU at seq 1024.
MICRO_BATCH = {"a80m": 16, "a200m": 8}


def liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


# Throughput levers (model/fusions.py) by variant name; "all" takes liger's cross-entropy when
# liger-kernel is installed, megatron's fused one otherwise.
LEVERS: dict[str, list[str]] = {
    "baseline": [],
    # The expert weight gradients on the segmented pair kernel instead of auto's choice (dense
    # GEMMs at a80m): what the cost model's choice buys.
    "grads_pairs": ["model.expert_grad_path=pairs"],
    # The expert weight gradients on the exact hi + lo split of each pair's coefficient instead
    # of one bf16 value (the default, model.expert_grad_coef): twice the GEMM / tensor-core work.
    "grads_split": ["model.expert_grad_coef=split"],
    # megatron's fused SwiGLU in an eager step (with the MLP graphs it is on by default).
    "fused_swiglu": ["model.fused_swiglu=true"],
    "ce_megatron": ["model.fused_cross_entropy=megatron"],
    "ce_liger": ["model.fused_cross_entropy=liger"],
    "compile": ["trainer.compile=layers"],
    # Each layer's MLP replayed from CUDA graphs (model/cuda_graphs.py): for host-bound steps;
    # model.fused_swiglu (null) turns on with them for OmniMoE.
    "cuda_graphs": ["trainer.cuda_graphs=mlp"],
    "cuda_graphs_unfused": ["trainer.cuda_graphs=mlp", "model.fused_swiglu=false"],
    # Both: inductor compiles each layer around its MLP, which replays its graph.
    "compile_graphs": ["trainer.compile=layers", "trainer.cuda_graphs=mlp"],
    "all": ["model.fused_swiglu=true", "model.fused_cross_entropy=liger", "trainer.compile=layers"],
}


def lever_overrides(variant: str) -> list[str]:
    if variant == "all" and not liger_installed():
        return [o.replace("=liger", "=megatron") for o in LEVERS["all"]]
    return LEVERS[variant]


def dense_width(shared: int, top_k: int) -> int:
    """Dense MLP width with the OmniMoE layer's active weights: shared + 2K/3, rounded to 64."""
    return int(round((shared + 2 * top_k / 3) / 64)) * 64


def cases(
    scale: str, variants: list[str] | None = None, models: tuple[str, ...] = ("omnimoe", "dense")
) -> list[tuple[str, str, str, list[str]]]:
    """(model, variant, display name, overrides) of each run at ``scale``: OmniMoE, OmniMoE
    without statistics and the matched dense model; or, with ``variants``, each of ``models``
    under each variant of :data:`LEVERS`."""
    m = compose([f"model={scale}"]).model
    width = dense_width(m.ffn_hidden_size, m.top_k)
    model_overrides = {
        "omnimoe": [],
        "dense": ["model.mlp=dense", f"model.ffn_hidden_size={width}"],
    }
    label = {"omnimoe": "omnimoe", "dense": f"dense (ffn {width})"}
    if variants is None:
        return [
            ("omnimoe", "baseline", "omnimoe", []),
            (
                "omnimoe",
                "statistics off",
                "omnimoe, statistics off",
                ["trainer.expert_stats=false"],
            ),
            ("dense", "baseline", label["dense"], model_overrides["dense"]),
        ]
    return [
        (model, v, f"{label[model]}, {v}", model_overrides[model] + lever_overrides(v))
        for model in models
        for v in variants
    ]


def short_status(status: str) -> str:
    """The table's status cell: "ok", "exit N" or "timeout" (the reason is printed below)."""
    return status.split(":", 1)[0] if status.startswith("exit") else status.split(" after")[0]


def dense_reference(variant: str) -> str:
    """The dense run an OmniMoE run is compared with: the same variant; the dense baseline for
    "statistics off" (a switch the dense model has no counterpart of)."""
    return "baseline" if variant == "statistics off" else variant


def same_case(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("scale", "model", "variant"))


def median_row(rows: list[dict]) -> dict:
    """One case over its rounds: the median of each measured number, the largest peak memory,
    the worst status ("ok" only when every round was)."""
    out = dict(rows[0])
    del out["round"]
    out["rounds"] = len(rows)
    out["status"] = next((r["status"] for r in rows if r["status"] != "ok"), "ok")
    for key in ("tokens_per_s", "step_ms", "tflops", "mfu", "kernel_ms"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    peaks = [r["peak_memory_gib"] for r in rows if r.get("peak_memory_gib") is not None]
    out["peak_memory_gib"] = max(peaks) if peaks else None
    return out


def round_ratios(runs: list[dict], key: str = "step_ms") -> list[str]:
    """ "scale variant: a, b, ... (median m)" of OmniMoE/dense ``key`` (step time; or
    ``kernel_ms``, the profiled step's kernel time), one ratio per round where both ran: the
    ratio from the same round is the one a host's slow spell cannot skew."""
    step = {(r["scale"], r["model"], r["variant"], r["round"]): r[key]
            for r in runs if r.get(key)}  # fmt: skip
    lines = []
    for scale, variant in sorted(
        {(r["scale"], r["variant"]) for r in runs if r["model"] == "omnimoe"}
    ):
        ref_variant = dense_reference(variant)
        ratios = [
            step[(scale, "omnimoe", variant, rnd)] / step[(scale, "dense", ref_variant, rnd)]
            for rnd in sorted({r["round"] for r in runs})
            if (scale, "omnimoe", variant, rnd) in step
            and (scale, "dense", ref_variant, rnd) in step
        ]
        if ratios:
            each = ", ".join(f"{x:.2f}" for x in ratios)
            lines.append(f"{scale} {variant}: {each} (median {statistics.median(ratios):.2f}x)")
    return lines


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", nargs="+", default=["a80m", "a200m"])
    ap.add_argument("--steps", type=positive_int, default=30)
    ap.add_argument("--log-interval", type=int, default=5)
    ap.add_argument("--global-batch", type=int, default=128, help="sequences of 1024 per step")
    ap.add_argument("--max-bytes", type=int, default=3_000_000, help="corpus text prepared")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--runs-dir", default="outputs/bench_training")
    ap.add_argument("--override", action="append", default=[], help="extra key=value, every run")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--repeats", type=positive_int, default=1,
        help="run the list this many times in turn; the table gives medians and each round's ratio",
    )  # fmt: skip
    ap.add_argument(
        "--variants", nargs="*", default=None, choices=list(LEVERS),
        help="measure the throughput levers (none named: all of them) instead of the default cases",
    )  # fmt: skip
    ap.add_argument(
        "--profile-step", type=positive_int, default=None,
        help="profile this step of every run: adds its GPU kernel time and the OmniMoE/dense ratio",
    )  # fmt: skip
    ap.add_argument(
        "--models", nargs="+", default=["omnimoe", "dense"], choices=["omnimoe", "dense"]
    )
    args = ap.parse_args()
    variants = args.variants
    if variants is not None:
        variants = variants or list(LEVERS)
        if not liger_installed() and "ce_liger" in variants:
            print("liger-kernel is not installed: skipping ce_liger; 'all' uses megatron's CE")
            variants.remove("ce_liger")

    results = []
    for scale in args.scales:
        common = [
            f"model={scale}", "model.vocab_size=null", "data.seq_len=1024",
            f"data.micro_batch_size={MICRO_BATCH.get(scale, 8)}",
            f"data.global_batch_size={args.global_batch}", f"data.max_bytes={args.max_bytes}",
            f"trainer.max_steps={args.steps}", f"trainer.log_interval={args.log_interval}",
            f"trainer.eval_interval={10 * args.steps}", "trainer.eval_iters=1",
            f"optim.warmup_steps={min(5, args.steps - 1)}", "trainer.progress=false",
            "logging=disabled",
            "checkpoint.save_final=false", "checkpoint.resume=null", *args.override,
        ]  # fmt: skip
        if args.profile_step is not None:
            common.append(f"trainer.profile_step={args.profile_step}")
        for rnd in range(args.repeats):
            for model, variant, name, extra in cases(scale, variants, tuple(args.models)):
                run_dir = (
                    Path(args.runs_dir) / f"{scale}-{model}-{variant.split()[0]}-{len(results)}"
                )
                result = run_trainer(common + extra, run_dir, timeout_s=args.timeout)
                row = {"scale": scale, "model": model, "variant": variant, "case": name,
                       "round": rnd, "overrides": extra, "status": result.status,
                       **steady_state(result)}  # fmt: skip
                results.append(row)
                print(json.dumps(row), flush=True)
    runs = results
    results = [
        median_row([r for r in runs if same_case(r, first)])
        for first in runs
        if first["round"] == 0
    ]

    def find(row: dict, **match: str) -> dict | None:  # among the medians
        keys = {"scale": row["scale"], "variant": row["variant"], "model": row["model"], **match}
        return next((r for r in results if all(r[k] == v for k, v in keys.items())), None)

    def ratio(row: dict, ref: dict | None, key: str, inverse: bool = False) -> str:
        if not (ref and ref.get(key) and row.get(key)):
            return ""
        return f"{(ref[key] / row[key]) if inverse else (row[key] / ref[key]):.2f}x"

    table_rows = []
    for row in results:
        dense_ref = find(row, model="dense", variant=dense_reference(row["variant"]))
        speedup = ratio(row, find(row, variant="baseline"), "step_ms", inverse=True)
        mfu = row.get("mfu")
        table_rows.append(
            [
                row["scale"], row["case"], f"{row.get('tokens_per_s') or 0:,.0f}",
                f"{row.get('step_ms') or 0:.0f}", ratio(row, dense_ref, "step_ms"),
                speedup, f"{row.get('peak_memory_gib') or 0:.1f}",
                ratio(row, dense_ref, "peak_memory_gib"), f"{row.get('tflops') or 0:.0f}",
                f"{100 * mfu:.1f}%" if mfu is not None else "", short_status(row["status"]),
            ]
        )  # fmt: skip
        if args.profile_step is not None:
            kernel = row.get("kernel_ms")
            table_rows[-1][5:5] = [
                f"{kernel:.0f}" if kernel else "",
                ratio(row, dense_ref, "kernel_ms"),
            ]
    header = ["scale", "model", "tokens/s", "step ms", "step vs dense", "speed-up vs baseline",
              "peak GiB", "memory vs dense", "TFLOP/s", "MFU", "status"]  # fmt: skip
    if args.profile_step is not None:
        header[5:5] = [f"GPU kernel ms (step {args.profile_step})", "GPU time vs dense"]
    print(f"{device_name()}, {time.strftime('%Y-%m-%d')}: python {' '.join(sys.argv)}")
    print(markdown_table(header, table_rows))
    if args.repeats > 1:
        print("\nmedians of the rounds; OmniMoE/dense step time in each round:")
        for line in round_ratios(runs):
            print(line)
        if args.profile_step is not None:
            print("OmniMoE/dense GPU kernel time of the profiled step in each round:")
            for line in round_ratios(runs, "kernel_ms"):
                print(line)
    for row in results:  # the table keeps one word per run; why a run failed comes here
        if row["status"] != "ok":
            print(f"\n{row['scale']} {row['case']}: {row['status']}")
    if args.json:
        meta = {"device": device_name(), "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}
        payload = {"meta": meta, "runs": results, "rounds": runs}
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
