"""Where in a length-sorted megabatch each validation evaluation fell, and what that did to BLEU.

    python benchmarks/eval_phase.py benchmarks/results/translation.json \
        --output benchmarks/results/translation_eval_phase.json

With `train_sampling_strategy: group_by_length` (the translation configs) transformers' length-grouped
sampler cuts each epoch into megabatches of `min(examples // (4 * batch), 50)` batches (a quarter of the
epoch's steps, at most 50) and sorts each
megabatch longest first. A model evaluated right after the short end of a megabatch generates shorter
translations than one evaluated after its long start, and BLEU follows. This script reads every run's
curve (the Trainer's evaluations), places each evaluation step in its epoch and megabatch, and prints per
step: the mean generated length, and the mean of BLEU minus the mean of the neighbouring two evaluations
(a zigzag that tracks the length is the sampler, not learning). It also counts how often the last
evaluation beats the one before. Runs whose final validation BLEU is below `--min_bleu` (broken-down runs)
are left out. The output file holds the same figures as the printed table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

MAX_MEGABATCH_BATCHES = 50  # transformers' get_length_grouped_indices default cap


def evaluations(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's validation evaluations during training (curve points with eval_bleu), in step order."""
    return sorted((p for p in run.get("curve", []) if p.get("eval_bleu") is not None), key=lambda p: p["step"])


def steps_per_epoch(points: list[dict[str, Any]]) -> int:
    """Optimizer steps per epoch, from the Trainer's (step, fractional epoch) of an evaluation."""
    last = max(points, key=lambda p: p["step"])
    return round(last["step"] / last["epoch"])


def megabatch_batches(epoch_steps: int) -> int:
    """Batches per megabatch: the sampler's min(examples // (4 * batch), 50), i.e. a quarter of the epoch."""
    return max(1, min(epoch_steps // 4, MAX_MEGABATCH_BATCHES))


def phase_table(runs: list[dict[str, Any]], min_bleu: float) -> dict[str, Any]:
    kept = [run for run in runs if run["validation"]["bleu"] >= min_bleu and len(evaluations(run)) >= 3]
    if not kept:
        raise SystemExit(f"no run with a validation BLEU of at least {min_bleu} and three evaluations")
    epoch_steps = steps_per_epoch(evaluations(kept[0]))
    for run in kept:
        if (other := steps_per_epoch(evaluations(run))) != epoch_steps:
            raise SystemExit(f"runs with different epoch lengths ({epoch_steps} and {other} steps, run "
                             f"{run.get('command', '?')}): one dataset and batch size per call")
    per_megabatch = megabatch_batches(epoch_steps)
    by_step: dict[int, dict[str, list[float]]] = {}
    last_gains: list[float] = []
    for run in kept:
        points = evaluations(run)
        bleu = {p["step"]: p["eval_bleu"] for p in points}
        for i, point in enumerate(points):
            row = by_step.setdefault(point["step"], {"gen_len": [], "bleu_minus_neighbours": []})
            if point.get("eval_gen_len") is not None:
                row["gen_len"].append(point["eval_gen_len"])
            if 0 < i < len(points) - 1:
                neighbours = (bleu[points[i - 1]["step"]] + bleu[points[i + 1]["step"]]) / 2
                row["bleu_minus_neighbours"].append(point["eval_bleu"] - neighbours)
        last_gains.append(points[-1]["eval_bleu"] - points[-2]["eval_bleu"])
    rows = []
    for step in sorted(by_step):
        into_epoch = step % epoch_steps
        values = by_step[step]
        rows.append({
            "step": step,
            "steps_into_epoch": into_epoch,
            "batch_in_megabatch": into_epoch % per_megabatch,
            "runs": len(values["gen_len"]),
            "mean_gen_len": statistics.mean(values["gen_len"]) if values["gen_len"] else None,
            "mean_bleu_minus_neighbours": (statistics.mean(values["bleu_minus_neighbours"])
                                           if values["bleu_minus_neighbours"] else None),
        })
    return {
        "runs": len(kept),
        "steps_per_epoch": epoch_steps,
        "batches_per_megabatch": per_megabatch,
        "evaluations": rows,
        "last_minus_previous": {"mean": statistics.mean(last_gains), "min": min(last_gains),
                                "max": max(last_gains), "positive": sum(g > 0 for g in last_gains),
                                "runs": len(last_gains)},
    }


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(table: dict[str, Any]) -> str:
    lines = ["| step | steps into epoch | batch in megabatch (of "
             f"{table['batches_per_megabatch']}) | mean generated length | BLEU - mean of neighbours |",
             "|---|---|---|---|---|"]
    for row in table["evaluations"]:
        lines.append(f"| {row['step']} | {row['steps_into_epoch']} | {row['batch_in_megabatch']} | "
                     f"{_number(row['mean_gen_len'], 2)} | {_number(row['mean_bleu_minus_neighbours'], 2)} |")
    gain = table["last_minus_previous"]
    lines.append(f"\n{table['runs']} runs, {table['steps_per_epoch']} steps per epoch. Last evaluation minus "
                 f"the one before: mean {gain['mean']:+.2f} BLEU (min {gain['min']:+.2f}, max {gain['max']:+.2f}), "
                 f"higher in {gain['positive']} of {gain['runs']} runs.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_file", type=Path, help="a results file of translation runs (results_table.py)")
    parser.add_argument("--min_bleu", type=float, default=25.0,
                        help="leave out runs whose final validation BLEU is lower (broken-down runs)")
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        runs = json.loads(args.results_file.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        parser.error(f"{args.results_file}: not a results file ({err})")
    table = phase_table(runs, args.min_bleu)
    print(markdown(table))
    if args.output:
        table["command"] = "python benchmarks/eval_phase.py " + " ".join(sys.argv[1:] if argv is None else argv)
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        tmp.replace(args.output)


if __name__ == "__main__":
    main()
