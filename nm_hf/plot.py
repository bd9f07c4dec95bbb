"""Plot how the N:M masks move during training, for one run or several side by side.

    python -m nm_hf.plot runs/dense runs/ste runs/sr-ste -o sad.png

Each argument is a run directory holding `sparsity_history.json` (or the JSON file itself). The
figure has four panels against the optimizer step: SAD since the previous log, SAD from the initial
mask, mask flip rate and the norm of the pruned weights. Runs with different numbers of masked
weights are compared as rates (SAD / masked weights, RMS of the pruned weights) rather than raw
counts. A run with fewer than two logged steps is not drawn as a lone dot: the figure says so.
The label is the method recorded in the history, or the directory name when that is missing or
shared by several runs. matplotlib is a dev extra: it is imported lazily (Agg backend) and a clear
error says how to install it; writing the history never needs it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ._files import atomic_write
from .tracker import HISTORY_FILE, SparsityTracker

__all__ = ["PLOT_FILE", "plot_histories", "plot_runs", "sparsity_figure", "main", "MatplotlibMissing",
           "NOT_ENOUGH_STEPS"]

#: file name of the plot written next to the history in an output or checkpoint directory
PLOT_FILE = "sparsity.png"
#: what the figure (and the CLI) says about a run with fewer than two logged steps
NOT_ENOUGH_STEPS = "not enough logged steps"


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


def _num_weights(doc: dict[str, Any]) -> int | None:
    value = doc.get("num_masked_weights")
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def _pruned_count(doc: dict[str, Any]) -> float | None:
    """Number of weights the masks remove (n:m from the pattern); None when unknown."""
    total = _num_weights(doc)
    match = re.fullmatch(r"(\d+):(\d+)", str(doc.get("pattern", "")))
    if total is None or not match or int(match.group(2)) == 0:
        return None
    pruned = total * (1 - int(match.group(1)) / int(match.group(2)))
    return pruned if pruned > 0 else None


def _panels(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[str, str, str, Any]]:
    """(axis title, y label, record -> value or None) per panel: counts for same-size runs, rates otherwise."""
    sizes = {_num_weights(doc) for _, doc in runs}
    as_rates = len(sizes) > 1 or None in sizes

    def rate(key: str):
        def value(record: dict[str, Any], doc: dict[str, Any]) -> float | None:
            if f"{key}_rate" in record:
                return record[f"{key}_rate"]
            total = _num_weights(doc)
            return record[key] / total if key in record and total else None
        return value

    def plain(key: str):
        return lambda record, doc: record.get(key)

    def pruned_rms(record: dict[str, Any], doc: dict[str, Any]) -> float | None:
        count = _pruned_count(doc)
        norm = record.get("pruned_weight_norm")
        return norm / math.sqrt(count) if norm is not None and count else None

    if as_rates:
        return [
            ("SAD since previous log", "fraction of mask entries changed", rate("sad")),
            ("SAD from the initial mask", "fraction of mask entries changed", rate("sad_from_init")),
            ("Mask flip rate per optimizer step", "fraction of entries", plain("flip_rate")),
            ("Pruned weights (RMS)", "root mean square of pruned weights", pruned_rms),
        ]
    return [
        ("SAD since previous log", "mask entries changed", plain("sad")),
        ("SAD from the initial mask", "mask entries changed", plain("sad_from_init")),
        ("Mask flip rate per optimizer step", "fraction of entries", plain("flip_rate")),
        ("Norm of the pruned weights", "L2 norm", plain("pruned_weight_norm")),
    ]


def _logged(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc.get("records", []) if isinstance(r, dict) and r.get("step") is not None]


def _too_short(doc: dict[str, Any]) -> bool:
    """Fewer than two logged steps: one point is not a curve, so the run is not drawn."""
    return len({r["step"] for r in _logged(doc)}) < 2


def sparsity_figure(runs: Sequence[tuple[str, dict[str, Any]]], title: str | None = None):
    """The matplotlib Figure `plot_histories` saves (for notebooks; close it with `plt.close(fig)`).

    One panel per metric against the optimizer step (integer ticks). Runs with fewer than two
    logged steps are left out and named in the figure ("not enough logged steps"); when no run has
    two, every panel says so.
    """
    if not runs:
        raise ValueError("nothing to plot: no runs given")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    short = [label for label, doc in runs if _too_short(doc)]
    drawn = [(label, doc) for label, doc in runs if not _too_short(doc)]
    panels = _panels(runs)
    # fixed margins: constrained/tight layout would cost ~10x the drawing itself on small plots
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8))
    try:
        fig.subplots_adjust(left=0.05, right=0.99, bottom=0.2 if short and drawn else 0.14,
                            top=0.80 if title else 0.86, wspace=0.35)
        for ax, (axis_title, ylabel, value) in zip(axes, panels, strict=True):
            for label, doc in drawn:
                points = [(r["step"], value(r, doc)) for r in _logged(doc)]
                points = [(step, y) for step, y in points if y is not None]
                ax.plot([s for s, _ in points], [y for _, y in points], marker="o", markersize=3, label=label)
            if not drawn:
                ax.text(0.5, 0.5, f"{NOT_ENOUGH_STEPS}\n(need at least 2)", ha="center", va="center",
                        transform=ax.transAxes, color="0.4")
                ax.set_yticks([])
            ax.set_title(axis_title, fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        if drawn:
            axes[0].legend(fontsize=8)
        if short and drawn:
            fig.text(0.5, 0.02, f"{NOT_ENOUGH_STEPS} (fewer than 2), not drawn: {', '.join(short)}",
                     ha="center", fontsize=9, color="0.3")
        if title:
            fig.suptitle(title)
    except BaseException:
        plt.close(fig)
        raise
    return fig


def plot_histories(runs: Sequence[tuple[str, dict[str, Any]]], output: str | os.PathLike,
                   title: str | None = None) -> Path:
    """Draw `(label, history document)` pairs into one PNG (`sparsity_figure`); returns the path.

    The file is written atomically (`nm_hf._files`), so a failed plot leaves no partial file.
    """
    fig = sparsity_figure(runs, title=title)
    try:
        atomic_write(output, lambda handle: fig.savefig(handle, dpi=100, format="png"))
    finally:
        _pyplot().close(fig)
    return Path(output)


def _labels(paths: Sequence[Path], docs: Sequence[dict[str, Any]]) -> list[str]:
    names = [p.parent.name if p.name == HISTORY_FILE else p.stem for p in paths]
    methods = [doc.get("method") or name for doc, name in zip(docs, names, strict=True)]
    return [m if methods.count(m) == 1 else f"{m} ({name})" for m, name in zip(methods, names, strict=True)]


def _load_runs(run_dirs: Sequence[str | os.PathLike],
               labels: Sequence[str] | None) -> list[tuple[str, dict[str, Any]]]:
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
    return list(zip(names, docs, strict=True))


def plot_runs(run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike,
              labels: Sequence[str] | None = None, title: str | None = None, notes: TextIO | None = None) -> Path:
    """Read each run's `sparsity_history.json` (a run directory or the file) and plot them together;
    a run with too few logged steps to draw is named on `notes` (e.g. `sys.stderr`) when given."""
    runs = _load_runs(run_dirs, labels)
    out = plot_histories(runs, output, title=title)
    if notes is not None:
        for label in (label for label, doc in runs if _too_short(doc)):
            print(f"note: {label}: {NOT_ENOUGH_STEPS} (fewer than 2), not drawn", file=notes)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m nm_hf.plot RUN ... [-o sad.png]`; returns the exit status (2 on a usage or file error)."""
    parser = argparse.ArgumentParser(prog="python -m nm_hf.plot", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help=f"run directories holding {HISTORY_FILE} (or the files)")
    parser.add_argument("-o", "--output", default=PLOT_FILE, help=f"PNG to write (default: {PLOT_FILE})")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: method or directory name)")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.runs, args.output, labels=args.labels, title=args.title, notes=sys.stderr)
    except (OSError, ValueError, MatplotlibMissing) as err:  # a missing run, an -o that cannot be written, ...
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
