"""Initial weights that depend only on the seed and each parameter's place in the whole model.

megatron-core initialises on the CPU from torch's global generator, in construction order
(``use_cpu_initialization``: every tensor-parallel weight is a slice of the full master weight
drawn on every rank). That makes tensor, sequence, data and expert parallel runs start from the
single-process weights, but a pipeline stage builds only its own layers, so its draws would
start at another point of the stream. Two rules restore layout independence:

* ``SeededTransformerLayer`` reseeds the global generator with ``(seed, global layer number)``
  before building a layer, so every layer draws the same values whichever stage (or virtual
  chunk) builds it. The embedding is drawn first from the run's seed on the first stage, as in
  one process; an untied output layer is drawn after the last layer on the last stage, as in one
  process.
* The atomic-expert tables are drawn in blocks of rows, each block from its own generator seeded
  by (a seed the layer draws, block index) (``init_table_shard``): a rank draws only the blocks
  of its expert-parallel shard (rows mode), or every block and keeps its columns (dim mode),
  and the values equal the matching slice of the one-process tables. A rows shard of a table too
  large for one GPU is never materialised whole on any rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)

# Rows per block are chosen so a block holds about this many elements (bounds the float32
# scratch of a block; a change changes the drawn values, so it is fixed).
_TABLE_BLOCK_ELEMENTS = 1 << 22
_SEED_MODULUS = 2**63 - 1


def layer_seed(base_seed: int, layer_number: int) -> int:
    """The generator seed of global layer ``layer_number`` (1-based) for run seed ``base_seed``."""
    return (base_seed * 1_000_003 + layer_number * 7_919) % _SEED_MODULUS


class SeededTransformerLayer(TransformerLayer):
    """megatron's ``TransformerLayer``, built from a generator state that depends only on the
    run's seed and the layer's global number (see the module docstring)."""

    def __init__(self, config, submodules, layer_number: int = 1, *args, init_seed: int, **kwargs):  # noqa: ANN001
        vp_stage = kwargs.get("vp_stage")
        pg_collection = kwargs.get("pg_collection")
        if pg_collection is not None:
            pp_rank = pg_collection.pp.rank()
        else:
            from megatron.core import parallel_state

            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        global_number = layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)
        # CPU generator only: megatron's use_cpu_initialization draws there (CUDA streams untouched).
        torch.random.default_generator.manual_seed(layer_seed(init_seed, global_number))
        super().__init__(config, submodules, layer_number, *args, **kwargs)


def draw_seed() -> int:
    """A seed drawn from the global generator (so it follows the layer's seeded stream)."""
    # device="cpu" names the generator it draws from, also under a meta-device build (the
    # parameter count of model.accounting), where a tensor without a device would be meta.
    return int(torch.randint(0, _SEED_MODULUS, (1,), dtype=torch.int64, device="cpu").item())


def init_table_shard(
    shard_ND: torch.Tensor,
    full_shape: tuple[int, int],
    init_method: Callable[[torch.Tensor], None],
    seed: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
) -> None:
    """Fill ``shard_ND`` with rows ``[rows)`` and columns ``[cols)`` of the full (N, D) table that
    ``init_method`` draws block by block: block b (rows b*B .. (b+1)*B) is drawn in float32 from
    the global generator seeded with (seed, b), inside ``fork_rng`` (the caller's stream is left
    as it was). Only the blocks that overlap the shard are drawn."""
    num_rows, width = full_shape
    block = max(1, _TABLE_BLOCK_ELEMENTS // max(width, 1))
    (r0, r1), (c0, c1) = rows, cols
    if shard_ND.shape != (r1 - r0, c1 - c0):
        raise ValueError(f"shard {tuple(shard_ND.shape)} != rows {rows} x cols {cols}")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for b in range(r0 // block, (r1 + block - 1) // block):
            b0, b1 = b * block, min((b + 1) * block, num_rows)
            torch.random.default_generator.manual_seed((seed * 1_000_033 + b) % _SEED_MODULUS)
            values = torch.empty(b1 - b0, width, dtype=torch.float32)
            init_method(values)
            lo, hi = max(b0, r0), min(b1, r1)
            shard_ND[lo - r0 : hi - r0].copy_(values[lo - b0 : hi - b0, c0:c1])
