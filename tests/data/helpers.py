"""Helpers for the data-tool tests: tiny deterministic corpora and datasets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from omnimoe_data.shards import MANIFEST_NAME, ShardWriter, read_shard

# Non-ASCII words check that byte-level BPE round-trips any UTF-8.
_VOCABULARY = (
    "the model routes each token to a few experts and the experts share one large pool "
    "of parameters while the router learns which expert fits which token best ü ö ∑ 漢字"
)
WORDS = _VOCABULARY.split()

# Small settings keep each prepare() to a fraction of a second.
TINY = {"vocab_size": 300, "seq_len": 16, "samples_per_shard": 8}


def make_docs(n: int, seed: int = 0, words: int = 40) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))
        docs.append(f"Document {i}.\n{body}\n")
    return docs


def write_txt_folder(root: Path, docs: list[str]) -> Path:
    """One .txt file per document, named so that sorted order is document order."""
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        sub = root / f"part{i % 2}"  # a nested folder exercises the recursive walk
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:04d}.txt").write_text(doc, encoding="utf-8")
    return root


def sorted_txt_docs(root: Path) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.txt"))]


def split_samples(data_dir: Path, split: str) -> np.ndarray:
    manifest = json.loads((data_dir / MANIFEST_NAME).read_text())
    rows = [
        read_shard(data_dir / s["name"], dtype=manifest["dtype"], sample_len=manifest["sample_len"])
        for s in manifest["splits"][split]["shards"]
    ]
    return np.concatenate(rows) if rows else np.empty((0, manifest["sample_len"]), np.uint16)


def make_token_dataset(
    root: Path,
    shard_sizes: list[int],
    *,
    sample_len: int = 5,
    first_token: int = 0,
    vocab_size: int | None = None,
) -> Path:
    """A synthetic dataset whose sample ``i`` (global index, train then val) holds tokens
    ``first_token + i, +1, ...``, so a batch row names its sample by its first token.
    ``vocab_size`` defaults to the largest token + 1."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    start = first_token
    for split, sizes in (("train", shard_sizes), ("val", shard_sizes[:2])):
        writer = ShardWriter(root, split, samples_per_shard=10**9, dtype=np.dtype("<u2"))
        for size in sizes:
            for _ in range(size):
                writer.write(np.arange(start, start + sample_len))
                start += 1
            writer.close()  # ends the shard; the next write() starts a new one
        splits[split] = {"shards": writer.shards, "samples": sum(sizes)}
    manifest = {
        "format": "omnimoe-tokens",
        "version": 2,
        "seq_len": sample_len - 1,
        "sample_len": sample_len,
        "dtype": "uint16",
        "vocab_size": vocab_size or start + sample_len - 1,
        "eod_id": 0,
        "tokenizer_sha256": "synthetic",
        "splits": splits,
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root
