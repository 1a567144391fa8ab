"""Evaluation on the validation split: the same mean loss for every parallel layout."""

from __future__ import annotations

import math
from typing import Any

import torch

from omnimoe_train.config import RootConfig
from omnimoe_train.distributed import Runtime
from omnimoe_train.engine.megatron import PAD_ID

#: ``summary["evaluation"]`` and the console's line when there is no validation split.
EVAL_OFF = "off: data.val_fraction=0"


def eval_microbatches_per_rank(num_batches: int, dp: int, multiple: int) -> int:
    """Micro-batches every rank runs to evaluate ``num_batches`` global ones: ceil(num / dp),
    rounded up to ``multiple`` (the interleaved pipeline schedule runs groups of pp)."""
    return math.ceil(math.ceil(num_batches / dp) / multiple) * multiple


def eval_samples(cfg: RootConfig, val_loader: Any) -> int:
    """Validation samples of one evaluation: the first ``trainer.eval_iters`` micro-batches
    of the split in file order (fewer if the split is shorter; the last may be partial)."""
    requested = cfg.trainer.eval_iters * cfg.data.micro_batch_size
    return min(requested, val_loader.total)


@torch.no_grad()
def evaluate(cfg: RootConfig, rt: Runtime, engine: Any, loader: Any) -> float:
    """Token-weighted mean loss over :func:`eval_samples` of ``loader`` (the validation
    split's), the same value for every layout.

    The B global micro-batches are split into contiguous runs of M = ceil(B / dp) per
    data-parallel rank (M rounded up to a multiple of pp under the interleaved schedule), so
    every rank and pipeline stage runs M micro-batches of one shape: a partial last one and
    the runs past B are filled with padding rows (``PAD_ID``) that count neither in the
    loss nor in the token count. Padding, not dropping: the mean is over exactly the
    samples one process evaluates. (BatchNorm uses its running statistics in evaluation,
    so padding rows change no other token's loss.)
    """
    d, p = cfg.data, cfg.parallel
    for chunk in engine.model:
        chunk.eval()
    mbs = d.micro_batch_size
    num_batches = math.ceil(eval_samples(cfg, loader) / mbs)
    per_rank = eval_microbatches_per_rank(num_batches, rt.dp_size, p.pp if p.vpp else 1)
    first = rt.dp_rank * per_rank
    # Start at this rank's first micro-batch (samples before it are not read).
    loader.seek(min(first, loader.batches_per_pass))
    pad = torch.full((mbs, loader.seq_len + 1), PAD_ID, dtype=torch.long)
    batches = []
    for index in range(first, first + per_rank):
        # The loader's last batch of the split is partial; past B only padding is left.
        batch = next(loader) if index < num_batches else pad[:0]
        batches.append(torch.cat([batch, pad[batch.shape[0] :]]))
    total = engine.run_schedule(iter(batches), per_rank, forward_only=True)
    return engine.mean_loss(total)
