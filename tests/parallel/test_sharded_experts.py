"""Sharded atomic experts (rows and dim) on gloo ranks equal the single-process op.

Each spawned run checks outputs, loss, dx, dweights and the gathered table gradients against
``atomic_experts`` on the concatenated tokens, and the reported bytes against the cost model
(see ``sharding_checks``). Spawning costs seconds, so each run checks a batch of cases.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .distributed import run_distributed
from .pair_ranges_checks import check_rows_pair_ranges
from .sharding_checks import (
    Case,
    check_bytes_per_rank,
    check_cases,
    check_cases_triton,
    check_odd_byte_layouts,
)

MODES = ("rows", "dim")


@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_single_process_uniform_routing(world_size: int) -> None:
    tokens = (5, 3, 0, 4)[:world_size] if world_size == 4 else (6, 3)
    cases = [
        Case(tokens_per_rank=tokens, hidden=8, num_experts=16, top_k=5, seed=1),
        Case(tokens_per_rank=tokens, hidden=12, num_experts=64, top_k=12, seed=2),
    ]
    run_distributed(check_cases, world_size, cases, MODES)


def test_edge_routings_two_ranks() -> None:
    # N = 16, rank 0 owns experts 0..7, rank 1 owns 8..15.
    cases = [
        # rank 0 has no tokens; every expert lives on rank 0, so rank 1 receives nothing.
        Case((0, 4), 4, 16, 3, indices=((0, 1, 2), (3, 4, 5), (7, 6, 0), (2, 5, 1))),
        # tokens whose K experts all live on one rank (local and remote), and mixed ones.
        Case((3, 2), 4, 16, 3, indices=((9, 12, 15), (0, 3, 7), (1, 8, 14), (8, 9, 10), (2, 5, 6))),
        # rank 1 has no tokens but receives all of rank 0's work.
        Case((2, 0), 4, 16, 3, indices=((8, 9, 10), (15, 11, 12))),
        # no tokens anywhere.
        Case((0, 0), 4, 16, 3, indices=()),
        # K = N: every token uses every expert.
        Case((2, 1), 4, 4, 4, seed=3),
    ]
    run_distributed(check_cases, 2, cases, MODES)


def test_odd_byte_layouts_two_ranks() -> None:
    """A group of one token (rows of one, which count as contiguous: no realigning copy) with
    odd K, so the packed weights start off their dtype's boundary; int32 ids as a strided
    view (columns of a wider tensor), which the packed send must copy, not view as words."""
    cases = [
        Case((1, 0), 4, 16, 3, indices=((2, 9, 14),)),
        Case((0, 1), 2, 16, 1, indices=((11,),)),
        Case((2, 1), 4, 16, 2, seed=6),
        Case((3, 3), 4, 16, 2, seed=7),
    ]
    run_distributed(check_odd_byte_layouts, 2, cases, MODES)


@pytest.mark.parametrize(
    ("grad_path", "distinct_ids"),
    [(None, False), ("dense", False), ("dense", True)],
    ids=["auto", "dense", "dense_distinct"],
)
def test_triton_kernels_two_ranks(grad_path: str | None, distinct_ids: bool) -> None:
    """The sharded ops on the Triton kernels: rows skips other ranks' pairs (id E), dim runs
    the partial-score, combine and table-gradient kernels on column slices; the weight
    gradients by the pair kernel (auto on CPU) or forced onto the dense GEMMs, where rows'
    "no expert" pairs must be dropped; with the routers' distinct-ids promise (both modes
    skip the merge of repeats)."""
    cases = [
        Case((5, 3), 8, 16, 5, seed=5),
        Case((3, 2), 4, 16, 3, indices=((9, 12, 15), (0, 3, 7), (1, 8, 14), (8, 9, 10), (2, 5, 6))),
    ]
    run_distributed(check_cases_triton, 2, cases, MODES, "cpu", grad_path, distinct_ids)


def test_bytes_match_prediction_on_every_rank() -> None:
    run_distributed(check_bytes_per_rank, 2, Case((4, 4), 8, 16, 3, seed=4))


@st.composite
def routed_cases(draw: st.DrawFn, world_size: int) -> Case:
    """Random sizes and routing; tokens pick experts uniformly, on one rank, or on two ranks."""
    n = draw(st.sampled_from([n for n in (2, 4, 8) if n % world_size == 0]))
    num_experts, block = n * n, n * n // world_size
    top_k = draw(st.integers(1, min(num_experts, 6)))
    hidden = world_size * draw(st.integers(1, 3))
    tokens = tuple(draw(st.lists(st.integers(0, 4), min_size=world_size, max_size=world_size)))
    indices = []
    for _ in range(sum(tokens)):
        style = draw(st.sampled_from(["uniform", "one_rank", "two_ranks"]))
        if style == "uniform" or top_k > block:
            pool = list(range(num_experts))
        else:
            owners = draw(
                st.lists(
                    st.integers(0, world_size - 1), min_size=1, max_size=1 + (style == "two_ranks")
                )
            )
            pool = [e for r in sorted(set(owners)) for e in range(r * block, (r + 1) * block)]
        indices.append(tuple(draw(st.permutations(pool))[:top_k]))
    seed = draw(st.integers(0, 2**16))
    return Case(tokens, hidden, num_experts, top_k, seed=seed, indices=tuple(indices))


_PROPERTY = settings(
    max_examples=3,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_PROPERTY
@given(cases=st.lists(routed_cases(2), min_size=4, max_size=4))
def test_random_routing_two_ranks(cases: list[Case]) -> None:
    run_distributed(check_cases, 2, cases, MODES)


@settings(_PROPERTY, max_examples=2)
@given(cases=st.lists(routed_cases(4), min_size=3, max_size=3))
def test_random_routing_four_ranks(cases: list[Case]) -> None:
    run_distributed(check_cases, 4, cases, MODES)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rows_ascending_ids_walk_pair_ranges(world_size: int) -> None:
    """Ascending ids (the routers' promise): the rows op passes each token's run of this rank's
    slots to the kernels (ranges checked against the ids they describe) and the values stay the
    single-process op's; through ``ExpertParallel`` too, with and without the overlap. Tokens
    whose pairs are all on one rank (count 0 / K on the others) and runs in the middle of a row
    (4 ranks) included."""
    if world_size == 2:
        cases = [
            Case((5, 3), 8, 16, 5, seed=5),
            Case(
                (3, 2),
                4,
                16,
                3,
                indices=((9, 12, 15), (0, 3, 7), (1, 8, 14), (8, 9, 10), (2, 5, 6)),
            ),
            Case((2, 1), 4, 4, 4, seed=3),  # K = N: every token on every expert
        ]
        equal = [Case((4, 4), 8, 16, 6, seed=7)]
    else:
        cases = [
            Case((3, 2, 0, 4), 8, 64, 12, seed=8),
            # one token with ids at every block edge: 15/16, 31/32, 47/48.
            Case(
                (1, 1, 1, 1),
                4,
                64,
                6,
                indices=(
                    (15, 16, 31, 32, 47, 48),
                    (0, 1, 2, 3, 4, 5),
                    (60, 61, 62, 63, 0, 1),
                    (16, 17, 18, 19, 20, 21),
                ),
            ),
        ]
        equal = [Case((3, 3, 3, 3), 4, 64, 10, seed=9)]
    run_distributed(check_rows_pair_ranges, world_size, cases, equal)
