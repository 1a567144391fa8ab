"""TokenShardLoader: determinism, data-parallel and worker splits, exact resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnimoe_data.corpus import DataError
from omnimoe_data.loader import TokenShardLoader, _Plan
from omnimoe_data.prepare import prepare

from .helpers import TINY, make_token_dataset

SAMPLE_LEN = 5
# Uneven shards, including a short last one, as prepare() writes them.
SHARDS = [10] * 7 + [3]
N = sum(SHARDS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_token_dataset(tmp_path_factory.mktemp("tokens"), SHARDS, sample_len=SAMPLE_LEN)


def ids(batches) -> list[int]:
    """The sample index of every row (sample i holds tokens i, i+1, ...)."""
    out = []
    for batch in batches:
        assert batch.dtype == torch.int64 and batch.shape[1] == SAMPLE_LEN
        assert torch.equal(batch - batch[:, :1], torch.arange(SAMPLE_LEN).expand_as(batch))
        out.extend(batch[:, 0].tolist())
    return out


def take(loader: TokenShardLoader, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(loader, n))


def test_one_epoch_covers_each_sample_once(data_dir: Path) -> None:
    loader = TokenShardLoader(data_dir, "train", 4, seed=3)
    assert loader.batches_per_epoch == N // 4
    seen = ids(take(loader, loader.batches_per_epoch))
    assert len(seen) == len(set(seen)) == N - N % 4
    assert set(seen) <= set(range(N))
    assert seen != sorted(seen)  # shuffled
    assert loader.state_dict()["epoch"] == 1


def test_deterministic_for_a_seed(data_dir: Path) -> None:
    def run(seed: int) -> list[int]:
        return ids(take(TokenShardLoader(data_dir, "train", 4, seed=seed), 40))

    assert run(7) == run(7)
    assert run(7) != run(8)
    epochs = run(7)
    per_epoch = N // 4 * 4
    assert epochs[:per_epoch] != epochs[per_epoch : 2 * per_epoch]  # reshuffled each epoch


def test_infinite_batches_are_full_and_finite_pass_is_complete(data_dir: Path) -> None:
    loader = TokenShardLoader(data_dir, "train", 8, shuffle=False, infinite=False)
    first = list(loader)
    assert [len(b) for b in first] == [8] * 9 + [1]
    assert ids(first) == list(range(N))  # fixed order, every sample
    assert ids(loader) == ids(first)  # iter() starts a fresh pass
    infinite = TokenShardLoader(data_dir, "train", 8)
    assert all(len(b) == 8 for b in take(infinite, 30))


def test_val_split_is_in_fixed_order(data_dir: Path) -> None:
    a = TokenShardLoader(data_dir, "val", 3, seed=1, infinite=False)
    b = TokenShardLoader(data_dir, "val", 3, seed=2, infinite=False)
    assert ids(a) == ids(b) == sorted(ids(a))
    assert len(ids(a)) == 20


@pytest.mark.parametrize("dp_size", [2, 3, 4, 16])
@pytest.mark.parametrize("shuffle", [False, True])
def test_dp_ranks_are_disjoint_equal_and_covering(data_dir: Path, dp_size: int, shuffle: bool):
    per_rank = []
    for rank in range(dp_size):
        loader = TokenShardLoader(
            data_dir,
            "train",
            2,
            dp_rank=rank,
            dp_size=dp_size,
            seed=5,
            infinite=False,
            shuffle=shuffle,
        )
        per_rank.append(ids(loader))
    counts = {len(r) for r in per_rank}
    assert counts == {N // dp_size}  # every rank gets data, the same amount
    everything = [i for r in per_rank for i in r]
    assert len(everything) == len(set(everything)) == N - N % dp_size


def test_fewer_shards_than_ranks(tmp_path: Path) -> None:
    data = make_token_dataset(tmp_path, [6, 5], sample_len=SAMPLE_LEN)
    per_rank = [
        ids(take(TokenShardLoader(data, "train", 1, dp_rank=r, dp_size=4), 2)) for r in range(4)
    ]
    flat = [i for r in per_rank for i in r]
    assert len(flat) == len(set(flat)) == 8


def test_worker_split(data_dir: Path) -> None:
    everything = []
    for rank in range(2):
        loader = TokenShardLoader(
            data_dir, "train", 2, dp_rank=rank, dp_size=2, num_workers=2, seed=1, infinite=False
        )
        everything.extend(ids(loader))
    assert len(everything) == len(set(everything)) == N - N % 4
    # Workers read disjoint shard ranges: with 2 ranks x 2 workers on a 73-sample split each
    # consumer owns 18 consecutive samples of the epoch's shard order.
    plain = TokenShardLoader(data_dir, "train", 2, num_workers=2, shuffle=False, infinite=False)
    got = ids(plain)
    worker0, worker1 = set(range(0, 36)), set(range(36, 72))
    assert got[0:2] == [0, 1] and got[2:4] == [36, 37]  # round-robin over the two workers
    assert set(got[0::4] + got[1::4]) == worker0 and set(got[2::4] + got[3::4]) == worker1


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("consumed", [0, 5, 8, 9, 21])
def test_exact_resume(data_dir: Path, num_workers: int, consumed: int) -> None:
    def make() -> TokenShardLoader:
        return TokenShardLoader(
            data_dir, "train", 4, dp_rank=1, dp_size=2, seed=11, num_workers=num_workers
        )

    reference = make()
    # 9 batches per epoch with one worker, 2 x 4 with two: `consumed` hits epoch boundaries.
    assert reference.batches_per_epoch == (9 if num_workers == 0 else 8)
    take(reference, consumed)
    state = json.loads(json.dumps(reference.state_dict()))  # checkpoints store plain data
    expected = take(reference, 6)
    resumed = make()
    take(resumed, 3)  # a loader mid-way is moved to the checkpoint position
    resumed.load_state_dict(state)
    got = take(resumed, 6)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_resume_refuses_other_layout(data_dir: Path) -> None:
    state = TokenShardLoader(data_dir, "train", 4, dp_size=2).state_dict()
    with pytest.raises(ValueError, match="dp_size=2 in the checkpoint, 4 now"):
        TokenShardLoader(data_dir, "train", 4, dp_size=4).load_state_dict(state)


def test_too_little_data(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="too few for dp_size=8 x workers=1 x micro_batch_size=16"):
        TokenShardLoader(data_dir, "train", 16, dp_size=8)
    small_eval = TokenShardLoader(data_dir, "val", 16, dp_size=8, infinite=False)
    assert [len(b) for b in small_eval] == [20 // 8]  # one short batch per rank
    empty_eval = TokenShardLoader(data_dir, "val", 16, dp_size=32, infinite=False)
    assert list(empty_eval) == []  # evaluation on too little data yields nothing, on every rank
    with pytest.raises(DataError, match="no split 'test'"):
        TokenShardLoader(data_dir, "test", 1)
    with pytest.raises(DataError, match="not found; prepare the data first"):
        TokenShardLoader(tmp_path, "train", 1)


def test_loader_on_prepared_data(txt_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = prepare([txt_corpus], out, progress=False, **TINY).manifest
    loader = TokenShardLoader(out, "train", 4, shuffle=False, infinite=False)
    batches = list(loader)
    assert loader.seq_len == 16 and loader.vocab_size == m["vocab_size"]
    assert sum(len(b) for b in batches) == m["splits"]["train"]["samples"]
    rows = torch.cat(batches)
    assert rows.shape[1] == 17 and int(rows.max()) < m["vocab_size"]
    assert torch.equal(rows[1:, 0], rows[:-1, -1])  # stride seq_len: consecutive samples overlap


@settings(max_examples=200, deadline=None)
@given(
    shard_sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    consumers=st.integers(1, 24),
    epoch=st.integers(0, 3),
)
def test_epoch_partition_property(shard_sizes: list[int], consumers: int, epoch: int) -> None:
    """Whatever the shard sizes: consumers get equal, disjoint ranges; the rest is < C."""
    total = sum(shard_sizes)
    per = total // consumers
    plan = _Plan(
        paths=tuple(Path(f"s{i}") for i in range(len(shard_sizes))),
        shard_samples=tuple(shard_sizes),
        dtype="uint16",
        sample_len=2,
        micro_batch_size=1,
        dp_rank=0,
        dp_size=consumers,
        workers=1,
        seed=9,
        shuffle=True,
        infinite=True,
        per_consumer=per,
        batches_per_worker=max(per, 1),
    )
    taken = []
    for c in range(consumers):
        segs = plan.segments(epoch, c)
        assert sum(s.stop - s.start for s in segs) == per
        assert all(0 <= s.start < s.stop <= shard_sizes[s.shard] for s in segs)
        taken.extend((s.shard, i) for s in segs for i in range(s.start, s.stop))
    assert len(taken) == len(set(taken)) == total - total % consumers
