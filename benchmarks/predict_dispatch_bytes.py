"""Print the markdown table of predicted expert-dispatch bytes for the paper scales.

Per layer, per rank, bf16 activations, fp32 routing weights and scores, N = 102,400 (320^2)
atomic experts, K = 512, tokens per rank = the paper's batch tokens / ranks. ``rows`` and
``dim`` are the implemented modes (fixed sizes, routing-independent); ``rows_a2a`` (a
variable-split all-to-all under uniform routing) and ``gather`` (ZeRO-3 style table gathers) are
references. Reproduces the tables in docs/parallelism.md:

    python benchmarks/predict_dispatch_bytes.py [--top-k 512] [--num-experts 102400]
    python benchmarks/predict_dispatch_bytes.py --a80m      # the 2-GPU benchmark shape
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


def markdown_table(
    top_k: int,
    num_experts: int,
    rank_counts: list[int],
    dtype_bytes: int,
    scales: list[tuple[str, int, int, int]] = PAPER_SCALES,
    tokens_per_rank: int | None = None,
) -> str:
    """One row per (scale, ranks): bytes per layer per rank, tokens per rank = the scale's batch
    tokens / ranks (or ``tokens_per_rank``)."""
    header = (
        "| scale | d | ranks | tokens/rank | rows fwd MB | rows bwd MB | dim fwd MB "
        "| dim bwd MB | auto | auto GB/step (all layers) | rows_a2a fwd+bwd MB (E[dest]) "
        "| gather fwd+bwd MB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for scale, d, layers, batch_tokens in scales:
        for ranks in rank_counts:
            tokens = tokens_per_rank or batch_tokens // ranks
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
            a2a = predict_bytes("rows_a2a", **shape)
            lines.append(
                f"| {scale} | {d} | {ranks} | {tokens:,} | {rows['forward'] / 1e6:,.1f} "
                f"| {rows['backward'] / 1e6:,.1f} | {dim['forward'] / 1e6:,.1f} "
                f"| {dim['backward'] / 1e6:,.1f} | {choice} | {step_gb:,.2f} "
                f"| {a2a['total'] / 1e6:,.1f} ({a2a['dest_ranks_per_token']:.2f}) "
                f"| {gather['total'] / 1e6:,.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=512)
    parser.add_argument("--num-experts", type=int, default=320 * 320)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--dtype-bytes", type=int, default=2)
    parser.add_argument(
        "--a80m",
        action="store_true",
        help="a80m at the benchmark batch: K = 64, N = 76^2, 16 x 1024 tokens per rank, 2-8 ranks",
    )
    args = parser.parse_args()
    if args.a80m:
        # Per micro-batch of 16 x 1024 tokens (8 of them per rank per step); "GB/step" is per
        # micro-batch too here.
        scales = [("a80m, one micro-batch", 768, 12, 0)]
        table = markdown_table(
            64, 76 * 76, [2, 4, 8], args.dtype_bytes, scales=scales, tokens_per_rank=16 * 1024
        )
        print(table)
        return
    print(markdown_table(args.top_k, args.num_experts, args.ranks, args.dtype_bytes))


if __name__ == "__main__":
    main()
