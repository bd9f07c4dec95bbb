"""`nm-hf`: inspect, compress and decompress saved sparse models from the shell.

Exit codes: 0 success (for `inspect`: the N:M pattern holds in every targeted layer), 1 `inspect`
found a layer that breaks the pattern, 2 bad input (missing directory, no sparsity record,
corrupted file, ...), with a one-line message and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .compressed import (
    CheckpointError,
    compress_checkpoint,
    decompress_checkpoint,
    inspect_checkpoint,
    is_compressed,
)

__all__ = ["main"]


def _inspect(args: argparse.Namespace) -> int:
    report, record = inspect_checkpoint(args.directory)
    bad = [row.name for row in report.layers if not row.nm_ok]
    if args.json:
        print(json.dumps({"record": record, **report.to_dict()}, indent=2, sort_keys=True, default=str))
        return 1 if bad or not report.layers else 0
    fmt = "nm_hf compressed" if is_compressed(record) else "safetensors"
    print(f"{args.directory}: {record['n']}:{record['m']} ({record.get('method', '?')}), "
          f"state {record.get('state', '?')}, {fmt}")
    print(report)
    if not report.layers:
        print("no targeted layers in the record")
        return 1
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        print(f"N:M pattern VIOLATED in {len(bad)} of {len(report.layers)} layers: {shown}")
        return 1
    print(f"N:M pattern holds in all {len(report.layers)} targeted layers")
    return 0


def _compress(args: argparse.Namespace) -> int:
    out = compress_checkpoint(args.input, args.output, overwrite=args.overwrite)
    print(f"wrote compressed checkpoint {out}")
    return 0


def _decompress(args: argparse.Namespace) -> int:
    out = decompress_checkpoint(args.input, args.output, overwrite=args.overwrite)
    print(f"wrote transformers checkpoint {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nm-hf", description="Inspect and convert N:M sparse checkpoints saved "
                                                               "by nm_hf.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("inspect", help="per-layer sparsity table read from the files; exit 1 if N:M is broken")
    p.add_argument("directory", help="a saved model directory (normal or compressed)")
    p.add_argument("--json", action="store_true", help="print the record and table as JSON")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("compress", help="write the compressed form of a saved (finalized) model")
    p.add_argument("input", help="a saved model directory")
    p.add_argument("output", help="new directory for the compressed checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_compress)
    p = sub.add_parser("decompress", help="write a normal transformers checkpoint from a compressed one")
    p.add_argument("input", help="a compressed model directory")
    p.add_argument("output", help="new directory for the transformers checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_decompress)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"nm-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
