"""Which samples each DataLoader worker of one data-parallel rank reads (``TokenShardLoader``'s
workers): micro-batch ``k`` of the rank as a pure function of ``k``, the seed, the datasets
and their weights (:mod:`omnimoe_data.order`), so neither the worker count nor a resume
changes the data. Picklable: spawned workers receive it whole."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .corpus import DataError
from .order import Blend, Permutation, rank_microbatch
from .store import ShardStore


@dataclass
class ReadFailure:
    """A data error raised in a DataLoader worker, carried to the main process as a value
    so the user sees its one-line message rather than a worker traceback."""

    message: str


class SamplePlan:
    """Everything a worker needs to compute micro-batch ``k``; picklable (spawned workers)."""

    def __init__(
        self,
        stores: list[ShardStore],
        weights: list[float],
        seed: int,
        shuffle: bool,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        total: int | None,
        start: int,
        start_counts: list[int],
    ):
        self.stores, self.weights, self.seed, self.shuffle = stores, weights, seed, shuffle
        self.g, self.m, self.dp_rank, self.dp_size = (
            global_batch_size,
            micro_batch_size,
            dp_rank,
            dp_size,
        )
        self.total, self.start, self.start_counts = total, start, start_counts
        self._perms: dict[tuple[int, int], Permutation] = {}

    def range_of(self, k: int) -> tuple[int, int] | None:
        return rank_microbatch(
            k,
            global_batch_size=self.g,
            micro_batch_size=self.m,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            total=self.total,
        )

    def sample_ids(self, dataset: int, index: np.ndarray) -> np.ndarray:
        """Global sample ids in ``dataset`` of its ``index``-th samples overall (epochs)."""
        n = self.stores[dataset].num_samples
        epochs, within = np.divmod(index, n)
        out = np.empty_like(index)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._perm(dataset, int(epoch))(within[sel])
        return out

    def _perm(self, dataset: int, epoch: int) -> Permutation:
        key = (dataset, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            n = self.stores[dataset].num_samples
            self._perms[key] = Permutation(n, (self.seed, dataset, epoch), shuffle=self.shuffle)
        return self._perms[key]

    def rows(self, blend: Blend, lo: int, hi: int) -> np.ndarray:
        """Rows of sequence entries ``[lo, hi)``, ``blend`` at ``lo`` (it moves to ``hi``)."""
        datasets, index = blend.assign(hi - lo)
        # int32 across the worker boundary (half of int64's bytes); __next__ widens it.
        out = np.empty((hi - lo, self.stores[0].sample_len), dtype=np.int32)
        for d in np.unique(datasets):
            sel = np.flatnonzero(datasets == d)
            ids = self._usable_ids(int(d), index[sel])
            out[sel] = self.stores[d].read(ids)
        return out

    def _usable_ids(self, dataset: int, index: np.ndarray) -> np.ndarray:
        """Sample ids, each one in a bad shard (skipping on) replaced by the first later
        sample of the dataset's sequence in a usable shard: a function of the data alone,
        so every rank and worker makes the same replacement."""
        store = self.stores[dataset]
        ids = self.sample_ids(dataset, index)
        shards = store.shard_of(ids)
        for i in range(len(ids)):
            probe = int(index[i])
            tries = 0
            while not store.usable(int(shards[i])):
                probe, tries = probe + 1, tries + 1
                if tries > store.num_samples:
                    raise DataError(f"{store.source.location}: every shard of the split is bad")
                ids[i] = self.sample_ids(dataset, np.array([probe]))[0]
                shards[i] = store.shard_of(ids[i : i + 1])[0]
        return ids

    def worker_batches(self, first: int, step: int) -> Iterator[torch.Tensor | ReadFailure]:
        """The rank's micro-batches ``first, first + step, ...``."""
        blend = Blend(self.weights, self.start, self.start_counts)
        k = first
        try:
            while True:
                span = self.range_of(k)
                if span is None:
                    return
                lo, hi = span
                blend.assign(self.start + lo - blend.position)  # skip others' samples
                yield torch.from_numpy(self.rows(blend, lo + self.start, hi + self.start))
                k += step
        except DataError as err:
            yield ReadFailure(str(err))


class RankStream(IterableDataset):
    """The rank's micro-batches from ``first`` on, dealt round-robin to DataLoader workers."""

    def __init__(self, plan: SamplePlan, first: int):
        self.plan, self.first = plan, first

    def __iter__(self) -> Iterator[torch.Tensor | ReadFailure]:
        info = get_worker_info()
        slot, count = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.plan.worker_batches(self.first + slot, count)
