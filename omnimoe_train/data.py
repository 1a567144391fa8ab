"""Glue between the trainer and ``omnimoe_data``: find or prepare the shards, build loaders.

Preparation runs on global rank 0 only; the other ranks wait at a barrier and then read the
finished dataset (its manifest is written last, so a dataset is either complete or absent).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from omnimoe_train.config import DataConfig


def cache_root() -> Path:
    base = os.environ.get("OMNIMOE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "omnimoe-train"
    )
    return Path(base)


def dataset_dir(d: DataConfig) -> Path:
    if d.dir is not None:
        return Path(d.dir).expanduser()
    tok = "tok" if d.tokenizer else f"v{d.vocab_size}"
    return cache_root() / "data" / f"{d.name}-{tok}-s{d.seq_len}-b{d.max_bytes or 'all'}"


def ensure_dataset(d: DataConfig, *, rank: int) -> Path:
    """Prepare the dataset unless a complete one already exists; returns its folder."""
    from omnimoe_data.prepare import is_prepared, prepare

    out = dataset_dir(d)
    if rank == 0 and not is_prepared(out, seq_len=d.seq_len):
        prepare(
            d.inputs,
            out,
            tokenizer=d.tokenizer,
            vocab_size=d.vocab_size,
            seq_len=d.seq_len,
            samples_per_shard=d.samples_per_shard,
            val_fraction=d.val_fraction,
            text_field=d.text_field,
            seed=d.seed,
            max_bytes=d.max_bytes,
        )
    if dist.is_initialized():
        dist.barrier()
    return out


def tokenizer_vocab_size(data_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(data_dir / "tokenizer.json")).get_vocab_size()
