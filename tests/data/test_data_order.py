"""The global order's pieces: the permutation, the blend, and the rank slices."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from omnimoe_data.order import (
    Blend,
    Permutation,
    finite_blend_length,
    microbatches_per_rank,
    rank_microbatch,
)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**40), epoch=st.integers(0, 5))
def test_permutation_is_a_bijection(n: int, seed: int, epoch: int) -> None:
    perm = Permutation(n, (seed, 0, epoch))
    out = perm(np.arange(n))
    assert out.dtype == np.int64
    assert np.array_equal(np.sort(out), np.arange(n))
    # Any subset of positions gives the same values as the whole (random access).
    picks = np.arange(n)[::7]
    assert np.array_equal(perm(picks), out[picks])


def test_permutation_depends_on_the_seed_and_mixes() -> None:
    a = Permutation(10_000, (1, 0, 0))(np.arange(10_000))
    b = Permutation(10_000, (2, 0, 0))(np.arange(10_000))
    assert not np.array_equal(a, b)
    # Neighbouring positions land far apart: no locality left from the input order.
    assert np.median(np.abs(np.diff(a))) > 1000
    identity = Permutation(10, (1,), shuffle=False)(np.arange(10))
    assert np.array_equal(identity, np.arange(10))


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=4),
    split=st.integers(0, 300),
    length=st.integers(1, 300),
)
def test_blend_resumes_from_its_counts(weights: list[float], split: int, length: int) -> None:
    whole = Blend(weights)
    datasets, index = whole.assign(split + length)
    head = Blend(weights)
    head.assign(split)
    resumed = Blend(weights, head.position, head.counts)
    d2, i2 = resumed.assign(length)
    assert np.array_equal(d2, datasets[split:]) and np.array_equal(i2, index[split:])
    replayed = Blend(weights, split)  # without counts: walks from the start
    assert replayed.counts == head.counts
    norm = np.array(weights) / sum(weights)
    counts = np.bincount(datasets, minlength=len(weights))
    assert np.all(np.abs(counts - norm * (split + length)) <= len(weights))


def test_finite_blend_stops_when_a_dataset_runs_out() -> None:
    total = finite_blend_length([0.5, 0.5], [10, 100])
    datasets, _ = Blend([0.5, 0.5]).assign(total + 1)
    assert np.bincount(datasets[:total])[0] == 10 and datasets[total] == 0
    assert finite_blend_length([1.0], [7]) == 7


@settings(max_examples=150, deadline=None)
@given(
    micro=st.integers(1, 5),
    dp=st.integers(1, 6),
    per_rank_micro=st.integers(1, 4),
    total=st.integers(0, 400),
)
def test_rank_slices_tile_each_global_batch(
    micro: int, dp: int, per_rank_micro: int, total: int
) -> None:
    g = micro * dp * per_rank_micro
    kw = {"global_batch_size": g, "micro_batch_size": micro, "dp_size": dp}
    # Endless: one step of all ranks, rank by rank, is exactly [0, G), then [G, 2G).
    for step in range(2):
        covered = []
        for r in range(dp):
            for k in range(step * per_rank_micro, (step + 1) * per_rank_micro):
                lo, hi = rank_microbatch(k, dp_rank=r, **kw)
                assert hi - lo == micro
                covered.extend(range(lo, hi))
        assert covered == list(range(step * g, (step + 1) * g))
    # One pass over `total`: every entry exactly once, counts as announced.
    seen = []
    for r in range(dp):
        k = 0
        while (span := rank_microbatch(k, dp_rank=r, total=total, **kw)) is not None:
            assert 0 < span[1] - span[0] <= micro
            seen.extend(range(*span))
            k += 1
        assert k == microbatches_per_rank(total, dp_rank=r, **kw)
    assert sorted(seen) == list(range(total))
