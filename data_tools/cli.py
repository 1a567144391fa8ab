"""``omnimoe-data``: prepare token datasets and inspect them.

    omnimoe-data prepare [INPUT ...] --out DIR [options]   # no INPUT: the stdlib corpus
    omnimoe-data inspect DIR                                # summary + sha256 check

A :class:`~omnimoe_data.corpus.DataError` prints ``omnimoe-data: error: <message>`` on
stderr and exits with status 2 (as argparse does for bad options), without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .corpus import DEFAULT_CORPUS_MAX_BYTES, DataError
from .prepare import prepare
from .shards import load_manifest, sha256_file

PROG = "omnimoe-data"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize text into packed webdataset shards")
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help=".txt, .jsonl or .parquet files or folders (none: the Python "
        "standard library sources)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--tokenizer", type=Path, help="use this tokenizer.json instead of training")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=1024)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help=f"stop after this many bytes of text (stdlib corpus default: "
        f"{DEFAULT_CORPUS_MAX_BYTES})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("inspect", help="print a dataset's manifest and verify shard sha256")
    i.add_argument("dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "prepare":
            _prepare(args, console)
        else:
            _inspect(args.dir, console)
    except DataError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


def _prepare(args: argparse.Namespace, console: Console) -> None:
    result = prepare(
        args.inputs or None,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        samples_per_shard=args.samples_per_shard,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        seed=args.seed,
        max_bytes=args.max_bytes,
        progress=not args.no_progress,
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
        if split["samples"] == 0:
            console.print(f"[yellow]split {name!r} is empty (input too small)[/yellow]")


def _inspect(data_dir: Path, console: Console) -> None:
    manifest = load_manifest(data_dir)
    _print_summary(manifest, console)
    bad = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = data_dir / shard["name"]
            if not path.is_file():
                bad.append(f"{path}: missing")
            elif sha256_file(path) != shard["sha256"]:
                bad.append(f"{path}: sha256 does not match the manifest")
    if bad:
        raise DataError(f"{len(bad)} bad shard(s): {'; '.join(bad)}")
    shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    console.print(f"all {shards} shard checksums match")


if __name__ == "__main__":
    sys.exit(main())
