"""TokenShardLoader: one global order for every data-parallel size and worker count,
exact resume across them, global mixing, finite passes, and too little data."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from omnimoe_data.corpus import DataError
from omnimoe_data.loader import TokenShardLoader
from omnimoe_data.prepare import prepare

from .helpers import TINY, make_token_dataset

SAMPLE_LEN = 5
# Uneven shards, including a short last one, as prepare() writes them.
SHARDS = [10] * 7 + [3]
N = sum(SHARDS)
G = 8  # global batch size


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


def global_batches(
    data, steps: int, *, dp: int, workers: int = 0, mb: int = 2, state: dict | None = None, **kw
) -> list[list[int]]:
    """Runs ``dp`` rank loaders for ``steps`` steps and reassembles each global batch from the
    ranks' slices, rank by rank (the contract: rank r holds [r*G/dp, (r+1)*G/dp))."""
    per_step = G // dp // mb
    ranks = []
    for rank in range(dp):
        loader = TokenShardLoader(
            data,
            "train",
            mb,
            global_batch_size=G,
            dp_rank=rank,
            dp_size=dp,
            seed=5,
            num_workers=workers,
            **kw,
        )
        if state is not None:
            loader.load_state_dict(state)
        ranks.append(ids(take(loader, steps * per_step)))
    per_rank = G // dp
    return [
        [i for r in range(dp) for i in ranks[r][s * per_rank : (s + 1) * per_rank]]
        for s in range(steps)
    ]


@pytest.mark.parametrize(("dp", "workers"), [(1, 2), (2, 0), (2, 2), (4, 0), (4, 2)])
def test_global_batches_independent_of_dp_and_workers(data_dir: Path, dp: int, workers: int):
    reference = global_batches(data_dir, 20, dp=1)  # 160 samples: two epochs and a bit
    assert global_batches(data_dir, 20, dp=dp, workers=workers) == reference


def test_epochs_are_permutations(data_dir: Path) -> None:
    flat = [i for batch in global_batches(data_dir, 19, dp=1) for i in batch]
    first, second = flat[:N], flat[N : 2 * N]
    assert sorted(first) == sorted(second) == list(range(N))  # each sample once per epoch
    assert first != sorted(first) and first != second  # shuffled, anew each epoch
    other_seed = TokenShardLoader(data_dir, "train", 8, seed=6)
    assert ids(take(other_seed, 9))[:N] != first


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((1, 0, 2), (2, 2, 2)),
        ((2, 2, 2), (4, 0, 1)),
        ((4, 0, 2), (1, 2, 4)),
        ((2, 0, 4), (2, 0, 4)),
    ],
)
@pytest.mark.parametrize("steps_done", [3, 9])  # 9 steps = 72 samples: mid second epoch
def test_resume_continues_the_sequence_at_another_layout(
    data_dir: Path, before: tuple, after: tuple, steps_done: int
) -> None:
    """(dp, workers, micro-batch) before and after the checkpoint may all differ."""
    dp, workers, mb = before
    loader = TokenShardLoader(
        data_dir,
        "train",
        mb,
        global_batch_size=G,
        dp_rank=0,
        dp_size=dp,
        seed=5,
        num_workers=workers,
    )
    take(loader, steps_done * G // dp // mb)
    state = json.loads(json.dumps(loader.state_dict()))  # checkpoints store plain data
    assert state["consumed_samples"] == steps_done * G
    dp2, workers2, mb2 = after
    resumed = global_batches(data_dir, 6, dp=dp2, workers=workers2, mb=mb2, state=state)
    assert resumed == global_batches(data_dir, steps_done + 6, dp=1)[steps_done:]


def test_state_is_refused_for_other_data_or_seed(data_dir: Path, tmp_path: Path) -> None:
    state = TokenShardLoader(data_dir, "train", 4, seed=5).state_dict()
    with pytest.raises(DataError, match="seed=5 in the checkpoint, 6 now"):
        TokenShardLoader(data_dir, "train", 4, seed=6).load_state_dict(state)
    other = make_token_dataset(tmp_path / "other", SHARDS, sample_len=SAMPLE_LEN, first_token=1)
    with pytest.raises(DataError, match="data_ids=.* in the checkpoint"):
        TokenShardLoader(other, "train", 4, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="older format"):
        TokenShardLoader(data_dir, "train", 4).load_state_dict({"epoch": 0, "batch": 3})
    mid_step = TokenShardLoader(data_dir, "train", 2, global_batch_size=8)
    take(mid_step, 3)
    with pytest.raises(ValueError, match="mid-step"):
        mid_step.state_dict()


def test_sorted_corpus_gives_mixed_batches(tmp_path: Path) -> None:
    """20 topics written one after another (as files sorted by source arrive): every global
    batch holds samples of many topics, not one shard's neighbourhood."""
    per_topic, batch = 40, 32
    data = make_token_dataset(tmp_path / "d", [per_topic // 2] * 40, sample_len=SAMPLE_LEN)
    loader = TokenShardLoader(data, "train", batch, seed=0)
    for rows in take(loader, 2 * 20 * per_topic // batch):
        topics = {i // per_topic for i in ids([rows])}
        assert len(topics) >= 12, sorted(topics)  # 32 draws from 20 topics: ~16 expected


def test_mixture_weights_are_honoured(tmp_path: Path) -> None:
    a = make_token_dataset(tmp_path / "a", [50, 50], sample_len=SAMPLE_LEN, vocab_size=2000)
    b = make_token_dataset(
        tmp_path / "b", [30], sample_len=SAMPLE_LEN, first_token=1000, vocab_size=2000
    )
    loader = TokenShardLoader([a, b], "train", 16, global_batch_size=32, weights=[7, 3])
    drawn = [ids([rows]) for rows in take(loader, 200)]
    flat = [i for rows in drawn for i in rows]
    share_a = sum(i < 1000 for i in flat) / len(flat)
    assert abs(share_a - 0.7) <= 1 / len(flat)  # Megatron's rule: within one sample
    assert all(abs(sum(i < 1000 for i in rows) - 0.7 * 16) <= 1 for rows in drawn)
    assert {i for i in flat if i < 1000} == set(range(100))  # every sample of a, epochs
    assert {i for i in flat if i >= 1000} == set(range(1000, 1030))
    # Resumable at another layout, and the state carries the per-dataset counts.
    first = TokenShardLoader([a, b], "train", 16, global_batch_size=32, weights=[7, 3])
    take(first, 14)
    state = first.state_dict()
    assert state["consumed_samples"] == 7 * 32 and sum(state["dataset_samples"]) == 7 * 32
    ranks = []
    for r in range(4):
        loader = TokenShardLoader(
            [a, b],
            "train",
            4,
            global_batch_size=32,
            dp_rank=r,
            dp_size=4,
            weights=[0.7, 0.3],
            num_workers=2 if r == 1 else 0,
        )
        loader.load_state_dict(state)
        ranks.append(ids(take(loader, 2)))
    assert [i for r in ranks for i in r] == [i for rows in drawn[14:16] for i in rows]
    with pytest.raises(DataError, match="weights="):
        TokenShardLoader([a, b], "train", 16, global_batch_size=32).load_state_dict(state)


def test_mixture_needs_one_tokenizer(tmp_path: Path) -> None:
    a = make_token_dataset(tmp_path / "a", [10], sample_len=SAMPLE_LEN)
    b = make_token_dataset(tmp_path / "b", [10], sample_len=SAMPLE_LEN + 1)
    with pytest.raises(DataError, match="seq_len=5 but .* has 4; .* share the tokenizer"):
        TokenShardLoader([a, b], "train", 2)


def test_pipe_url_reads_the_same_batches(data_dir: Path, tmp_path: Path) -> None:
    url = f"pipe:cat {data_dir}/{{name}}"
    cache = tmp_path / "shard-cache"
    via_pipe = global_batches(url, 12, dp=2, workers=2, cache_dir=cache)
    assert via_pipe == global_batches(data_dir, 12, dp=1)
    assert len(list(cache.glob("*.tar"))) == len(SHARDS)  # each shard fetched once, verified
    with pytest.raises(DataError, match="must contain {name}"):
        TokenShardLoader(f"pipe:cat {data_dir}/manifest.json", "train", 2, cache_dir=cache)
    with pytest.raises(DataError, match=r"nowhere/manifest\.json: cannot read manifest"):
        TokenShardLoader(f"pipe:cat {tmp_path}/nowhere/{{name}}", "train", 2, cache_dir=cache)


def _corrupt(data_dir: Path, shard: int) -> str:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    name = manifest["splits"]["train"]["shards"][shard]["name"]
    path = data_dir / name
    raw = bytearray(path.read_bytes())
    raw[600] ^= 1  # one bit of a sample's tokens
    path.write_bytes(bytes(raw))
    return name


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_is_named_or_skipped(tmp_path: Path, workers: int) -> None:
    data = make_token_dataset(tmp_path / "d", SHARDS, sample_len=SAMPLE_LEN)
    name = _corrupt(data, 2)  # samples 20..29
    loader = TokenShardLoader(data, "train", 8, seed=5, num_workers=workers)
    with pytest.raises(DataError, match=rf"{name}: bad shard \(sha256 does not match"):
        take(loader, 20)
    skipping = TokenShardLoader(data, "train", 8, seed=5, skip_bad_shards=True)
    seen = ids(take(skipping, 20))
    assert len(seen) == 160 and not set(range(20, 30)) & set(seen)
    assert skipping.bad_shards == 1
    # The replacement is a function of the data: the same at another dp size and worker count.
    ranks = [
        TokenShardLoader(
            data,
            "train",
            4,
            global_batch_size=8,
            dp_rank=r,
            dp_size=2,
            seed=5,
            skip_bad_shards=True,
            num_workers=workers,
        )
        for r in range(2)
    ]
    per_rank = [ids(take(loader, 20)) for loader in ranks]
    merged = [i for s in range(20) for r in range(2) for i in per_rank[r][4 * s : 4 * s + 4]]
    assert merged == seen


def test_missing_shard_is_named_before_training(tmp_path: Path) -> None:
    data = make_token_dataset(tmp_path / "d", SHARDS, sample_len=SAMPLE_LEN)
    (data / "train-000003.tar").unlink()
    with pytest.raises(DataError, match=r"train-000003\.tar: bad shard \(missing\)"):
        TokenShardLoader(data, "train", 4)
    loader = TokenShardLoader(data, "train", 4, skip_bad_shards=True)
    assert loader.bad_shards == 1 and not set(range(30, 40)) & set(ids(take(loader, 30)))


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_finite_pass_reads_the_split_once_in_order(data_dir: Path, dp: int) -> None:
    per_rank = []
    for rank in range(dp):
        loader = TokenShardLoader(
            data_dir, "val", 2, global_batch_size=12, dp_rank=rank, dp_size=dp, infinite=False
        )
        first = ids(loader)
        assert ids(loader) == first  # iter() starts a fresh pass
        assert loader.batches_per_pass == sum(1 for _ in loader)
        per_rank.append(first)
    # Reassembled global batches (rank slices in rank order) are the split in order.
    val = list(range(N, N + 20))
    assert sorted(i for r in per_rank for i in r) == val
    single = ids(TokenShardLoader(data_dir, "val", 2, global_batch_size=12, infinite=False))
    assert single == val


def test_too_little_data(data_dir: Path, tmp_path: Path) -> None:
    small_eval = TokenShardLoader(data_dir, "val", 16, dp_size=8, infinite=False)
    assert [len(b) for b in small_eval] == [2]  # 20 samples over 8 ranks: rank 0 has 2
    with pytest.raises(DataError, match="no split 'test'"):
        TokenShardLoader(data_dir, "test", 1)
    with pytest.raises(DataError, match="not found; prepare the data first"):
        TokenShardLoader(tmp_path, "train", 1)
    empty = make_token_dataset(tmp_path / "empty", [], sample_len=SAMPLE_LEN)
    with pytest.raises(DataError, match="split 'train' has no samples to train on"):
        TokenShardLoader(empty, "train", 1)
    assert list(TokenShardLoader(empty, "val", 1, infinite=False)) == []
    with pytest.raises(ValueError, match="must be a multiple of micro_batch_size"):
        TokenShardLoader(data_dir, "train", 4, global_batch_size=6, dp_size=1)


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


def test_workers_outlive_a_stop_signal_and_never_hang_the_exit(data_dir: Path) -> None:
    """The DataLoader workers ignore SIGTERM (SLURM signals the whole job step; the trainer
    stops on it and saves), and a process that exits without closing its loader still ends
    them instead of waiting on them forever (multiprocessing SIGTERMs and joins its daemonic
    children at exit)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal, time
        from omnimoe_data.loader import TokenShardLoader
        loader = TokenShardLoader({str(data_dir)!r}, "train", 2, global_batch_size=8,
                                  dp_rank=0, dp_size=1, seed=5, num_workers=2)
        for _ in range(4):  # both workers have started (and run their init) by now
            next(loader)
        workers = loader._it._workers
        for w in workers:
            os.kill(w.pid, signal.SIGTERM)
        time.sleep(1)
        assert all(w.is_alive() for w in workers), "a worker died of SIGTERM"
        next(loader)  # still serving
        print(" ".join(str(w.pid) for w in workers))
    """)  # exits without loader.close()
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for pid in map(int, result.stdout.split()):
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        ), f"worker {pid} outlived the process"
