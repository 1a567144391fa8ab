"""Layout-independent initialisation: table shards are slices of one block-seeded draw."""

from __future__ import annotations

import pytest
import torch

from omnimoe_train.model import init as model_init
from omnimoe_train.model.init import init_table_shard, layer_seed


def _normal(std: float):
    return lambda t: torch.nn.init.normal_(t, std=std)


def _draw(shape, seed, rows, cols):
    shard = torch.empty(rows[1] - rows[0], cols[1] - cols[0])
    init_table_shard(shard, shape, _normal(0.02), seed, rows, cols)
    return shard


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_row_and_column_shards_are_slices_of_the_full_table(monkeypatch, ranks) -> None:
    monkeypatch.setattr(model_init, "_TABLE_BLOCK_ELEMENTS", 7 * 6)  # blocks of 7 rows
    shape = (30, 6)
    full = _draw(shape, 11, (0, 30), (0, 6))
    bounds = [round(i * 30 / ranks) for i in range(ranks + 1)]  # boundaries inside blocks
    rows = [_draw(shape, 11, (a, b), (0, 6)) for a, b in zip(bounds, bounds[1:])]
    assert torch.equal(torch.cat(rows), full)
    if 6 % ranks == 0:
        w = 6 // ranks
        cols = [_draw(shape, 11, (0, 30), (r * w, (r + 1) * w)) for r in range(ranks)]
        assert torch.equal(torch.cat(cols, dim=1), full)
    assert 0.01 < full.std().item() < 0.03
    assert not torch.equal(_draw(shape, 12, (0, 30), (0, 6)), full)  # the seed matters


def test_table_draw_leaves_the_callers_generator_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    _draw((8, 4), 5, (2, 6), (0, 4))
    assert torch.equal(torch.rand(4), expected)


def test_layer_seeds_differ_per_layer_and_run() -> None:
    seeds = {layer_seed(base, layer) for base in (0, 1234) for layer in range(1, 50)}
    assert len(seeds) == 98
    with pytest.raises(ValueError):
        init_table_shard(torch.empty(3, 3), (10, 4), _normal(1.0), 0, (0, 3), (0, 4))
