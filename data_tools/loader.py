"""Training loader: streams prepared token shards as ``[micro_batch_size, seq_len + 1]``
LongTensors (format: :mod:`omnimoe_data.shards`).

How an epoch is split. The split's shards are put in an order (a permutation seeded by
``(seed, epoch)`` for shuffled splits, file order otherwise) and their samples are seen
as one sequence of ``N`` samples. There are ``C = dp_size * max(num_workers, 1)``
consumers (one per data-parallel rank and DataLoader worker); consumer ``c`` takes the
contiguous range ``[c * M, (c + 1) * M)`` with ``M = N // C``. So with many shards each
rank and worker reads its own shards, with fewer shards than consumers they share shards
sample-wise, every consumer gets the same amount of data (ranks stay in step), and no
sample is read twice in an epoch; at most ``C - 1`` samples per epoch are left out.
A consumer reads its range one shard segment at a time and, when shuffling, permutes the
segment with a generator seeded by ``(seed, epoch, shard, segment start)``.

Batches are consecutive samples of one consumer, so a rank with ``W`` workers yields
batch ``k`` of an epoch from worker ``k % W``, matching the round-robin order of
``torch.utils.data.DataLoader``. The position is therefore one number (batches consumed),
and resuming restarts every worker at its share of that position: the first batch after
:meth:`TokenShardLoader.load_state_dict` is the one that would have come next. The
position depends on ``dp_size`` and ``num_workers``; resuming with other values is refused.

Infinite loaders drop each consumer's last partial batch so every batch has the same
shape; finite ones (evaluation) yield it, so a pass covers all of the consumer's samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .corpus import DataError
from .shards import load_manifest, read_shard

__all__ = ["TokenShardLoader", "load_manifest"]


@dataclass(frozen=True)
class _Segment:
    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs; picklable so DataLoader workers get a copy."""

    paths: tuple[Path, ...]
    shard_samples: tuple[int, ...]
    dtype: str
    sample_len: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    workers: int
    seed: int
    shuffle: bool
    infinite: bool
    per_consumer: int
    batches_per_worker: int

    def segments(self, epoch: int, consumer: int) -> list[_Segment]:
        order = range(len(self.paths))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.paths))
        lo, hi = consumer * self.per_consumer, (consumer + 1) * self.per_consumer
        segments, offset = [], 0
        for shard in order:
            n = self.shard_samples[shard]
            start, stop = max(lo, offset), min(hi, offset + n)
            if start < stop:
                segments.append(_Segment(int(shard), start - offset, stop - offset))
            offset += n
            if offset >= hi:
                break
        return segments

    def worker_batches(self, worker: int, first: int) -> Iterator[torch.Tensor]:
        """Batches ``first, first + 1, ...`` of logical worker ``worker`` over all epochs."""
        consumer = self.dp_rank * self.workers + worker
        epoch, skip = divmod(first, self.batches_per_worker)
        if epoch and not self.infinite:
            return  # a finite loader has one epoch; this worker's share is used up
        while True:
            yield from self._epoch_batches(epoch, consumer, skip * self.micro_batch_size)
            if not self.infinite:
                return
            epoch, skip = epoch + 1, 0

    def _epoch_batches(self, epoch: int, consumer: int, skip: int) -> Iterator[torch.Tensor]:
        """One epoch of a consumer's batches, the first ``skip`` samples left out."""
        size = self.micro_batch_size
        carry = np.empty((0, self.sample_len), dtype=self.dtype)  # < size rows, across segments
        for seg in self.segments(epoch, consumer):
            n = seg.stop - seg.start
            if skip >= n:  # resuming: whole segment already consumed, do not read it
                skip -= n
                continue
            rows = read_shard(
                self.paths[seg.shard],
                dtype=np.dtype(self.dtype),
                sample_len=self.sample_len,
                start=seg.start,
                stop=seg.stop,
            )
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, 1, seg.shard, seg.start])
                rows = rows[rng.permutation(n)]
            rows = np.concatenate([carry, rows[skip:]])
            skip = 0
            full = len(rows) - len(rows) % size
            for i in range(0, full, size):
                yield _to_tensor(rows[i : i + size])
            carry = rows[full:]
        if len(carry) and not self.infinite:
            yield _to_tensor(carry)


def _to_tensor(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rows.astype(np.int64))


class _RankStream(IterableDataset):
    """One rank's batches from rank-batch index ``start`` on, split over DataLoader workers."""

    def __init__(self, plan: _Plan, start: int):
        self.plan = plan
        self.start = start

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        # DataLoader worker `slot` yields the rank's batches start+slot, start+slot+W, ...;
        # batch k belongs to logical worker k % W, as its (k // W)-th batch.
        batch = self.start + slot
        worker = batch % self.plan.workers
        return self.plan.worker_batches(worker, batch // self.plan.workers)


class TokenShardLoader:
    """Iterator of ``torch.LongTensor [micro_batch_size, seq_len + 1]`` for one DP rank.

    ``shuffle`` defaults to ``True`` for the train split and ``False`` otherwise, so the
    validation split is read in a fixed order. For a finite loader (``infinite=False``),
    ``iter()`` starts a fresh pass from the first batch; ``next()`` continues from the
    current position (also after :meth:`load_state_dict`).
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        micro_batch_size: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        infinite: bool = True,
        shuffle: bool | None = None,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or num_workers < 0:
            raise ValueError("micro_batch_size must be >= 1 and num_workers >= 0")
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{self.data_dir}: no split {split!r} (have {', '.join(splits)})")
        shards = splits[split]["shards"]
        self.split = split
        self.seq_len: int = self.manifest["seq_len"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.num_samples: int = sum(s["samples"] for s in shards)
        self.num_workers = num_workers
        workers = max(num_workers, 1)
        consumers = dp_size * workers
        per_consumer = self.num_samples // consumers
        batches = per_consumer // micro_batch_size
        if not infinite:
            batches = math.ceil(per_consumer / micro_batch_size)
        if batches == 0 and infinite:
            # A finite (evaluation) loader may be empty: every rank then yields nothing,
            # so ranks stay in step. Training on nothing is an error.
            raise DataError(
                f"{self.data_dir}: split {split!r} has {self.num_samples} samples, too few for "
                f"dp_size={dp_size} x workers={workers} x micro_batch_size={micro_batch_size}"
            )
        self._plan = _Plan(
            paths=tuple(self.data_dir / s["name"] for s in shards),
            shard_samples=tuple(s["samples"] for s in shards),
            dtype=self.manifest["dtype"],
            sample_len=self.manifest["sample_len"],
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            workers=workers,
            seed=seed % 2**63,
            shuffle=(split == "train") if shuffle is None else shuffle,
            infinite=infinite,
            per_consumer=per_consumer,
            batches_per_worker=batches,
        )
        self.batches_per_epoch = workers * batches
        self._epoch = 0
        self._batch = 0  # batches consumed in the current epoch
        self._it: Iterator[torch.Tensor] | None = None

    def __iter__(self) -> TokenShardLoader:
        if not self._plan.infinite:
            self._epoch, self._batch = 0, 0
            self._it = None
        return self

    def __next__(self) -> torch.Tensor:
        if self.batches_per_epoch == 0:
            raise StopIteration
        if self._it is None:
            self._it = self._start()
        try:
            batch = next(self._it)
        except StopIteration:
            self._epoch, self._batch, self._it = 0, 0, None
            raise
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        p = self._plan
        return {
            "split": self.split,
            "epoch": self._epoch,
            "batch": self._batch,
            "seed": p.seed,
            "dp_rank": p.dp_rank,
            "dp_size": p.dp_size,
            "num_workers": self.num_workers,
            "micro_batch_size": p.micro_batch_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in (
            "split",
            "seed",
            "dp_rank",
            "dp_size",
            "num_workers",
            "micro_batch_size",
            "num_samples",
        ):
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume loader: {key}={state[key]!r} in the checkpoint, "
                    f"{mine[key]!r} now (the data position depends on it)"
                )
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self._it = None

    def _start(self) -> Iterator[torch.Tensor]:
        stream = _RankStream(self._plan, self._epoch * self.batches_per_epoch + self._batch)
        if self.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers))
