"""``omnimoe-data``: prepare token datasets, merge parts, and inspect them.

    omnimoe-data prepare [INPUT ...] --out DIR [options]   # no INPUT: the stdlib corpus
    omnimoe-data train-tokenizer [INPUT ...] --out FILE     # the tokenizer prepare trains
    omnimoe-data prepare INPUT ... --tokenizer FILE --part i/n --out PART_DIR
    omnimoe-data merge PART_DIR ... --out DIR               # parts -> one dataset
    omnimoe-data inspect DIR                                # summary + sha256 check

A :class:`~omnimoe_data.corpus.DataError` prints ``omnimoe-data: error: <message>`` on
stderr and exits with status 2 (as argparse does for bad options), without a traceback.
SIGTERM (``kill``, ``scancel``) stops a command at once in one line, exit 143; SIGUSR1 (SLURM's
warning before a time limit or a preemption, ``--signal=USR1@...``) the same way with exit 75
(EX_TEMPFAIL, as ``omnimoe-train`` exits when preempted: rerun to continue). As on Ctrl-C (130),
what an unfinished ``prepare`` or ``merge`` wrote is removed (no manifest: nothing half-written
passes for a dataset) and the workers are ended.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

import numpy as np
from rich.console import Console
from rich.table import Table

from .corpus import DEFAULT_CORPUS_MAX_BYTES, DataError
from .merge import merge
from .plan import DEFAULT_BLOCK_BYTES, parse_part
from .prepare import prepare
from .shards import index_shard
from .source import DataSource
from .tokenizer_training import train_tokenizer_file

PROG = "omnimoe-data"
EXIT_TERMINATED = 128 + signal.SIGTERM  # as the shell reports a process SIGTERM ended
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: omnimoe-train's exit code for a preemption (rerun)
#: The stop signals and the exit code of each.
STOP_SIGNALS: dict[signal.Signals, int] = {
    signal.SIGTERM: EXIT_TERMINATED,
    signal.SIGUSR1: EXIT_TEMPFAIL,
}


class Terminated(BaseException):
    """A stop signal (``signal_name``: SIGTERM or SIGUSR1), raised in the main thread as SIGINT
    raises ``KeyboardInterrupt``: a ``BaseException``, so the cleanup of ``prepare`` and
    ``merge`` (``except BaseException``) runs and no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    del frame
    # Once: a second stop signal (an impatient scheduler) ends the process at once; the pool's
    # workers die with it (``workers._init_bound_worker``) and no manifest was written.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    raise Terminated(signum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize text into packed webdataset shards")
    _add_input_options(p)
    p.add_argument("--out", required=True, type=_out_path, help="output folder")
    p.add_argument("--tokenizer", type=Path, help="use this tokenizer.json instead of training")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=1024)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument(
        "--part",
        type=_part,
        help="prepare only part i of n (0-based; needs --tokenizer); join with merge",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    t = sub.add_parser("train-tokenizer", help="train the byte-level BPE tokenizer only")
    _add_input_options(t)
    t.add_argument("--out", required=True, type=_out_path, help="tokenizer.json to write")

    m = sub.add_parser("merge", help="merge parts prepared with --part into one dataset")
    m.add_argument("parts", nargs="+", type=Path, metavar="PART_DIR")
    m.add_argument("--out", required=True, type=_out_path, help="output folder")

    i = sub.add_parser("inspect", help="print a dataset's manifest and verify shard sha256")
    i.add_argument("dir", metavar="DIR_OR_URL", help="dataset folder or URL (see data.dir)")
    return parser


def _part(text: str) -> tuple[int, int]:
    try:
        return parse_part(text)
    except DataError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _out_path(text: str) -> Path:
    """A non-empty ``--out``: an empty one (``--out "$OUT"`` with ``OUT`` unset) named the
    current folder, where ``prepare`` wrote its dataset and first removed the shards there."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "must not be empty (it would name the current folder); give the output path"
        )
    return Path(text)


def _positive_bytes(text: str) -> int:
    """A byte count >= 1 (``--max-bytes 0`` read nothing and ended in "no usable documents in
    the input", as if the corpus were at fault); leaving the option out is "no cap"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1 (got {value}); leave the option out for no cap"
        )
    return value


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help=".txt, .jsonl or .parquet files or folders (none: the Python "
        "standard library sources)",
    )
    p.add_argument("--vocab-size", type=int, default=4096, help="of a trained tokenizer")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column")
    p.add_argument(
        "--max-bytes",
        type=_positive_bytes,
        default=None,
        help=f"stop after this many bytes of text (stdlib corpus default: "
        f"{DEFAULT_CORPUS_MAX_BYTES})",
    )
    p.add_argument(
        "--tokenizer-sample-bytes",
        type=_positive_bytes,
        default=None,
        help="train the tokenizer on about this many bytes spread over the corpus "
        "(default: all of it)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: every core)"
    )
    p.add_argument(
        "--block-bytes",
        type=int,
        default=DEFAULT_BLOCK_BYTES,
        help="bytes of input per block, the unit of parallel work and packing",
    )


def _input_options(args: argparse.Namespace) -> dict:
    """The options :func:`_add_input_options` adds (besides the inputs), as keyword arguments
    of ``prepare`` and ``train_tokenizer_file``."""
    return {
        "vocab_size": args.vocab_size,
        "text_field": args.text_field,
        "max_bytes": args.max_bytes,
        "tokenizer_sample_bytes": args.tokenizer_sample_bytes,
        "block_bytes": args.block_bytes,
        "workers": args.workers,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    # Before: the signal's default action, exit 143 (SIGTERM) or 138 (SIGUSR1) without a word,
    # the pool's workers gone only through their parent-death signal and an unfinished output
    # left for the next run to clear.
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}
    try:
        if args.command == "prepare":
            _prepare(args, console)
        elif args.command == "train-tokenizer":
            path = train_tokenizer_file(args.inputs or None, args.out, **_input_options(args))
            console.print(f"wrote {path}")
        elif args.command == "merge":
            result = merge(args.parts, args.out)
            _print_summary(result.manifest, console)
            console.print(f"wrote {result.manifest_path}")
        else:
            _inspect(args.dir, console)
    except DataError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Terminated as stop:
        what = "terminated" if stop.signum == signal.SIGTERM else "stop signal"
        print(
            f"{PROG}: {what} ({stop.signal_name}): stopped, nothing unfinished was published "
            f"(what was half-written is removed); run the same command again",
            file=sys.stderr,
        )
        return STOP_SIGNALS[signal.Signals(stop.signum)]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _prepare(args: argparse.Namespace, console: Console) -> None:
    result = prepare(
        args.inputs or None,
        args.out,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        samples_per_shard=args.samples_per_shard,
        val_fraction=args.val_fraction,
        seed=args.seed,
        part=args.part,
        progress=not args.no_progress,
        **_input_options(args),
    )
    _print_summary(result.manifest, console)
    console.print(f"wrote {result.manifest_path}")


def _print_summary(manifest: dict, console: Console) -> None:
    table = Table(
        title=f"vocab {manifest['vocab_size']}, seq_len {manifest['seq_len']}, {manifest['dtype']}"
    )
    for column in ("split", "documents", "shards", "samples", "tokens", "dropped tokens"):
        table.add_column(column, justify="right")
    for name, split in manifest["splits"].items():
        table.add_row(
            name,
            f"{split['documents']:,}",
            f"{len(split['shards']):,}",
            f"{split['samples']:,}",
            f"{split['tokens']:,}",
            f"{split['dropped_tokens']:,}",
        )
    console.print(table)
    skipped = manifest["skipped"]
    if skipped["total"]:
        reasons = ", ".join(f"{n} {r}" for r, n in skipped["by_reason"].items())
        console.print(
            f"[yellow]skipped {skipped['total']} input item(s): {reasons}[/yellow]", soft_wrap=True
        )
        for example in skipped["examples"]:
            console.print(f"  {example}", markup=False, highlight=False, soft_wrap=True)
    for name, split in manifest["splits"].items():
        # An empty validation split is what --val-fraction 0 asks for, not a warning.
        if split["samples"] == 0 and not (name == "val" and manifest.get("val_fraction") == 0):
            console.print(f"[yellow]split {name!r} is empty (input too small)[/yellow]")


def _inspect(location: str, console: Console) -> None:
    """Summary, then every shard read whole and checked (size, sha256, members)."""
    source = DataSource(location)
    manifest = source.manifest
    _print_summary(manifest, console)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    bad = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            url = source.url(shard["name"])
            try:
                index_shard(
                    source.read_bytes(shard["name"]),
                    shard,
                    dtype=dtype,
                    sample_len=manifest["sample_len"],
                )
            except FileNotFoundError:
                bad.append(f"{url}: missing")
            except (OSError, ValueError) as err:
                bad.append(f"{url}: {_first_line(err)}")
    if bad:
        raise DataError(f"{len(bad)} bad shard(s): {'; '.join(bad)}")
    shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    console.print(f"all {shards} shard checksums match")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
