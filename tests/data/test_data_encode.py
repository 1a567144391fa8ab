"""``prepare``'s encoding of one block: a long document is encoded in pieces cut at spaces
(one 21 MB document without newlines peaked at 3.8 GB encoded whole), with the ids of the
whole document."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from omnimoe_data import encode
from omnimoe_data.corpus import Piece
from omnimoe_data.encode import EncodeOptions, encode_block, split_long
from omnimoe_data.tokenizer import find_eod, train_tokenizer
from tests.data.helpers import WORDS, make_docs

# Runs of spaces, tabs and newlines, contractions, digits, punctuation, non-ASCII: the
# byte-level pre-tokenizer's cases around a space.
_SEPARATORS = [" ", " ", " ", "  ", "\n", " \n ", "\t", " \t", ". ", ", ", "'s ", " 42 ", " ∑ "]


def _long_text(chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS) + rng.choice(_SEPARATORS)
        out.append(word)
        size += len(word)
    return "".join(out)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer(iter(make_docs(200) + [_long_text(20_000, seed=1)]), 300)


def _options(tok: Any) -> EncodeOptions:
    _, eod = find_eod(tok, None)
    return EncodeOptions("text", 0, 0.0, eod, "uint16", tok.to_str())


def _block(tmp_path: Path, texts: list[str]) -> list[Piece]:
    pieces = []
    for i, text in enumerate(texts):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(text, encoding="utf-8")
        pieces.append(Piece(str(path), "txt", 0, path.stat().st_size, path.stat().st_size))
    return pieces


def test_split_long_cuts_before_a_single_space_only() -> None:
    text = "aaaa bbbb  cccc\n dddd eeee"
    pieces = split_long(text, 6)
    assert "".join(pieces) == text
    assert pieces == ["aaaa", " bbbb  cccc\n dddd", " eeee"]
    assert split_long("x" * 50, 10) == ["x" * 50]  # nowhere to cut: whole


def test_a_long_document_is_encoded_in_pieces_with_the_whole_documents_ids(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 1000
    monkeypatch.setattr(encode, "PIECE_CHARS", limit)
    encode._ENCODERS.clear()
    options = _options(tokenizer)
    normal, long = make_docs(1)[0], _long_text(30 * limit)
    texts = [normal, long, normal]
    encoded: list[str] = []

    class Spy:  # records every text handed to the tokenizer
        def __init__(self, tok: Any) -> None:
            self.tok = tok

        def encode_batch_fast(self, batch: list[str], **kwargs: Any) -> Any:
            encoded.extend(batch)
            return self.tok.encode_batch_fast(batch, **kwargs)

    tok = encode._encoder(options.tokenizer_json)
    monkeypatch.setattr(encode, "_encoder", lambda _: Spy(tok))
    result = encode_block(_block(tmp_path, texts), options)

    whole = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    want = np.concatenate([np.array([*ids, options.eod_id], dtype=np.uint16) for ids in whole])
    assert np.array_equal(result.tokens, want)
    assert result.doc_tokens.tolist() == [len(ids) + 1 for ids in whole]
    assert max(len(t) for t in encoded) <= limit  # the long one in pieces
    assert len(encoded) > len(texts) and "".join(encoded) == "".join(texts)
    for seed in range(1, 6):  # more texts, cut finer
        text = _long_text(5 * limit, seed)
        pieces = split_long(text, 50)
        assert len(pieces) > 50
        ids = [i for p in pieces for i in tokenizer.encode(p, add_special_tokens=False).ids]
        assert ids == tokenizer.encode(text, add_special_tokens=False).ids, seed


def test_another_tokenizer_encodes_documents_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cuts at spaces are boundaries of the byte-level pre-tokenizer only: a tokenizer with a
    normalizer (or another pre-tokenizer) gets each document whole, as before."""
    from tokenizers import normalizers

    tok = train_tokenizer(iter(make_docs(50)), 300)
    tok.normalizer = normalizers.Lowercase()
    monkeypatch.setattr(encode, "PIECE_CHARS", 100)
    encode._ENCODERS.clear()
    options = _options(tok)
    text = _long_text(1000)
    result = encode_block(_block(tmp_path, [text]), options)
    assert result.tokens[:-1].tolist() == tok.encode(text, add_special_tokens=False).ids
    assert not encode.splits_at_spaces(options.tokenizer_json)
