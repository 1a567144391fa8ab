"""Training loader: ``[micro_batch_size, seq_len + 1]`` LongTensors in the global order of
:mod:`omnimoe_data.order`, for one data-parallel rank.

The sequence of global batches depends only on the seed, the datasets and their weights:
global batch ``b`` is entries ``[b*G, (b+1)*G)`` of the (blended, per-epoch permuted)
sample sequence, and rank ``r`` of ``dp`` reads the slice ``[r*G/dp, (r+1)*G/dp)`` of each,
as micro-batches. With ``W`` DataLoader workers, the rank's micro-batch ``k`` is computed by
worker ``k mod W`` (the order in which ``torch.utils.data.DataLoader`` collects them), and
each micro-batch is a pure function of ``k``, so the worker count never changes the data.

The position is one number, the global samples consumed (plus, for a mixture, how many of
them came from each dataset, so a resume does not replay the blend from the start). A loader
resumed from :meth:`TokenShardLoader.state_dict` at any data-parallel size, worker count or
micro-batch size continues the exact sequence; the seed, the datasets and the weights must
be the same (checked).

A finite loader (``infinite=False``, evaluation) makes one pass: a dataset's split once in
order (unshuffled by default), or for a mixture the blend until a dataset runs out, in
global batches whose last one may be short; ranks split it as :func:`order.rank_microbatch`
says, so all ranks together read the same samples as one process.
"""

from __future__ import annotations

import hashlib
import multiprocessing.process
import multiprocessing.util
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .corpus import DataError
from .order import Blend, finite_blend_length, microbatches_per_rank
from .sample_plan import RankStream, ReadFailure, SamplePlan
from .source import DataSource
from .store import ShardStore

__all__ = ["TokenShardLoader"]

STATE_FORMAT = "omnimoe-loader-2"


def data_id(source: DataSource, split: str) -> str:
    """A short identity of one split's content: the hash of its shards' sha256 sums."""
    shards = source.manifest["splits"][split]["shards"]
    joined = ",".join(s["sha256"] for s in shards).encode()
    return hashlib.sha256(joined).hexdigest()[:16]


def _kill_workers(workers: list[multiprocessing.process.BaseProcess]) -> None:
    """End DataLoader workers still alive (see ``TokenShardLoader._open``)."""
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join(timeout=10)


def _ignore_stop_signals(_worker_id: int) -> None:
    """In a DataLoader worker: ignore the stop signals (SIGTERM, SIGUSR1). Why: SLURM (scancel,
    a time limit, a preemption) signals every process of the job step, the workers included;
    torch's worker handler dies of a SIGTERM that its parent did not send, and the training
    process then fails on its next batch instead of finishing the step and saving. The
    training process stops on the signal and shuts its workers down; a worker whose parent is
    gone still exits by torch's own watchdog."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class TokenShardLoader:
    """Iterator of ``torch.LongTensor [micro_batch_size, seq_len + 1]`` for one DP rank.

    ``data``: one dataset location (folder or URL, :class:`~omnimoe_data.source.DataSource`)
    or several with ``weights`` (a mixture; default equal). ``global_batch_size`` (``G``)
    defaults to ``micro_batch_size * dp_size`` and must be a multiple of it. ``shuffle``
    defaults to ``True`` for the train split and ``False`` otherwise. For a finite loader
    ``iter()`` starts a fresh pass; ``next()`` continues from the current position.
    ``cache_dir`` holds copies of remote shards. Raises :class:`DataError` for unusable
    data (missing manifest or split, too few samples, bad shards) and ``ValueError`` for
    bad arguments.
    """

    def __init__(
        self,
        data: str | Path | Sequence[str | Path],
        split: str,
        micro_batch_size: int,
        *,
        global_batch_size: int | None = None,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        infinite: bool = True,
        shuffle: bool | None = None,
        weights: Sequence[float] | None = None,
        skip_bad_shards: bool = False,
        cache_dir: str | Path | None = None,
        pin_memory: bool = False,
    ):
        locations = [data] if isinstance(data, str | Path) else list(data)
        g = global_batch_size if global_batch_size is not None else micro_batch_size * dp_size
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or num_workers < 0 or g < 1:
            raise ValueError("micro_batch_size and global_batch_size >= 1, num_workers >= 0")
        if g % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size={g} must be a multiple of micro_batch_size * dp_size "
                f"({micro_batch_size} * {dp_size})"
            )
        weights = [1.0] * len(locations) if weights is None else [float(w) for w in weights]
        if len(weights) != len(locations) or not locations or min(weights) <= 0:
            raise ValueError("one positive weight per dataset")
        weights = [w / sum(weights) for w in weights]
        self.sources = [DataSource(loc) for loc in locations]
        self.split = split
        stores = [
            ShardStore(s, split, cache_dir=cache_dir, skip_bad_shards=skip_bad_shards)
            for s in self.sources
        ]
        manifests = [s.manifest for s in self.sources]
        self.seq_len: int = manifests[0]["seq_len"]
        self.vocab_size: int = manifests[0]["vocab_size"]
        if self.vocab_size > 2**31:  # batches cross the worker boundary as int32
            raise DataError(f"{locations[0]}: vocab_size {self.vocab_size} is over 2^31")
        for source, manifest in zip(self.sources[1:], manifests[1:]):
            _check_compatible(self.sources[0], manifests[0], source, manifest)
        self.data_ids = [data_id(s, split) for s in self.sources]
        self.sizes = [st.num_samples for st in stores]
        if infinite:
            empty = [s.location for s, n in zip(self.sources, self.sizes) if n == 0]
            if empty:
                raise DataError(f"{empty[0]}: split {split!r} has no samples to train on")
            total = None
        else:  # a pass leaves out datasets whose split is empty
            keep = [i for i, n in enumerate(self.sizes) if n > 0]
            stores = [stores[i] for i in keep]
            weights = [weights[i] for i in keep]
            total = finite_blend_length(weights, [self.sizes[i] for i in keep]) if keep else 0
        self.weights = weights
        self.num_samples = sum(self.sizes)
        self.stores = stores
        self.global_batch_size, self.micro_batch_size = g, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed % 2**63
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.num_workers, self.infinite, self.total = num_workers, infinite, total
        self.pin_memory = pin_memory
        self.microbatches_per_step = g // dp_size // micro_batch_size
        self.batches_per_pass = (
            microbatches_per_rank(
                total,
                global_batch_size=g,
                micro_batch_size=micro_batch_size,
                dp_rank=dp_rank,
                dp_size=dp_size,
            )
            if total is not None
            else None
        )
        self._start, self._start_counts = 0, [0] * len(stores)
        self._consumed = 0  # micro-batches this rank took since _start
        self._it: Iterator | None = None
        # The blend walked forward as steps complete, so saving a position costs only the
        # steps since the last save (a mixture's walk is sequential).
        self._cursor = Blend(self.weights)

    @property
    def bad_shards(self) -> int:
        """Bad shards found and skipped by this process (workers report theirs on stderr)."""
        return sum(len(s.bad) for s in self.stores)

    def __iter__(self) -> TokenShardLoader:
        if not self.infinite:
            self._consumed, self._it = 0, None
        return self

    def close(self) -> None:
        """Stop this loader's worker processes now (a later ``next`` starts them again).

        Why explicitly, before the process exits: the workers ignore the stop signals
        (``_ignore_stop_signals``), so multiprocessing's exit handler, which ends daemonic
        children with SIGTERM and then joins them, would wait forever. The DataLoader's own
        shutdown (its private ``_shutdown_workers``: the done event, then a bounded join)
        ends them; one still alive after it (stuck in I/O) is killed."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is None:
            return
        shutdown()
        _kill_workers(list(getattr(it, "_workers", [])))

    def __next__(self) -> torch.Tensor:
        if self.total == 0:
            raise StopIteration
        if self._it is None:
            self._it = self._open()
        try:
            batch = next(self._it)
        except StopIteration:
            self._consumed, self._it = 0, None
            raise
        if isinstance(batch, ReadFailure):
            self._it = None
            raise DataError(batch.message)
        self._consumed += 1
        batch = batch.long()  # token ids as the model's embedding and loss take them
        return batch.pin_memory() if self.pin_memory else batch

    def _open(self) -> Iterator:
        plan = SamplePlan(
            self.stores,
            self.weights,
            self.seed,
            self.shuffle,
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            total=self.total,
            start=self._start,
            start_counts=self._start_counts,
        )
        stream = RankStream(plan, self._consumed)
        if self.num_workers == 0:
            return iter(stream)
        it = iter(
            DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=4,
                worker_init_fn=_ignore_stop_signals,
            )
        )
        # The workers ignore SIGTERM, and multiprocessing's exit handler SIGTERMs daemonic
        # children and then joins them: a loader nobody closed (an exception, a Trainer driven
        # without ``fit``) would hang the exit. A finalizer of priority >= 0 runs before that
        # step (``multiprocessing.util._exit_function``, also in spawned processes) and kills
        # them; it also fires, harmlessly, after the iterator's own shutdown when it is freed.
        workers = list(getattr(it, "_workers", []))  # torch's private list of the processes
        multiprocessing.util.Finalize(it, _kill_workers, args=(workers,), exitpriority=10)
        return it

    def seek(self, microbatch: int) -> None:
        """Continue a finite pass from this rank's ``microbatch``-th micro-batch (earlier
        samples are not read): e.g. one rank's share of an evaluation."""
        if self.infinite:
            raise ValueError("seek() is for finite passes; resume training with load_state_dict")
        self._consumed, self._it = microbatch, None

    # -- position -----------------------------------------------------------------------------
    def consumed_samples(self) -> tuple[int, list[int]]:
        """(global samples consumed, samples per dataset) at the end of the last full step."""
        steps = self._consumed // self.microbatches_per_step
        target = self._start + steps * self.global_batch_size
        if target < self._cursor.position:
            self._cursor = Blend(self.weights, self._start, self._start_counts)
        self._cursor.assign(target - self._cursor.position)
        return self._cursor.position, list(self._cursor.counts)

    def state_dict(self) -> dict:
        """The position, independent of data-parallel size, workers and micro-batch size."""
        if not self.infinite:
            raise ValueError("a finite (evaluation) loader has no position to save")
        if self._consumed % self.microbatches_per_step:
            raise ValueError(
                f"loader position is mid-step ({self._consumed} micro-batches, "
                f"{self.microbatches_per_step} per step): save after a whole step"
            )
        consumed, counts = self.consumed_samples()
        return {
            "format": STATE_FORMAT,
            "split": self.split,
            "consumed_samples": consumed,
            "dataset_samples": counts,
            "seed": self.seed,
            "weights": self.weights,
            "data_ids": self.data_ids,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; :class:`DataError` if it belongs to other data."""
        if state.get("format") != STATE_FORMAT:
            raise DataError(
                "cannot resume the data loader: the checkpoint's data position is in an older "
                "format (it depended on the data-parallel size); start the run afresh"
            )
        mine = {"split": self.split, "seed": self.seed, "data_ids": self.data_ids}
        mine["weights"] = self.weights
        for key, value in mine.items():
            if state[key] != value:
                raise DataError(
                    f"cannot resume the data loader: {key}={state[key]!r} in the checkpoint, "
                    f"{value!r} now (the data order depends on it)"
                )
        self._start = int(state["consumed_samples"])
        self._start_counts = [int(c) for c in state["dataset_samples"]]
        self._cursor = Blend(self.weights, self._start, self._start_counts)
        self._consumed, self._it = 0, None


def _check_compatible(a: DataSource, ma: dict, b: DataSource, mb: dict) -> None:
    """Datasets of one mixture must share the sample shape and the tokenizer."""
    for key in ("seq_len", "vocab_size", "eod_id", "tokenizer_sha256"):
        if ma.get(key) != mb.get(key):
            raise DataError(
                f"{b.location}: {key}={mb.get(key)!r} but {a.location} has {ma.get(key)!r}; "
                f"the datasets of a mixture must share the tokenizer and seq_len"
            )
