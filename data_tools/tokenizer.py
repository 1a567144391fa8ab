"""Tokenizers: training a byte-level BPE, loading one, and encoding text as text.

Text is encoded with ``encode_special_tokens=True``: a document that contains the literal
characters of a special token (``<|endoftext|>``, ``</s>``, ...) gets the ordinary tokens
of those characters, so the only end-of-document ids in a packed stream are the ones the
packer appends. The flag is not saved in ``tokenizer.json``; :func:`text_encoder` sets it
on every tokenizer this package encodes with.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from .corpus import BOM, DataError

EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens recognised in a user-supplied tokenizer, in order of preference.
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")

#: The longest run of non-space (or of space) characters the tokenizer's trainer sees whole.
#: tokenizers' BPE trainer takes time quadratic in the length of a repetitive pre-tokenized
#: word: a line of 300,000 'x' (or newlines, '=' ...) took 90 s, one of 3 MB hours, in Rust,
#: deaf to stop signals. Longer runs reach it cut into pieces of this length; no merge learned
#: is that long, so the vocabulary learned from ordinary text is unchanged.
TRAINING_RUN_CHARS = 1024
# Anchored at a run's start (the look-behind), so the scan stays linear in the text.
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{TRAINING_RUN_CHARS},}}|(?<!\s)\s{{{TRAINING_RUN_CHARS},}}")


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
            yield from training_pieces(doc)

    tok.train_from_iterator(counted(), trainer=trainer)
    return tok if seen else None


def training_pieces(doc: str) -> Iterator[str]:
    """``doc`` as the trainer sees it (each piece a sequence of its own): whole, unless it
    holds a run of ``TRAINING_RUN_CHARS`` or more non-space (or space) characters; then the
    text between such runs, and each run in pieces of at most ``TRAINING_RUN_CHARS``."""
    pos = 0
    for run in _LONG_RUN.finditer(doc):
        if run.start() > pos:
            yield doc[pos : run.start()]
        for start in range(run.start(), run.end(), TRAINING_RUN_CHARS):
            yield doc[start : min(start + TRAINING_RUN_CHARS, run.end())]
        pos = run.end()
    if pos == 0:
        yield doc
    elif pos < len(doc):
        yield doc[pos:]


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
