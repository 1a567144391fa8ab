"""Tokenizers: training a byte-level BPE, loading one, and encoding text as text.

Text is encoded with ``encode_special_tokens=True``: a document that contains the literal
characters of a special token (``<|endoftext|>``, ``</s>``, ...) gets the ordinary tokens
of those characters, so the only end-of-document ids in a packed stream are the ones the
packer appends. The flag is not saved in ``tokenizer.json``; :func:`text_encoder` sets it
on every tokenizer this package encodes with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from .corpus import BOM, DataError

EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens recognised in a user-supplied tokenizer, in order of preference.
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")


def train_tokenizer(docs: Iterator[str], vocab_size: int):  # noqa: ANN201 - tokenizers type
    """Byte-level BPE, as in GPT-2 (``tokenizers.trainers.BpeTrainer``): every string
    encodes, and decoding is lossless. ``None`` when ``docs`` is empty."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for doc in docs:
            seen += 1
            yield doc

    tok.train_from_iterator(counted(), trainer=trainer)
    return tok if seen else None


def load_tokenizer(path: str | Path):  # noqa: ANN201
    """A ``tokenizer.json``; a leading UTF-8 byte-order mark (Windows editors) is dropped."""
    from tokenizers import Tokenizer

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(
            f"{path}: cannot load tokenizer ({err.strerror or err})", option="tokenizer"
        ) from None
    try:
        return Tokenizer.from_str(data.removeprefix(BOM).decode("utf-8"))
    except Exception as err:  # tokenizers raises plain Exception for bad files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot load tokenizer ({reason})", option="tokenizer") from err


def text_encoder(tokenizer_json: str):  # noqa: ANN201
    """A tokenizer from its JSON that encodes special-token text as plain text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True
    return tok


def find_eod(tok, tokenizer_path: str | Path | None) -> tuple[str, int]:  # noqa: ANN001
    for token in EOD_CANDIDATES:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token, token_id
    raise DataError(
        f"{tokenizer_path}: tokenizer has no end-of-document token; "
        f"add one of {', '.join(EOD_CANDIDATES)}",
        option="tokenizer",
    )


def tokenizer_sha256(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()
