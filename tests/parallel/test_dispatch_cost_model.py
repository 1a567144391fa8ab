"""Cost model of the expert-table sharding: expectations, monotonicity and the auto choice.

That the formulas equal the bytes real runs send is checked in ``test_sharded_experts``.
"""

from __future__ import annotations

import pytest
import torch

from omnimoe_train.parallel.cost_model import (
    choose_sharding,
    describe_choice,
    expected_dest_ranks,
    predict_bytes,
)

BASE = dict(tokens=4096, d=1024, k=64, num_experts=102_400, ranks=8, dtype_bytes=2)


def test_expected_dest_ranks_matches_monte_carlo() -> None:
    num_experts, ranks, top_k, samples = 64, 4, 5, 20_000
    gen = torch.Generator().manual_seed(0)
    experts_SK = torch.rand(samples, num_experts, generator=gen).argsort(dim=1)[:, :top_k]
    dest_SK = experts_SK // (num_experts // ranks)
    present_SP = torch.zeros(samples, ranks).scatter_(1, dest_SK, 1.0)
    measured = present_SP.sum(1).mean().item()
    expected = expected_dest_ranks(num_experts=num_experts, top_k=top_k, ranks=ranks)
    assert abs(measured - expected) < 0.02, (measured, expected)
    # Sampling without replacement spreads more than the with-replacement approximation.
    assert expected > ranks * (1 - (1 - 1 / ranks) ** top_k)


@pytest.mark.parametrize(
    ("num_experts", "top_k", "ranks", "expected"),
    [
        (16, 1, 4, 1.0),
        (16, 16, 4, 4.0),
        (16, 5, 4, 4.0 * (1 - (12 * 11 * 10 * 9 * 8) / (16 * 15 * 14 * 13 * 12))),
        (100, 7, 1, 1.0),
    ],
)
def test_expected_dest_ranks_exact_values(num_experts, top_k, ranks, expected) -> None:
    got = expected_dest_ranks(num_experts=num_experts, top_k=top_k, ranks=ranks)
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mode", ["rows", "dim"])
@pytest.mark.parametrize("key", ["tokens", "d", "k", "ranks"])
def test_bytes_grow_with_every_size(mode: str, key: str) -> None:
    small = predict_bytes(mode, **BASE)
    large = predict_bytes(mode, **{**BASE, key: BASE[key] * 2})
    for direction in ("forward", "backward"):
        assert large[direction] > small[direction] > 0
    assert small["total"] == small["forward"] + small["backward"]


@pytest.mark.parametrize("mode", ["rows", "dim"])
def test_one_rank_sends_nothing(mode: str) -> None:
    predicted = predict_bytes(mode, **{**BASE, "ranks": 1})
    assert predicted["forward"] == predicted["backward"] == 0


def test_rows_and_dim_bytes_do_not_depend_on_num_experts() -> None:
    for mode in ("rows", "dim"):
        totals = [predict_bytes(mode, **{**BASE, "num_experts": n})["total"] for n in (4096, 10**6)]
        assert totals[0] == totals[1]
    # The all-to-all reference does, slightly: fewer experts spread a token over more ranks.
    a2a = [predict_bytes("rows_a2a", **{**BASE, "num_experts": n})["total"] for n in (4096, 10**6)]
    assert a2a[1] <= a2a[0] <= a2a[1] * 1.01


def test_exact_formulas_at_a80m() -> None:
    """a80m on 2 GPUs (16 x 1024 tokens, d = 768, K = 64, bf16): every term by hand."""
    shape = dict(tokens=16384, d=768, k=64, num_experts=76 * 76, ranks=2, dtype_bytes=2)
    rows, dim = predict_bytes("rows", **shape), predict_bytes("dim", **shape)
    T = 16384
    assert rows["forward"] == T * (768 * 2 + 64 * 8) + T * 768 * 2
    assert rows["backward"] == T * 768 * 2 + T * (768 * 2 + 64 * 4)
    assert dim["forward"] == 2 * T * 384 * 2 + T * 64 * (4 + 4 + 8)
    assert dim["backward"] == 2 * T * 384 * 2 + 2 * T * 64 * 4


def test_auto_choice_follows_the_bytes() -> None:
    # Rows gathers every token to every rank; dim sends 1/P of each row plus K fp32 scores:
    # dim wins unless K is large next to D (rows - dim ~ 4 (P-1) T (D b (1 - 1/P) - 3 K)).
    a80m = dict(tokens=16384, d=768, k=64, num_experts=76 * 76, ranks=2, dtype_bytes=2)
    for shape, winner in (
        (a80m, "dim"),
        ({**BASE, "k": 1}, "dim"),
        ({**a80m, "d": 256, "k": 128}, "rows"),
        ({**BASE, "d": 256, "k": 512, "ranks": 2}, "rows"),
    ):
        choice, predicted = choose_sharding(**shape)
        assert choice == winner, (shape, predicted)
        assert predicted[choice]["total"] == min(p["total"] for p in predicted.values())
        assert set(predicted) == {"rows", "dim"}


def test_auto_respects_allowed_modes_and_logs_one_line() -> None:
    choice, predicted = choose_sharding(**{**BASE, "k": 2}, allowed=("dim",))
    assert choice == "dim" and set(predicted) == {"dim"}
    line = describe_choice(choice, predicted)
    assert "\n" not in line and "dim" in line and "MB" in line
    with pytest.raises(ValueError):
        choose_sharding(**BASE, allowed=("columns",))
    with pytest.raises(ValueError):
        predict_bytes("columns", **BASE)


def test_measured_destinations_override_and_table_gather_reference() -> None:
    uniform = predict_bytes("rows_a2a", **BASE)
    clustered = predict_bytes("rows_a2a", **BASE, dest_ranks_per_token=2.0)
    assert clustered["dest_ranks_per_token"] == 2.0 and clustered["total"] < uniform["total"]
    gather = predict_bytes("gather", **BASE)
    assert gather["forward"] == 2 * BASE["num_experts"] * BASE["d"] * 2 * 7 / 8
    assert gather == predict_bytes("gather", **{**BASE, "tokens": 1, "k": 1})
