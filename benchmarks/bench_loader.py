"""Training-loader throughput: samples/s and tokens/s of ``TokenShardLoader`` at a80m shapes.

It builds a synthetic dataset (random token ids, ``seq_len`` 1024, uint16, 1024 samples per
shard, as ``omnimoe-data prepare`` writes) unless ``--data`` names a prepared one (a folder
or any webdataset URL, e.g. ``pipe:cat /data/corpus/{name}``), then times one data-parallel
rank's loader in the global order (global batch 128) for each worker count. The first pass
("cold") includes the one-time sha256 check of every shard the rank touches; the second
("warm") is the steady state. Compare the warm tokens/s with the trainer's ``tokens_per_s``
at a80m divided by the data-parallel size: the loader keeps the GPU fed when it is several
times larger (with workers, batches are prepared while the GPU computes).

Run: ``python benchmarks/bench_loader.py [--workers 0 2 4] [--dp 1] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from omnimoe_data.loader import TokenShardLoader
from omnimoe_data.shards import MANIFEST_NAME, ShardWriter


def synthetic_dataset(root: Path, samples: int, seq_len: int, per_shard: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = ShardWriter(root, "train", samples_per_shard=per_shard, dtype=np.dtype("<u2"))
    for _ in range(samples):
        writer.write(rng.integers(0, 32000, seq_len + 1, dtype=np.uint16))
    shards = writer.close()
    manifest = {
        "format": "omnimoe-tokens",
        "version": 2,
        "seq_len": seq_len,
        "sample_len": seq_len + 1,
        "dtype": "uint16",
        "vocab_size": 32000,
        "eod_id": 0,
        "tokenizer_sha256": "synthetic",
        "splits": {"train": {"shards": shards, "samples": samples}},
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def time_loader(data: str, args: argparse.Namespace, workers: int, cache: Path) -> dict:
    loader = TokenShardLoader(
        data,
        "train",
        args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        dp_rank=0,
        dp_size=args.dp,
        seed=1,
        num_workers=workers,
        cache_dir=cache,
    )
    per_step = args.global_batch_size // args.dp // args.micro_batch_size
    result = {"workers": workers}
    for phase in ("cold", "warm"):
        start = time.perf_counter()
        rows = 0
        for _ in range(args.steps * per_step):
            rows += len(next(loader))
        seconds = time.perf_counter() - start
        result[f"{phase}_samples_per_s"] = rows / seconds
        result[f"{phase}_tokens_per_s"] = rows * args.seq_len / seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a prepared dataset (folder or URL); default: synthetic")
    parser.add_argument("--samples", type=int, default=16384, help="synthetic dataset size")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--global-batch-size", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (rank 0 timed)")
    parser.add_argument("--steps", type=int, default=20, help="global batches per phase")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(
            synthetic_dataset(Path(tmp) / "data", args.samples, args.seq_len, 1024)
        )
        results = []
        for workers in args.workers:
            r = time_loader(data, args, workers, Path(tmp) / "cache")
            results.append(r)
            print(
                f"workers {workers}: cold {r['cold_samples_per_s']:,.0f} samples/s "
                f"({r['cold_tokens_per_s']:,.0f} tokens/s), warm {r['warm_samples_per_s']:,.0f} "
                f"samples/s ({r['warm_tokens_per_s']:,.0f} tokens/s) per rank "
                f"(dp {args.dp}, global batch {args.global_batch_size}, seq {args.seq_len})",
                flush=True,
            )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    summary = {"args": vars(args) | {"json": str(args.json)}, "load_1min": load, "runs": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
