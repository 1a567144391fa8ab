"""The global sample order: which samples form global batch ``b``, for any number of ranks.

For a seed, the training sequence is fixed before any rank or worker is known:

* **Per-dataset order.** Epoch ``e`` of a split with ``N`` samples is a seeded permutation
  of ``0..N-1`` (:class:`Permutation`); the dataset's ``k``-th sample overall is
  ``perm_e(k mod N)`` with ``e = k div N``. So one epoch sees every sample once, in a new
  order each epoch, as Megatron's GPT dataset shuffle index does.
* **Mixture.** With several datasets (``data.dirs`` + ``data.weights``), global sample ``i``
  comes from the dataset whose share is most behind: Megatron's blending rule
  (``build_blending_indices``: ``argmax_d weight_d * max(i, 1) - count_d``, first on ties),
  so every prefix of the sequence holds each dataset within one sample of its weight.
  :class:`Blend` walks it; its state is ``(i, counts)``.
* **Global batches and ranks.** Global batch ``b`` is sequence entries ``[b*G, (b+1)*G)``
  (counted from the position a run started or resumed at); data-parallel rank ``r`` of
  ``dp`` takes the contiguous slice ``[r*G/dp, (r+1)*G/dp)``, cut into micro-batches
  (:func:`rank_microbatch`). One process (dp=1) runs global micro-batches ``0..M-1`` of a
  step; rank ``r`` runs ``r*M/dp .. (r+1)*M/dp - 1``.

Nothing here depends on the data-parallel size or the worker count except which slice a
rank reads, so a run resumed at another size continues the same sequence.
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(2**64 - 1)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014): a bijective 64-bit mixing function."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Permutation:
    """A seeded pseudo-random permutation of ``0..n-1`` evaluated at any positions.

    A balanced Feistel network on the smallest even-bit domain ``2^(2h) >= n`` with
    cycle walking (Black & Rogaway, "Ciphers with arbitrary finite domains", 2002): values
    outside ``[0, n)`` are encrypted again until they land inside, which keeps it a
    bijection on ``[0, n)``. Why not ``numpy.random.permutation``: that materialises ``n``
    indices per epoch in every rank and worker process (80 MB each at 10M samples) and
    costs O(n) at every epoch start; this costs O(1) memory and computes only the
    positions a rank reads. ``shuffle=False`` gives the identity.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed_words: tuple[int, ...], *, shuffle: bool = True):
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        self.n = n
        self.shuffle = shuffle and n > 1
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.half_mask = np.uint64((1 << self.half) - 1)
        seq = np.random.SeedSequence([w % 2**63 for w in seed_words])
        self.keys = seq.generate_state(self.ROUNDS, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.half_mask)
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """``perm(positions)`` for ``int64`` positions in ``[0, n)``; returns ``int64``."""
        pos = np.asarray(positions, dtype=np.int64)
        if not self.shuffle:
            return pos.copy()
        with np.errstate(over="ignore"):
            out = self._encrypt(pos.astype(np.uint64))
            outside = out >= np.uint64(self.n)
            while outside.any():
                out[outside] = self._encrypt(out[outside])
                outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


class Blend:
    """Megatron's blending rule over datasets with ``weights``, walked from ``(i, counts)``.

    ``assign(length)`` returns, for the next ``length`` entries of the sequence, the dataset
    of each and its index in that dataset's own sequence (the count before it), and moves on.
    """

    def __init__(self, weights: list[float], position: int = 0, counts: list[int] | None = None):
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        if len(weights) == 1:
            self.position, self.counts = position, [position]
        elif counts is not None:
            self.position, self.counts = position, [int(c) for c in counts]
        else:  # walk there from the start: O(position), so checkpoints store the counts
            self.position, self.counts = 0, [0] * len(weights)
            self.assign(position)

    def assign(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.weights) == 1:
            index = np.arange(self.position, self.position + length, dtype=np.int64)
            self.position += length
            self.counts[0] = self.position
            return np.zeros(length, dtype=np.int64), index
        datasets = np.empty(length, dtype=np.int64)
        index = np.empty(length, dtype=np.int64)
        weights, counts = self.weights, self.counts
        for k in range(length):
            scale = max(self.position, 1.0)
            best, best_error = 0, weights[0] * scale - counts[0]
            for d in range(1, len(weights)):
                error = weights[d] * scale - counts[d]
                if error > best_error:
                    best, best_error = d, error
            datasets[k] = best
            index[k] = counts[best]
            counts[best] += 1
            self.position += 1
        return datasets, index


def finite_blend_length(weights: list[float], sizes: list[int]) -> int:
    """How many entries a blend has before some dataset would need its ``size + 1``-th
    sample: the length of one pass (evaluation). Datasets with size 0 must be left out."""
    if len(sizes) == 1:
        return sizes[0]
    blend = Blend(weights)
    # The first dataset to run out does so after about size_d / weight_d entries.
    bound = int(min(s / w for s, w in zip(sizes, blend.weights))) + len(sizes) + 1
    datasets, _ = blend.assign(bound)
    seen = np.zeros(len(sizes), dtype=np.int64)
    for i, d in enumerate(datasets):
        if seen[d] == sizes[d]:
            return i
        seen[d] += 1
    return bound


def rank_microbatch(
    k: int,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    total: int | None = None,
) -> tuple[int, int] | None:
    """Sequence range ``[start, stop)`` (relative to the start position) of data-parallel
    rank ``dp_rank``'s ``k``-th micro-batch, or ``None`` after the last one.

    ``total=None``: an endless sequence; ``global_batch_size`` must be a multiple of
    ``micro_batch_size * dp_size``. ``total=T``: one pass over ``T`` entries; the last
    global batch may be short: its ``R`` entries are split as ``[r*R//dp, (r+1)*R//dp)``
    and its last micro-batch per rank may be short.
    """
    g, m = global_batch_size, micro_batch_size
    per_rank = g // dp_size
    per_step = -(-per_rank // m)  # micro-batches per rank per full global batch
    step, j = divmod(k, per_step)
    base = step * g
    if total is None or base + g <= total:
        lo = base + dp_rank * per_rank
        hi = lo + per_rank
    else:
        rest = total - base
        if rest <= 0:
            return None
        lo = base + dp_rank * rest // dp_size
        hi = base + (dp_rank + 1) * rest // dp_size
    start = lo + j * m
    if start >= hi:  # only in a short last global batch: this rank's share is used up
        return None
    return start, min(start + m, hi)


def microbatches_per_rank(
    total: int, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> int:
    """How many micro-batches ``rank_microbatch`` yields for a pass over ``total`` entries."""
    g, m = global_batch_size, micro_batch_size
    per_rank = g // dp_size
    full, rest = divmod(total, g)
    count = full * -(-per_rank // m)
    if rest:
        share = (dp_rank + 1) * rest // dp_size - dp_rank * rest // dp_size
        count += -(-share // m)
    return count
