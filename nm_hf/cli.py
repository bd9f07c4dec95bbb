"""`nm-hf`: inspect, compress, decompress and plot saved sparse models from the shell.

Exit codes: 0 success (for `inspect`: the N:M pattern holds in every checked layer), 1 `inspect`
found a layer that breaks the pattern, 2 bad input (missing directory, no sparsity record,
corrupted file, a checkpoint whose weights are not N:M, an output that cannot be written, ...), with a
one-line `nm-hf COMMAND: error: ...` message (the headline of the error: where several layers are at
fault it says how many and names the first few) and no traceback. A reader that goes away early
(`nm-hf inspect DIR | head -3`) ends the command quietly with status 141 (128 + SIGPIPE), as other shell
tools do; Ctrl-C ends it with one `nm-hf COMMAND: interrupted, nothing written` line and status 130
(128 + SIGINT; `main()` returns it, the `nm-hf` program dies of SIGINT so that a calling script stops
too): every output is written to a staging file or directory that is removed on the way out
(`interrupted after OUTPUT was written` instead when it came after the output was renamed into place).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

from ._files import InterruptedAfterWrite
from .card import nm_hf_version
from .checkpoint.compressed import compress_checkpoint, decompress_checkpoint
from .checkpoint.directory import CheckpointError, first_few
from .checkpoint.inspect import inspect_checkpoint, parse_pattern
from .layers import available_layer_kinds
from .plot import PLOT_FILE, MatplotlibMissing, plot_runs
from .record import is_compressed, training_state_hint

__all__ = ["main", "build_parser"]

#: exit status after the reader of stdout went away (128 + SIGPIPE)
EXIT_BROKEN_PIPE = 141
#: exit status after Ctrl-C (128 + SIGINT), as shells report it
EXIT_INTERRUPTED = 130
#: the layer kinds `inspect --pattern` checks by default, for messages ("Linear/Conv1D")
_KINDS = "/".join(kind.dense_class.__name__ for kind in available_layer_kinds()
                  if kind.linear and not kind.parameter_targets)


def _inspect(args: argparse.Namespace) -> int:
    pattern = parse_pattern(args.pattern, label="--pattern") if args.pattern else None
    report, record = inspect_checkpoint(args.directory, pattern=pattern, layers=args.layers)
    n, m = pattern or (int(record["n"]), int(record["m"]))
    bad = [row.name for row in report.layers if not row.nm_ok and not row.reason]
    indivisible = [row.name for row in report.layers if row.reason]
    if args.layers:
        chosen = "the layers named by --layers"
    elif record is None:
        chosen = f"every {_KINDS} layer but the output head"
    else:
        chosen = "the targeted layers of the record"
    if args.json:
        print(json.dumps({"record": record, "pattern": f"{n}:{m}", "checked": chosen, **report.to_dict()},
                         indent=2, sort_keys=True, default=str))
        return 1 if bad or indivisible or not report.layers else 0
    if record is None:
        print(f"{args.directory}: no nm_sparsity record; checking {n}:{m} on {len(report.layers)} layers "
              f"({chosen})")
    else:
        fmt = "nm_hf compressed" if is_compressed(record) else "safetensors"
        checked = f", checked as {n}:{m}" if (n, m) != (int(record["n"]), int(record["m"])) else ""
        print(f"{args.directory}: {record['n']}:{record['m']} ({record.get('method', '?')}), "
              f"state {record.get('state', '?')}, {fmt}{checked}")
    print(report)
    if not report.layers:
        print("no layers to check")
        return 1
    if bad:
        print(f"N:M pattern VIOLATED in {len(bad)} of {len(report.layers)} layers: {first_few(bad)}")
    if indivisible:
        print(f"N:M pattern cannot hold in {len(indivisible)} of {len(report.layers)} layers, whose input size "
              f"is not divisible by m={m}: {first_few(indivisible)}")
    if bad or indivisible:
        hint = training_state_hint(record) if bad and record is not None else ""
        if hint:
            print(hint)
        return 1
    what = "targeted layers" if record is not None and not args.layers else "checked layers"
    print(f"N:M pattern holds in all {len(report.layers)} {what}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    out = compress_checkpoint(args.input, args.output, overwrite=args.overwrite)
    print(f"wrote compressed checkpoint {out}")
    return 0


def _decompress(args: argparse.Namespace) -> int:
    out = decompress_checkpoint(args.input, args.output, overwrite=args.overwrite)
    print(f"wrote transformers checkpoint {out}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    out = plot_runs(args.runs, args.output, labels=args.labels, title=args.title, notes=sys.stderr)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nm-hf", description="Inspect, convert and plot N:M sparse checkpoints "
                                                               "saved by nm_hf.")
    parser.add_argument("--version", action="version", version=f"nm-hf {nm_hf_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("inspect", help="per-layer sparsity table read from the files; exit 1 if N:M is broken")
    p.add_argument("directory", help="a saved model directory (normal, sharded or compressed)")
    p.add_argument("--json", action="store_true", help="print the record and table as JSON")
    p.add_argument("--pattern", metavar="N:M", help="the pattern to check (required for checkpoints without an "
                                                    "nm_sparsity record, e.g. made by another tool)")
    p.add_argument("--layers", nargs="+", metavar="NAME",
                   help="layers to check (exact names or dotted suffixes, e.g. q_proj, experts.gate_up_proj); "
                        "default: the record's targeted layers, or without a record every "
                        f"{_KINDS} layer but the output head, and the MoE expert weights")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("compress", help="write the compressed form of a saved (finalized) model")
    p.add_argument("input", help="a saved model directory")
    p.add_argument("output", help="new directory for the compressed checkpoint (not the input or above it)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_compress)
    p = sub.add_parser("decompress", help="write a normal transformers checkpoint from a compressed one")
    p.add_argument("input", help="a compressed model directory")
    p.add_argument("output", help="new directory for the transformers checkpoint (not the input or above it)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_decompress)
    p = sub.add_parser("plot", help="plot SAD and mask flip rate of one or more runs (needs matplotlib)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding sparsity_history.json "
                                                              "(or the files)")
    p.add_argument("-o", "--output", default=PLOT_FILE, help=f"PNG to write (default: {PLOT_FILE})")
    p.add_argument("--labels", nargs="+", help="one label per run (default: method or directory name)")
    p.add_argument("--title", help="figure title")
    p.set_defaults(func=_plot)
    return parser


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        raise
    except InterruptedAfterWrite as err:  # the output was already in place: it is complete
        print(f"nm-hf {args.command}: interrupted after {err.args[0]} was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        # the writers' finally/except blocks have already removed their staging files and directories
        print(f"nm-hf {args.command}: interrupted, nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CheckpointError, OSError, ValueError, MatplotlibMissing) as err:
        print(f"nm-hf {args.command}: error: {_headline(err)}", file=sys.stderr)
        return 2


def _headline(err: BaseException) -> str:
    """The first line of an error: library errors that list problems (`...:\\n  - layer: why`) put how many
    and the first few names there; the per-layer lines below are for Python callers."""
    return next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _run(argv)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return status
    except BrokenPipeError:
        # the reader went away (`nm-hf inspect DIR | head -3`): stop quietly, and keep Python's final
        # flush of stdout from failing again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
            pass
        return EXIT_BROKEN_PIPE


def console_main() -> None:
    """The `nm-hf` program: `main()`, then exit with its status; after Ctrl-C by SIGINT itself (after the one
    line), as Python does after an unhandled KeyboardInterrupt. An exit status of 130 alone tells a shell that
    the command handled Ctrl-C itself, so a script or loop running `nm-hf` would go on to its next command."""
    status = main()
    if status == EXIT_INTERRUPTED:
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(status)


if __name__ == "__main__":
    console_main()
