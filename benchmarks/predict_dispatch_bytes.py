"""Print the markdown table of predicted expert-dispatch bytes for the paper scales.

Per layer, per rank, bf16 activations, fp32 routing weights and scores, N = 102,400 (320^2)
atomic experts, K = 512, uniform routing (pessimistic for rows), tokens per rank = the paper's
batch tokens / ranks. Reproduces the table in docs/parallelism.md:

    python benchmarks/predict_dispatch_bytes.py [--top-k 512] [--num-experts 102400]
"""

from __future__ import annotations

import argparse

from omnimoe_train.parallel.cost_model import choose_sharding, predict_bytes

# (scale, d_model, layers, batch tokens) from the paper's Table B.
PAPER_SCALES = [
    ("A80M", 768, 12, 128_000),
    ("A200M", 1024, 16, 192_000),
    ("A680M", 1536, 24, 392_000),
    ("A1.7B", 2048, 28, 1_000_000),
]


def markdown_table(top_k: int, num_experts: int, rank_counts: list[int], dtype_bytes: int) -> str:
    header = (
        "| scale | d | ranks | tokens/rank | rows fwd MB | rows bwd MB | E[dest ranks] "
        "| dim fwd MB | dim bwd MB | auto | auto GB/step (all layers) | gather fwd+bwd MB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for scale, d, layers, batch_tokens in PAPER_SCALES:
        for ranks in rank_counts:
            tokens = batch_tokens // ranks
            shape = dict(
                tokens=tokens,
                d=d,
                k=top_k,
                num_experts=num_experts,
                ranks=ranks,
                dtype_bytes=dtype_bytes,
            )
            choice, predicted = choose_sharding(**shape)
            rows, dim = predicted["rows"], predicted["dim"]
            step_gb = predicted[choice]["total"] * layers / 1e9
            gather = predict_bytes("gather", **shape)
            lines.append(
                f"| {scale} | {d} | {ranks} | {tokens:,} | {rows['forward'] / 1e6:,.1f} "
                f"| {rows['backward'] / 1e6:,.1f} | {rows['dest_ranks_per_token']:.2f} "
                f"| {dim['forward'] / 1e6:,.1f} | {dim['backward'] / 1e6:,.1f} | {choice} "
                f"| {step_gb:,.2f} | {gather['total'] / 1e6:,.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=512)
    parser.add_argument("--num-experts", type=int, default=320 * 320)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--dtype-bytes", type=int, default=2)
    args = parser.parse_args()
    print(markdown_table(args.top_k, args.num_experts, args.ranks, args.dtype_bytes))


if __name__ == "__main__":
    main()
