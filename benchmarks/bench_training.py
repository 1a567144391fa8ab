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

The embedding is sized to the tokenizer (``model.vocab_size=null``, 4096 entries on the embedded
corpus) as in the earlier measurements in docs/benchmarks.md, not to the paper's 128,256.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from runs import compose, device_name, markdown_table, run_trainer, steady_state

# Per-GPU micro-batch that fits each scale on one 80+ GB GPU at seq 1024.
MICRO_BATCH = {"a80m": 16, "a200m": 8}


def dense_width(shared: int, top_k: int) -> int:
    """Dense MLP width with the OmniMoE layer's active weights: shared + 2K/3, rounded to 64."""
    return int(round((shared + 2 * top_k / 3) / 64)) * 64


def cases(scale: str) -> list[tuple[str, list[str]]]:
    m = compose([f"model={scale}"]).model
    dense = ["model.mlp=dense", f"model.ffn_hidden_size={dense_width(m.ffn_hidden_size, m.top_k)}"]
    return [
        ("omnimoe", []),
        ("omnimoe, statistics off", ["trainer.expert_stats=false"]),
        (f"dense (ffn {dense_width(m.ffn_hidden_size, m.top_k)})", dense),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", nargs="+", default=["a80m", "a200m"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-interval", type=int, default=5)
    ap.add_argument("--global-batch", type=int, default=128, help="sequences of 1024 per step")
    ap.add_argument("--max-bytes", type=int, default=3_000_000, help="corpus text prepared")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--runs-dir", default="outputs/bench_training")
    ap.add_argument("--override", action="append", default=[], help="extra key=value, every run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    results = []
    for scale in args.scales:
        common = [
            f"model={scale}", "model.vocab_size=null", "data.seq_len=1024",
            f"data.micro_batch_size={MICRO_BATCH.get(scale, 8)}",
            f"data.global_batch_size={args.global_batch}", f"data.max_bytes={args.max_bytes}",
            f"trainer.max_steps={args.steps}", f"trainer.log_interval={args.log_interval}",
            f"trainer.eval_interval={10 * args.steps}", "trainer.eval_iters=1",
            "optim.warmup_steps=5", "trainer.progress=false", "logging=disabled",
            "checkpoint.save_final=false", "checkpoint.resume=null", *args.override,
        ]  # fmt: skip
        for name, extra in cases(scale):
            run_dir = Path(args.runs_dir) / f"{scale}-{name.split()[0]}-{len(results)}"
            result = run_trainer(common + extra, run_dir, timeout_s=args.timeout)
            row = {"scale": scale, "case": name, "status": result.status, **steady_state(result)}
            results.append(row)
            print(json.dumps(row), flush=True)

    table_rows = []
    for row in results:
        ref = next(
            (r for r in results if r["scale"] == row["scale"] and r["case"].startswith("dense")),
            None,
        )
        ratio = mem = ""
        if ref and ref.get("step_ms") and row.get("step_ms"):
            ratio = f"{row['step_ms'] / ref['step_ms']:.2f}x"
            mem = f"{row['peak_memory_gib'] / ref['peak_memory_gib']:.2f}x"
        mfu = row.get("mfu")
        table_rows.append(
            [
                row["scale"], row["case"], f"{row.get('tokens_per_s') or 0:,.0f}",
                f"{row.get('step_ms') or 0:.0f}", ratio,
                f"{row.get('peak_memory_gib') or 0:.1f}", mem, f"{row.get('tflops') or 0:.0f}",
                f"{100 * mfu:.1f}%" if mfu is not None else "", row["status"][:30],
            ]
        )  # fmt: skip
    header = ["scale", "model", "tokens/s", "step ms", "step vs dense", "peak GiB",
              "memory vs dense", "TFLOP/s", "MFU", "status"]  # fmt: skip
    print(f"{device_name()}, {time.strftime('%Y-%m-%d')}: python {' '.join(sys.argv)}")
    print(markdown_table(header, table_rows))
    if args.json:
        meta = {"device": device_name(), "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
