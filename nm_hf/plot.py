"""Plot SAD and mask flip rate against the training step, for one run or several side by side.

    python -m nm_hf.plot runs/dense runs/ste runs/sr-ste -o sad.png

Each argument is a run directory holding `sparsity_history.json` (or the JSON file itself). The
label is the method recorded in the history, or the directory name when that is missing or shared
by several runs. matplotlib is a dev extra: it is imported lazily (Agg backend) and a clear error
says how to install it; writing the history never needs it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .tracker import HISTORY_FILE, SparsityTracker

__all__ = ["PLOT_FILE", "plot_histories", "plot_runs", "main", "MatplotlibMissing"]

#: file name of the plot written next to the history in an output or checkpoint directory
PLOT_FILE = "sparsity.png"

# (record key, axis title, y label)
_PANELS = (
    ("sad", "SAD since previous log", "mask entries changed"),
    ("sad_from_init", "SAD from the initial mask", "mask entries changed"),
    ("flip_rate", "Mask flip rate per optimizer step", "fraction of entries"),
)


class MatplotlibMissing(ImportError):
    """matplotlib (a dev extra) is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise MatplotlibMissing("plotting needs matplotlib: pip install 'nm-hf[dev]' (or pip install matplotlib); "
                                "the sparsity history JSON is written without it") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_histories(runs: Sequence[tuple[str, dict[str, Any]]], output: str | os.PathLike,
                   title: str | None = None) -> Path:
    """Draw `(label, history document)` pairs into one PNG (one panel per metric); returns the path.

    The file is written to a temporary name and renamed, so a failed plot leaves no partial file.
    """
    if not runs:
        raise ValueError("nothing to plot: no runs given")
    plt = _pyplot()
    output = Path(output)
    # fixed margins: constrained/tight layout would cost ~10x the drawing itself on small plots
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(5 * len(_PANELS), 3.8))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.14, top=0.84 if title else 0.9, wspace=0.3)
    try:
        for ax, (key, axis_title, ylabel) in zip(axes, _PANELS, strict=True):
            for label, doc in runs:
                records = [r for r in doc.get("records", []) if key in r and r.get("step") is not None]
                ax.plot([r["step"] for r in records], [r[key] for r in records], marker="o", markersize=3,
                        label=label)
            ax.set_title(axis_title)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0].legend()
        if title:
            fig.suptitle(title)
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{output.stem}.", suffix=".png", dir=output.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=100, format="png")
            os.replace(tmp, output)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return output


def _labels(paths: Sequence[Path], docs: Sequence[dict[str, Any]]) -> list[str]:
    names = [p.parent.name if p.name == HISTORY_FILE else p.stem for p in paths]
    methods = [doc.get("method") or name for doc, name in zip(docs, names, strict=True)]
    return [m if methods.count(m) == 1 else f"{m} ({name})" for m, name in zip(methods, names, strict=True)]


def plot_runs(run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike,
              labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Read each run's `sparsity_history.json` (a run directory or the file) and plot them together."""
    if not run_dirs:
        raise ValueError("nothing to plot: no run directories given")
    paths = [Path(d) / HISTORY_FILE if Path(d).is_dir() else Path(d) for d in run_dirs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no {HISTORY_FILE} found for: {', '.join(missing)}")
    docs = [SparsityTracker.load_history(p) for p in paths]
    if labels is not None and len(labels) != len(docs):
        raise ValueError(f"got {len(labels)} labels for {len(docs)} runs")
    names = list(labels) if labels is not None else _labels(paths, docs)
    return plot_histories(list(zip(names, docs, strict=True)), output, title=title)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nm_hf.plot", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help=f"run directories holding {HISTORY_FILE} (or the files)")
    parser.add_argument("-o", "--output", default=PLOT_FILE, help=f"PNG to write (default: {PLOT_FILE})")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: method or directory name)")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.runs, args.output, labels=args.labels, title=args.title)
    except (FileNotFoundError, ValueError, MatplotlibMissing) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
