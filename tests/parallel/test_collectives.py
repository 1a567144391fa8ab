"""Byte-level helpers of ``parallel.collectives``: wide-word copies and packed rows."""

from __future__ import annotations

import pytest
import torch

from omnimoe_train.parallel.collectives import (
    contiguous_wide,
    pack_rows,
    rows_as,
    unpack_rows,
    widest_word,
)


@pytest.mark.parametrize(
    ("spans", "word"),
    [
        ((768, 256, 128), torch.int64),
        ((768, 260), torch.int32),
        ((6, 4), torch.int16),
        ((3,), torch.uint8),
        ((0, 8), torch.int64),
    ],
)
def test_widest_word(spans, word):
    assert widest_word(*spans) == word


def _layouts():
    """(name, strided tensor) of the layouts the exchanges copy, and ones no wide word fits."""
    bf16 = torch.randn(48, 2, 384).to(torch.bfloat16)
    packed = torch.randint(0, 256, (17, 1152), dtype=torch.uint8)
    yield "bf16 block swap", bf16.transpose(0, 1)
    yield "fp32 block swap", torch.randn(5, 3, 8).transpose(0, 1)
    yield "uint8 column chunk", packed[:, 768:1024]
    yield "uint8 odd chunk", packed[:, 3:10]
    yield "uint8 offset 4", packed[:, 4:12]
    yield "misaligned address", packed.view(-1)[1:].view(1, -1)[:, :16]
    yield "non-unit last stride", bf16[:, :, ::2]
    yield "empty rows", packed[:0, 8:16]
    yield "int32 ids", torch.randint(0, 9, (6, 4, 64), dtype=torch.int32).transpose(0, 1)


@pytest.mark.parametrize(("name", "t"), list(_layouts()), ids=[n for n, _ in _layouts()])
def test_contiguous_wide_equals_contiguous(name, t):
    out = contiguous_wide(t)
    assert out.is_contiguous() and out.dtype == t.dtype and out.shape == t.shape, name
    assert torch.equal(out, t.contiguous()), name


def test_unpack_rows_inverts_pack_rows_at_any_offset():
    ids = torch.randint(0, 1000, (9, 5), dtype=torch.int32)
    weights = torch.randn(9, 5).to(torch.bfloat16)
    flags = torch.rand(9, 3) > 0.5
    x = torch.randn(9, 2, 4)
    like = [(p.dtype, tuple(p.shape[1:])) for p in (flags, ids, weights, x)]
    out = unpack_rows(pack_rows([flags, ids, weights, x]), like)
    for got, want in zip(out, (flags, ids, weights, x)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_contiguous_wide_on_storage_not_starting_on_a_word():
    """Storage that starts off a word boundary (``frombuffer`` at an offset): an aligned
    address can then sit at an unaligned storage offset, which the view to a wide word checks."""
    buffer = bytearray(300)
    for base in range(8):
        storage = torch.frombuffer(buffer, dtype=torch.uint8, offset=base, count=280)
        for skip in range(8):
            t = storage[skip : skip + 256].view(16, 16)[:, :8]
            assert torch.equal(contiguous_wide(t), t.contiguous()), (base, skip)


@pytest.mark.parametrize("rows", [1, 2])
def test_unpack_rows_of_one_row_at_odd_byte_offsets(rows):
    """One row: its byte columns count as contiguous, so no copy realigns them, and the view
    to a wider dtype must still work (a group of one token: an uneven EP split)."""
    x = torch.randn(rows, 3).to(torch.bfloat16)  # 6 bytes: the ids start at byte 6
    ids = torch.randint(0, 1000, (rows, 3), dtype=torch.int32)
    weights = torch.randn(rows, 3)  # at byte 18
    like = [(p.dtype, tuple(p.shape[1:])) for p in (x, ids, weights)]
    out = unpack_rows(pack_rows([x, ids, weights]), like)
    for got, want in zip(out, (x, ids, weights)):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize(
    ("name", "t", "word"),
    [
        (
            "lone row, odd stride",
            torch.arange(12, dtype=torch.int32).view(4, 3)[1:2, 1:3],
            torch.int64,
        ),
        ("lone column", torch.arange(5, dtype=torch.int32).view(1, 5).t(), torch.int32),
        ("odd offset", torch.randn(2, 6).to(torch.bfloat16)[1:, 1:5], torch.int64),
        ("strided rows", torch.arange(24, dtype=torch.int32).view(4, 6)[:, :4], torch.int64),
    ],
)
def test_rows_as_any_layout(name: str, t: torch.Tensor, word: torch.dtype) -> None:
    """``rows_as``: the rows' bytes as words from any layout of a (T, X) tensor (dim's packed
    send writes x, ids and weights this way)."""
    words = rows_as(t, word)
    assert words.shape[0] == t.shape[0], name
    assert torch.equal(words.view(t.dtype).view(t.shape), t), name
