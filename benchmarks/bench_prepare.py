"""Preparation throughput: ``omnimoe-data prepare`` against the ``tokenizers`` library alone.

The corpus is this Python's standard-library sources (tests included), one JSON line per
file, repeated until it reaches ``--mb`` megabytes, written to ``--corpus`` unless it is
already there (it is not part of the repository; nothing is downloaded). Two timings on the
same text, same vocabulary size:

* ``tokenizers`` alone: ``Tokenizer.train_from_iterator`` (byte-level BPE) then
  ``encode_batch_fast`` over every document, texts already in memory (their reading is
  timed apart), using the library's own threads;
* ``prepare``: the whole pipeline end to end (read and parse, train the tokenizer, encode in
  ``--workers`` processes, split, pack into seq_len 1024 samples, write and hash shards).

Tokens/s per core divides by the cores this process may use. The machine load (1-minute
average) is printed before and after, since shared machines skew both numbers.

Run: ``python benchmarks/bench_prepare.py --corpus /tmp/corpus --mb 110 [--workers N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path

from omnimoe_data.prepare import prepare


def build_corpus(root: Path, megabytes: int) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    root.mkdir(parents=True, exist_ok=True)
    total, copy = 0, 0
    while total < megabytes * 10**6:
        path = root / f"stdlib-{copy:02d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for source in sources:
                try:
                    text = source.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                f.write(json.dumps({"text": text}) + "\n")
        total += path.stat().st_size
        copy += 1
    return root


def read_texts(corpus: Path) -> list[str]:
    texts = []
    for path in sorted(corpus.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts


def library_alone(texts: list[str], vocab_size: int) -> tuple[float, float, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    start = time.perf_counter()
    tok.train_from_iterator(texts, trainer=trainer)
    trained = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i : i + 1000]))
    return trained - start, time.perf_counter() - trained, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="corpus folder (made if absent)")
    parser.add_argument("--mb", type=int, default=110, help="corpus size to generate")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--workers", type=int, default=None, help="default: every core")
    parser.add_argument("--skip-library", action="store_true", help="time prepare only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    if not any(args.corpus.glob("*.jsonl")):
        build_corpus(args.corpus, args.mb)
    size = sum(p.stat().st_size for p in args.corpus.glob("*.jsonl"))
    result: dict = {"corpus_bytes": size, "cores": cores, "load_before": os.getloadavg()[0]}
    print(f"corpus {size / 1e6:.1f} MB, {cores} cores, load {result['load_before']:.1f}")
    if not args.skip_library:
        start = time.perf_counter()
        texts = read_texts(args.corpus)
        result["library_read_s"] = time.perf_counter() - start
        train_s, encode_s, tokens = library_alone(texts, args.vocab_size)
        del texts
        result |= {"library_train_s": train_s, "library_encode_s": encode_s, "tokens": tokens}
        seconds = train_s + encode_s
        print(
            f"tokenizers alone: train {train_s:.1f} s + encode {encode_s:.1f} s = {seconds:.1f} s"
            f" (+ {result['library_read_s']:.1f} s reading); {tokens / seconds:,.0f} tokens/s,"
            f" {tokens / seconds / cores:,.0f} per core"
        )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = prepare(
            [args.corpus],
            Path(tmp) / "out",
            vocab_size=args.vocab_size,
            seq_len=1024,
            workers=args.workers,
            progress=False,
        ).manifest
        seconds = time.perf_counter() - start
    tokens = sum(s["stream_tokens"] for s in manifest["splits"].values())
    docs = sum(s["documents"] for s in manifest["splits"].values())
    result |= {"prepare_s": seconds, "prepare_tokens": tokens, "documents": docs}
    result["load_after"] = os.getloadavg()[0]
    print(
        f"prepare (workers {args.workers or cores}): {seconds:.1f} s end to end; "
        f"{tokens / seconds:,.0f} tokens/s, {tokens / seconds / cores:,.0f} per core; "
        f"load {result['load_after']:.1f}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
