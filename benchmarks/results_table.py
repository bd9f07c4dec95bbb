"""Run a recipe once per sparsity method (same model, data, steps, seed) and print a results table.

    python benchmarks/results_table.py translation recipes/configs/translation_multi30k.yaml \
        --runs dense:2:4 sr-ste:2:4 fixed:2:4 ste:2:4 --jobs 2 --threads 1 --output_root runs/table_mt

Each run is `accelerate launch --num_processes 1 --num_cpu_threads_per_process T recipes/<recipe>.py
CONFIG --method M --sparsity N:M --output_dir ROOT/<name> [entry flags] [--seed S] [extra flags]`.

A `--runs` entry is `METHOD:N:M`, optionally followed by flags of its own for that run only, written
`,flag=value`: `sr-ste:2:4,decay=1` runs SR-STE with `--decay 1` (output dir `sr-ste-2x4_decay1`),
`sr-ste:2:4,transposable=true` and `sr-ste:2:4,mask_update_interval=40` the mask options. A method's
own arguments go in `method_args=KEY=VALUE` items, one pair each, joined into one `--method_args`:
`decaying-mask:2:4,method_args=decay_steps=500,method_args=schedule=exponential`. The sparsity flags
of every entry are checked (as the recipes would) before any run starts.
Flags after `--` go to every run (the printed commands hide the values of secret-bearing flags such as
`--hub_token`). `--seeds 1 2 3` runs every entry once per seed (`--seed S`, output dir
`<name>-seed<S>`) and the table shows the mean and standard deviation over the seeds, plus the headline
metric of each seed.

By default runs go one after the other with all cores (`--threads` = CPU count); `--jobs 2 --threads 1`
runs them in pairs, one core each, in the order given (seed by seed, entries in `--runs` order), so that
the dense run and the run it is compared with share the machine's conditions (put them next to each
other in `--runs`). Each run's output goes to ROOT/<name>.log. Runs whose `results.json` exists are not
repeated (`--force` redoes them). The table reads every run's `results.json`; throughput is also printed
as a ratio to the dense entry of the same invocation.

`--resume` continues an interrupted run from the last complete checkpoint in its output directory
(`--resume_from_checkpoint`, its log appended to): pass the saving flags after `--`, e.g.
`-- --save_strategy steps --save_steps 454 --save_total_limit 1`. Save at epoch boundaries (454 steps
for Multi30k at batch 64) for a continuation identical to an uninterrupted run. With
`--train_sampling_strategy group_by_length` (the translation configs) a mid-epoch resume is not: the
length-grouped sampler has no generator and draws an epoch's order from the global random state when the
epoch starts, and the Trainer puts back the checkpoint's random state before that draw only when the run
resumes at an epoch start (mid-epoch, after it), so a run resumed mid-epoch (after the first epoch) sees a
different order for the rest of that epoch. The default random sampler (language modeling) is reseeded
from the seed and the epoch number every epoch, so there a mid-epoch resume is identical too.

`--render docs/results.md README.md --figures benchmarks/results` regenerates, from the results files, the
tables between `<!-- results_table.py begin RECIPE -->` and its end marker, the summary lines between
`<!-- results_table.py begin summary -->` and its end marker, and the figures of each recipe.
`RECIPE --results_file FILE --figures DIR` (no `--render`) draws only the figures of that one file, named
after it (`DIR/<file stem>_curves.png`, ...): a diagnostic file such as `benchmarks/results/budget/`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from nm_hf._files import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from nm_hf.methods import available_methods  # noqa: E402
from nm_hf.recipe import redact_command  # noqa: E402

# (column title, candidate keys in results.json, format)
COLUMNS = {
    "translation": [
        ("BLEU", ("test_bleu", "bleu"), "{:.2f}"),
        ("chrF", ("test_chrf", "chrf"), "{:.2f}"),
    ],
    "language_modeling": [
        ("test ppl", ("test_perplexity", "perplexity"), "{:.2f}"),
        ("val ppl", ("eval_perplexity",), "{:.2f}"),
        ("test loss", ("test_loss", "eval_loss"), "{:.4f}"),
    ],
}
COMMON = [
    ("sparsity", ("sparsity",), "{:.2%}"),
    ("final SAD (from init)", ("sad_from_init",), "{:,.0f}"),
    ("SAD rate", ("mask_stats/sad_from_init_rate",), "{:.4f}"),
    ("mean flip rate", ("mask_stats/mean_flip_rate",), "{:.5f}"),
    ("train tokens/s", ("tokens_per_second",), "{:,.0f}"),
    ("train s", ("train_runtime_s",), "{:,.0f}"),
]
_FLAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: the flag whose `key=value` pairs an entry may give in several items
METHOD_ARGS = "method_args"
#: where each recipe's finished runs are appended (`--results_file` overrides)
RESULTS_FILES = {
    "translation": ROOT / "benchmarks" / "results" / "translation.json",
    "language_modeling": ROOT / "benchmarks" / "results" / "language_modeling.json",
}
#: training schedules an entry may name in place of a method: (the recipe's --method, the flags it implies).
#: `asp` is NVIDIA ASP's recipe: dense for half the steps, one-shot magnitude prune, the rest with that mask.
SCHEDULES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "asp": ("fixed", (("dense_warmup_fraction", "0.5"),)),
}


@dataclass(frozen=True)
class RunSpec:
    """One `--runs` entry: a method, a pattern and the flags only this entry's runs get."""

    method: str
    pattern: str
    flags: tuple[tuple[str, str], ...] = field(default=())

    @property
    def name(self) -> str:
        """Output directory name: `sr-ste-2x4`, `sr-ste-2x4_decay1`."""
        suffix = "".join(f"_{key}{re.sub(r'[^A-Za-z0-9.+-]', '', value)}" for key, value in self.flags)
        return f"{self.method}-{self.pattern.replace(':', 'x')}{suffix}"

    @property
    def label(self) -> str:
        """The table's method cell: `sr-ste`, `sr-ste (decay=1)`."""
        if not self.flags:
            return self.method
        return f"{self.method} ({', '.join(f'{key}={value}' for key, value in self.flags)})"

    @property
    def recipe_method(self) -> str:
        """The recipe's --method: the entry's method, or the method a schedule (`asp`) trains with."""
        return SCHEDULES[self.method][0] if self.method in SCHEDULES else self.method

    def schedule_flags(self) -> tuple[tuple[str, str], ...]:
        """A schedule's implied flags, less those the entry sets itself."""
        given = {key for key, _ in self.flags}
        implied = SCHEDULES[self.method][1] if self.method in SCHEDULES else ()
        return tuple((key, value) for key, value in implied if key not in given)

    def argv(self) -> list[str]:
        return [item for key, value in (*self.schedule_flags(), *self.flags) for item in (f"--{key}", value)]


def parse_run_spec(entry: str) -> RunSpec:
    """`METHOD:N:M[,flag=value...]` -> RunSpec; ValueError names the entry."""
    head, *flag_items = entry.split(",")
    method, _, pattern = head.partition(":")
    if not method or not re.fullmatch(r"\d+:\d+", pattern):
        raise ValueError(f"--runs entry {entry!r} must look like METHOD:N:M[,flag=value...], e.g. sr-ste:2:4 "
                         "or sr-ste:2:4,decay=1")
    if method not in available_methods() and method not in SCHEDULES:
        raise ValueError(f"--runs entry {entry!r}: unknown method {method!r}; the methods are "
                         f"{', '.join(available_methods())} (and the schedule{'s' if len(SCHEDULES) > 1 else ''} "
                         f"{', '.join(SCHEDULES)})")
    flags: list[tuple[str, str]] = []
    for item in flag_items:
        key, sep, value = item.partition("=")
        if not sep or not _FLAG_NAME.fullmatch(key) or not value:
            raise ValueError(f"--runs entry {entry!r}: {item!r} must look like flag=value (e.g. decay=1)")
        if key in ("method", "sparsity", "output_dir", "seed"):
            raise ValueError(f"--runs entry {entry!r}: --{key} is set by results_table.py itself")
        earlier = [i for i, (k, _) in enumerate(flags) if k == key]
        if earlier and key == METHOD_ARGS:  # one key=value pair per item: join them into one flag
            flags[earlier[0]] = (key, f"{flags[earlier[0]][1]},{value}")
        elif earlier:
            raise ValueError(f"--runs entry {entry!r}: {key} is given twice")
        else:
            flags.append((key, value))
    spec = RunSpec(method, pattern, tuple(flags))
    check_sparsity_flags(spec, entry)
    return spec


def check_sparsity_flags(spec: RunSpec, entry: str) -> None:
    """Parse the entry's sparsity flags as the recipes will (`nm_hf.arguments.SparsityArguments`): bad ones fail now."""
    from transformers import HfArgumentParser  # a heavy import: only when entries are parsed

    from nm_hf.arguments import SparsityArguments

    names = {f.name for f in dataclasses.fields(SparsityArguments)}
    argv = ["--method", spec.recipe_method, "--sparsity", spec.pattern]
    argv += [item for key, value in spec.flags if key in names for item in (f"--{key}", value)]
    parser = HfArgumentParser(SparsityArguments, exit_on_error=False)
    try:
        parser.parse_args_into_dataclasses(args=argv)
    except (ValueError, argparse.ArgumentError) as err:
        raise ValueError(f"--runs entry {entry!r}: {err}") from None


def run_dir(root: Path, spec: RunSpec, seed: int | None) -> Path:
    return root / (spec.name if seed is None else f"{spec.name}-seed{seed}")


def _pick(results: dict, keys: tuple[str, ...]):
    """First present key; "block/key" reads a nested block of results.json."""
    for key in keys:
        node = results
        for part in key.split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _numbers(values: list) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))]


def _aggregate(values: list, fmt: str, with_sd: bool) -> str:
    """One seed: the value. Several: the mean (and `± sd` where asked)."""
    numbers = _numbers(values)
    if not numbers:
        return "-"
    if len(values) == 1:
        return _cell(values[0], fmt)
    mean = _cell(statistics.fmean(numbers), fmt)
    if not with_sd or len(numbers) < 2:
        return mean
    return f"{mean} ± {_cell(statistics.stdev(numbers), fmt)}"


def table(recipe: str, runs: list[tuple[RunSpec, list[Path]]]) -> str:
    """Markdown table, one row per entry; with several seeds the task metrics are `mean ± sd`."""
    columns = COLUMNS[recipe] + COMMON
    seeded = any(len(dirs) > 1 for _, dirs in runs)
    headline_title, headline_keys, headline_fmt = columns[0]
    titles = [c[0] for c in columns] + ([f"{headline_title} per seed", "seeds"] if seeded else [])
    lines = ["| method | n:m | " + " | ".join(titles) + " | tokens/s vs dense |",
             "|" + "---|" * (len(titles) + 3)]
    loaded = []
    for spec, dirs in runs:
        results = [json.loads((d / "results.json").read_text()) for d in dirs if (d / "results.json").exists()]
        loaded.append((spec, results))
    dense_tps = next((_numbers([_pick(r, ("tokens_per_second",)) for r in results])
                      for spec, results in loaded if spec.method == "dense" and results), None)
    for spec, results in loaded:
        task = {c[0] for c in COLUMNS[recipe]}
        cells = [_aggregate([_pick(r, keys) for r in results], fmt, with_sd=title in task)
                 for title, keys, fmt in columns]
        if seeded:
            cells.append(" / ".join(_cell(_pick(r, headline_keys), headline_fmt) for r in results) or "-")
            cells.append(str(len(results)))
        tps = _numbers([_pick(r, ("tokens_per_second",)) for r in results])
        ratio = (f"{statistics.fmean(tps) / statistics.fmean(dense_tps):.3f}" if tps and dense_tps else "-")
        shown = "-" if spec.method == "dense" else spec.pattern  # dense runs patched but unmasked
        lines.append(f"| {spec.label} | {shown} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# the results files


def _split_metrics(results: dict, prefix: str) -> dict:
    """Top-level `eval_*` (validation) or `test_*` numbers of a results.json, without the prefix."""
    return {key[len(prefix):]: value for key, value in results.items()
            if key.startswith(prefix) and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _relative(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_record(spec: RunSpec, out_dir: Path, results: dict, extra: list[str] | None = None) -> dict:
    """One results-file entry from a finished run's results.json: what ran (method, pattern, learning rate,
    seed, the flags and the redacted command), where (versions, CPU: `run/environment`) and what it
    measured (validation and test metrics, curve, throughput, SAD, flip rate)."""
    train = results.get("train") if isinstance(results.get("train"), dict) else {}
    flags = dict(spec.schedule_flags()) | dict(spec.flags)
    return {
        "method": spec.method,
        "pattern": None if spec.method == "dense" else spec.pattern,
        "label": spec.label,
        "learning_rate": train.get("learning_rate", _float_or_none(flags.get("learning_rate"))),
        "seed": train.get("seed"),
        "validation": _split_metrics(results, "eval_"),
        "test": _split_metrics(results, "test_"),
        "curve": results.get("curve", []),
        "output_dir": _relative(out_dir),
        "command": _pick(results, ("run/command",)),
        "flags": flags,
        "extra_flags": list(redact_command(extra or [])),
        "throughput": {"tokens_per_second": results.get("tokens_per_second"),
                       "train_runtime_s": results.get("train_runtime_s")},
        "sparsity": results.get("sparsity"),
        "nm_ok": results.get("nm_ok"),
        "sad": {"sad": results.get("sad"), "sad_from_init": results.get("sad_from_init"),
                "sad_from_init_rate": _pick(results, ("mask_stats/sad_from_init_rate",))},
        "flip_rate": _pick(results, ("mask_stats/mean_flip_rate",)),
        "steps": train.get("steps"),
        "environment": _pick(results, ("run/environment",)),
        "finished_at": datetime.datetime.fromtimestamp((out_dir / "results.json").stat().st_mtime,
                                                       datetime.UTC).isoformat(timespec="seconds")
        if (out_dir / "results.json").exists() else None,
    }


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def load_results_file(path: Path) -> dict:
    """The file's `{"runs": [...]}` (empty when it does not exist yet); a malformed file is an error."""
    if not path.exists():
        return {"runs": []}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path}: a results file must be a JSON object with a \"runs\" list")
    return data


def append_run(path: Path, record: dict) -> bool:
    """Add `record` to the results file at `path`, replacing an entry of the same output directory and
    command (a rerun); returns False when an identical entry is already there. Read-modify-write under an
    exclusive lock on `<path>.lock`, so runs finishing together in parallel jobs lose nothing; the write
    is atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = load_results_file(path)
            key = (record.get("output_dir"), record.get("command"))
            same = [i for i, run in enumerate(data["runs"]) if (run.get("output_dir"), run.get("command")) == key]
            if same and data["runs"][same[0]] == record:
                return False
            if same:
                data["runs"][same[0]] = record
            else:
                data["runs"].append(record)
            atomic_write_json(path, data)
            return True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_run(results_file: Path | None, spec: RunSpec, out_dir: Path, extra: list[str]) -> None:
    """Append a finished run (its results.json) to the results file, if one is in use."""
    if results_file is None or not (out_dir / "results.json").exists():
        return
    results = json.loads((out_dir / "results.json").read_text())
    if append_run(results_file, run_record(spec, out_dir, results, extra)):
        print(f"recorded {out_dir} in {results_file}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# rendering the results files as markdown (docs/results.md)

#: per recipe: (validation key, test keys with titles and formats, True when higher is better)
HEADLINES = {
    "language_modeling": ("perplexity", [("test ppl", "perplexity", "{:.2f}"), ("test loss", "loss", "{:.4f}")],
                          False),
    "translation": ("bleu", [("test BLEU", "bleu", "{:.2f}"), ("test chrF", "chrf", "{:.2f}")], True),
}
#: flags that vary inside one table row (the grid's and the seeds' axes), not part of its label
ROW_AXES = ("learning_rate",)
#: the seed the learning-rate grid runs (the configs' seed): the rates of a row are compared on it alone
GRID_SEED = 42
MARKER = "<!-- results_table.py {} {} -->"  # begin/end, recipe: the generated region of a markdown file


def row_label(run: dict) -> str:
    """A run's row: its method and the flags that are not the grid's axes or its schedule's defaults."""
    implied = dict(SCHEDULES[run["method"]][1]) if run.get("method") in SCHEDULES else {}
    flags = [(key, value) for key, value in (run.get("flags") or {}).items()
             if key not in ROW_AXES and implied.get(key) != value]
    label = run["method"] + (f" {run['pattern']}" if run.get("pattern") else "")
    return label + (f" ({', '.join(f'{key}={value}' for key, value in flags)})" if flags else "")


def _mean_sd(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return _cell(values[0], fmt)
    return f"{_cell(statistics.fmean(values), fmt)} ± {_cell(statistics.stdev(values), fmt)}"


def _lr(value) -> str:
    return "-" if value is None else f"{float(value):g}"


#: per row, per learning rate, per seed: a validation metric (`validation_grid`)
Grid = dict[str, dict[float, dict[object, float]]]


def validation_grid(recipe: str, runs: list[dict]) -> Grid:
    """Per row, per learning rate, per seed: the validation headline metric."""
    key, _, _ = HEADLINES[recipe]
    by_row: dict[str, dict[float, dict[object, float]]] = {}
    for run in runs:
        value = (run.get("validation") or {}).get(key)
        if run.get("learning_rate") is not None and _numbers([value]):
            grid = by_row.setdefault(row_label(run), {}).setdefault(float(run["learning_rate"]), {})
            grid[run.get("seed")] = float(value)
    return by_row


def compared_value(grid: dict[float, dict[object, float]], lr: float) -> float | None:
    """What rate `lr` of a row's grid is compared on: its GRID_SEED value when any rate of the row ran that
    seed (None for a rate that has not, which is then no candidate yet); in a row without it, the mean over
    the seeds every rate ran (over all its seeds when the rates share none)."""
    if any(GRID_SEED in seeds for seeds in grid.values()):
        return grid[lr].get(GRID_SEED)
    common = set.intersection(*(set(seeds) for seeds in grid.values()))
    return statistics.fmean([value for seed, value in grid[lr].items() if not common or seed in common])


def at_grid_edge(grid: dict[float, dict[object, float]], lr: float) -> bool:
    """True when `lr` is the lowest or the highest of two or more compared rates of a row's grid: the
    protocol wants the best inside, so the grid needs extending."""
    rates = sorted(rate for rate in grid if compared_value(grid, rate) is not None)
    return len(rates) > 1 and lr in (rates[0], rates[-1])


def chosen_learning_rates(recipe: str, runs: list[dict], *, grid: Grid | None = None) -> dict[str, float]:
    """Per row: the learning rate with the best validation metric (lower perplexity, higher BLEU).

    Rates are compared on the grid's seed (GRID_SEED) alone, as the protocol says: a mean over three seeds
    against one seed's value would favour whichever rate had the luckier seed, and adding seeds (at the
    chosen rate, or at every rate) must not move the choice. A rate without that seed is no candidate. A
    row that never ran it is compared on the seeds all its rates ran (each rate's mean over all its seeds
    when they share none). Ties go to the rate recorded first. `grid`: `validation_grid(recipe, runs)` when the
    caller has it (a rendered section builds it once for its two tables).
    """
    pick = max if HEADLINES[recipe][2] else min
    chosen = {}
    for row, row_grid in (validation_grid(recipe, runs) if grid is None else grid).items():
        candidates = [lr for lr in row_grid if compared_value(row_grid, lr) is not None]
        chosen[row] = pick(candidates, key=lambda lr, row_grid=row_grid: compared_value(row_grid, lr))
    return chosen


def latest_runs(runs: list[dict]) -> list[dict]:
    """`runs` less every entry that a later one of the same row, learning rate and seed replaces (a rerun
    recorded under another output directory or command): each run counts once, as the grid shows it."""
    last = {(row_label(r), r.get("learning_rate"), r.get("seed")): i for i, r in enumerate(runs)}
    return [r for i, r in enumerate(runs) if last[(row_label(r), r.get("learning_rate"), r.get("seed"))] == i]


def runs_at_chosen_rate(runs: list[dict], row: str, chosen: dict[str, float]) -> list[dict]:
    """The runs of table row `row` at its chosen learning rate (none when the row has no chosen rate)."""
    if row not in chosen:
        return []
    return [r for r in latest_runs(runs) if row_label(r) == row and r.get("learning_rate") is not None
            and float(r["learning_rate"]) == chosen[row]]


def rows_in_order(runs: list[dict]) -> list[str]:
    """The table rows, in the order their first run was recorded."""
    return list(dict.fromkeys(row_label(r) for r in runs))


def is_plain_row(run: dict) -> bool:
    """True for a run of a method's own row (method and pattern, no flags of its own such as decay)."""
    return row_label(run) == run["method"] + (f" {run['pattern']}" if run.get("pattern") else "")


def grid_table(recipe: str, runs: list[dict], *, grid: Grid | None = None) -> str:
    """Validation metric per learning rate (rows: method and pattern), the chosen rate in bold.

    A cell shows the value the rates are compared on (`compared_value`) and, where the rate has more seeds,
    their number and mean; a chosen rate at the edge of its row's grid is marked `(edge)`. `grid`: as for
    `chosen_learning_rates`."""
    key, _, _ = HEADLINES[recipe]
    by_row = validation_grid(recipe, runs) if grid is None else grid
    rates = sorted({lr for row_grid in by_row.values() for lr in row_grid})
    chosen = chosen_learning_rates(recipe, runs, grid=by_row)
    lines = [f"| validation {key} | " + " | ".join(f"lr {_lr(lr)}" for lr in rates) + " |",
             "|" + "---|" * (len(rates) + 1)]
    for row in rows_in_order(runs):
        grid, cells = by_row.get(row, {}), []
        for lr in rates:
            if lr not in grid:
                cells.append("-")
                continue
            value = compared_value(grid, lr)
            cell = _cell(value, "{:.2f}")
            if len(grid[lr]) > 1 or value is None:
                count = f"{len(grid[lr])} seed{'s' if len(grid[lr]) > 1 else ''}"
                cell += f" ({count}: {_cell(statistics.fmean(grid[lr].values()), '{:.2f}')})"
            if chosen.get(row) == lr:
                cell = f"**{cell}**" + (" (edge)" if at_grid_edge(grid, lr) else "")
            cells.append(cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_table(recipe: str, runs: list[dict], *, grid: Grid | None = None) -> str:
    """Per row, at its chosen learning rate: test metrics as mean ± sd over the seeds, and the run details.
    `grid`: as for `chosen_learning_rates`."""
    key, tests, _ = HEADLINES[recipe]
    grids = validation_grid(recipe, runs) if grid is None else grid
    chosen = chosen_learning_rates(recipe, runs, grid=grids)
    titles = ["method", "lr", *[title for title, _, _ in tests], f"val {key}", "seeds", "sparsity",
              "SAD from init", "mean flip rate", "train tokens/s"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    rows = rows_in_order(runs)
    for row in rows:
        if row not in chosen:
            continue
        picked = runs_at_chosen_rate(runs, row, chosen)
        seeds = sorted({r.get("seed") for r in picked}, key=str)
        cells = [row, _lr(chosen[row]) + (" (edge)" if at_grid_edge(grids[row], chosen[row]) else "")]
        cells += [_mean_sd(_numbers([(r.get("test") or {}).get(name) for r in picked]), fmt) for _, name, fmt in tests]
        cells.append(_mean_sd(_numbers([(r.get("validation") or {}).get(key) for r in picked]), "{:.2f}"))
        cells.append(f"{len(picked)} ({', '.join(map(str, seeds))})")
        cells.append(_aggregate([r.get("sparsity") for r in picked], "{:.2%}", with_sd=False))
        cells.append(_aggregate([(r.get("sad") or {}).get("sad_from_init") for r in picked], "{:,.0f}", with_sd=False))
        cells.append(_aggregate([r.get("flip_rate") for r in picked], "{:.5f}", with_sd=False))
        cells.append(_aggregate([(r.get("throughput") or {}).get("tokens_per_second") for r in picked], "{:,.0f}",
                                with_sd=False))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: the row every other row is compared with, seed by seed (`paired_by_seed`)
DENSE_ROW = "dense"


def _seed_key(seed) -> tuple:
    """Seeds in numeric order (1, 2, 42), any that are not numbers after them by their text."""
    numeric = isinstance(seed, (int, float)) and not isinstance(seed, bool)
    return (0, seed, "") if numeric else (1, 0, str(seed))


def paired_by_seed(recipe: str, runs: list[dict], *, grid: Grid | None = None) -> dict[str, dict[object, float]]:
    """Per row other than dense, in table order: {seed: the row's headline test metric less dense's} for every
    seed (not None) that both ran at their own chosen learning rates with that metric recorded; rows sharing no
    seed with dense are left out (all of them when dense has no chosen rate). `grid`: as for
    `chosen_learning_rates`."""
    _, tests, _ = HEADLINES[recipe]
    name = tests[0][1]
    chosen = chosen_learning_rates(recipe, runs, grid=grid)

    def by_seed(row: str) -> dict[object, float]:
        return {r.get("seed"): float(r["test"][name]) for r in runs_at_chosen_rate(runs, row, chosen)
                if r.get("seed") is not None and _numbers([(r.get("test") or {}).get(name)])}

    dense = by_seed(DENSE_ROW)
    paired = {}
    for row in rows_in_order(runs):
        if row == DENSE_ROW:
            continue
        ran = by_seed(row)
        diffs = {seed: ran[seed] - dense[seed] for seed in sorted(ran, key=_seed_key) if seed in dense}
        if diffs:
            paired[row] = diffs
    return paired


def paired_table(recipe: str, runs: list[dict], *, grid: Grid | None = None) -> str:
    """`paired_by_seed` as a markdown table: one column per seed, the mean difference, and in how many of
    its paired seeds the row beat dense (lower perplexity, higher BLEU; a tie is no win); empty when no row
    has a seed in common with dense. Differences are compared as shown (a difference that rounds to zero is a
    tie, "+0.00", not a win). `grid`: as for `chosen_learning_rates`."""
    _, tests, higher = HEADLINES[recipe]
    title, _, fmt = tests[0]
    paired = paired_by_seed(recipe, runs, grid=grid)
    if not paired:
        return ""
    signed = fmt.replace("{:", "{:+", 1)
    seeds = sorted({seed for diffs in paired.values() for seed in diffs}, key=_seed_key)
    titles = [f"{title}, row − {DENSE_ROW} ({'higher' if higher else 'lower'} is better)",
              *[f"seed {seed}" for seed in seeds], "mean", "row better in"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row, diffs in paired.items():
        shown = {seed: float(signed.format(diff)) + 0.0 for seed, diff in diffs.items()}  # -0.0 becomes +0.0
        better = sum(diff > 0 if higher else diff < 0 for diff in shown.values())
        cells = [row, *[_cell(shown.get(seed), signed) for seed in seeds],
                 _cell(statistics.fmean(diffs.values()), signed),
                 f"{better} of {len(diffs)} seed{'s' if len(diffs) > 1 else ''}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: per recipe, for the summary and the figures: (task, data set, headline test metric in words)
TASKS = {
    "language_modeling": ("Language model", "python_docs", "test perplexity"),
    "translation": ("Translation", "Multi30k En->De", "test BLEU"),
}
#: the generated region of a markdown file (README.md) with one summary line per task
SUMMARY = "summary"
#: the document the summary links to for the protocol and the full tables
RESULTS_DOC = ROOT / "docs" / "results.md"
#: where the generated sections look for figures to link when `--figures DIR` is not given
FIGURES_DIR = ROOT / "benchmarks" / "results"
#: the per-log SAD rate (share of mask entries changed since the previous log) of a curve point
SAD_RATE = "sparsity/sad_rate"
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
            "tab:cyan")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


#: the windows when the results runs were suspended (SIGSTOP, for a quiet benchmark or a demo), written by whoever
#: stopped them: {"windows": [{"start": ISO, "end": ISO, "why": ...}]}
SUSPENSIONS = ROOT / "benchmarks" / "results" / "suspensions.json"
#: two runs count as side by side when their training overlapped for this share of each (of the longer one: a
#: resumed run's short last part inside a dense run's training is no pair)
PAIRED_OVERLAP = 0.8


def _training_interval(run: dict) -> tuple[float, float] | None:
    """(start, end) of a run's training in POSIX seconds: `finished_at` less the test evaluation is close
    enough to the end of training for an overlap test; None without the fields."""
    throughput = run.get("throughput") or {}
    seconds = throughput.get("train_runtime_s")
    if not run.get("finished_at") or not _numbers([seconds]):
        return None
    end = datetime.datetime.fromisoformat(run["finished_at"]).timestamp()
    return end - float(seconds), end


def load_suspensions(path: Path = SUSPENSIONS) -> list[tuple[float, float]]:
    """The (start, end) POSIX seconds of every recorded suspension window in `path` (none when it is absent)."""
    if not path.is_file():
        return []
    windows = json.loads(path.read_text()).get("windows", [])
    return [(datetime.datetime.fromisoformat(w["start"]).timestamp(),
             datetime.datetime.fromisoformat(w["end"]).timestamp()) for w in windows]


def paired_throughput(runs: list[dict], suspensions: list[tuple[float, float]] = ()) -> dict[str, list[float]]:
    """Per non-dense row: its tokens/s over that of the dense run that trained beside it (the dense run whose
    training overlapped most, at least PAIRED_OVERLAP of the longer of the two), one ratio per such run.

    A run whose training spans one of `suspensions` ((start, end) seconds: its processes were stopped for a
    while) has a tokens/s that counts the stop as training time, so it is left out on either side of a pair."""
    def interval_and_speed(run: dict) -> tuple[tuple[float, float], float] | None:
        interval, speed = _training_interval(run), (run.get("throughput") or {}).get("tokens_per_second")
        if not interval or not _numbers([speed]) or speed <= 0:
            return None
        if any(start < interval[1] and interval[0] < end for start, end in suspensions):
            return None
        return interval, float(speed)

    runs = latest_runs(runs)
    dense = [found for run in runs if run["method"] == "dense" and (found := interval_and_speed(run))]
    ratios: dict[str, list[float]] = {}
    for run in runs:
        found = interval_and_speed(run)
        if run["method"] == "dense" or not found:
            continue
        (start, end), speed = found
        best, partner = 0.0, None
        for (d_start, d_end), d_speed in dense:
            overlap = (min(end, d_end) - max(start, d_start)) / max(end - start, d_end - d_start)
            if overlap > best:
                best, partner = overlap, d_speed
        if partner is not None and best >= PAIRED_OVERLAP:
            ratios.setdefault(row_label(run), []).append(speed / partner)
    return ratios


def paired_throughput_line(runs: list[dict], suspensions: list[tuple[float, float]] = ()) -> str:
    """The markdown line of `paired_throughput`, rows in table order; empty when no run had a dense partner."""
    ratios = paired_throughput(runs, suspensions)
    if not ratios:
        return ""
    parts = [f"{row} {', '.join(f'{r:.3f}' for r in ratios[row])}" for row in rows_in_order(runs) if row in ratios]
    return (f"Throughput, sparse / dense train tokens/s, only for runs that trained side by side with a dense run "
            f"(one core each, training overlapping at least {PAIRED_OVERLAP:.0%} of each, neither one's training across "
            f"a window in `{_relative(SUSPENSIONS)}` when the runs were stopped), every learning rate and seed: "
            + "; ".join(parts) + ". The `train tokens/s` column above mixes runs with different neighbours and stops.")


def render_section(recipe: str, runs: list[dict], source: Path, figures: list[tuple[str, str]] = (),
                   suspensions: list[tuple[float, float]] | None = None) -> str:
    """The generated markdown of one results file: the seeds table at the chosen rates, the paired-by-seed
    differences from dense (`paired_table`), the lr grid, and a line linking `figures` ((title, relative link)
    pairs); `suspensions` default to `load_suspensions()`."""
    if not runs:
        return f"_No runs recorded yet in `{_relative(source)}`._"
    replaced = len(runs) - len(latest_runs(runs))
    grid = validation_grid(recipe, runs)  # once for all the tables (and the chosen rates each shows)
    lines = [
        f"{len(runs)} runs recorded in `{_relative(source)}`"
        + (f" ({replaced} replaced by a later entry of the same row, rate and seed)" if replaced else "")
        + f". Test metrics at each row's chosen learning rate (best validation metric on seed {GRID_SEED}, the "
        "grid's; `(edge)`: the best lies at the edge of the rates run), mean ± sd over the seeds run so far:",
        "", seeds_table(recipe, runs, grid=grid), ""]
    paired = paired_table(recipe, runs, grid=grid)
    if paired:
        _, tests, higher = HEADLINES[recipe]
        lines += [f"Paired by seed: each row's {tests[0][0]} less dense's in every seed both ran at their chosen "
                  f"learning rates (rows with no such seed left out), so "
                  f"{'a positive' if higher else 'a negative'} difference is the row ahead of dense in that seed:",
                  "", paired, ""]
    lines += [
        "Learning-rate grid (validation metric; the chosen rate in bold):", "", grid_table(recipe, runs, grid=grid)]
    throughput = paired_throughput_line(runs, load_suspensions() if suspensions is None else suspensions)
    if throughput:
        lines += ["", throughput]
    if figures:
        lines += ["", "Figures (drawn by `--figures`): " + " · ".join(f"[{title}]({link})" for title, link in figures)]
    return "\n".join(lines)


def summary(files: dict[str, Path], results_link: str) -> str:
    """One markdown line per task: the headline test metric of each method's own row (no flags of its
    own) at its chosen learning rate, mean ± sd over seeds, from the results files."""
    lines = []
    for recipe, (task, data, metric) in TASKS.items():
        if recipe not in files:
            continue
        runs = load_results_file(files[recipe])["runs"]
        chosen = chosen_learning_rates(recipe, runs)
        _, key, fmt = HEADLINES[recipe][1][0]
        cells, variants = [], 0
        for row in rows_in_order(runs):
            picked = runs_at_chosen_rate(runs, row, chosen)
            values = _numbers([(r.get("test") or {}).get(key) for r in picked])
            if values and not is_plain_row(picked[0]):
                variants += 1
            elif values:
                cells.append(f"{row} {_mean_sd(values, fmt)} ({len(values)})")
        head = f"- **{task}** ({data}; protocol and tables in [{_relative(RESULTS_DOC)}]({results_link}))"
        if not cells:
            lines.append(f"{head}: no runs recorded yet.")
            continue
        line = (f"{head}: {metric} at each method's chosen learning rate, mean ± sd over seeds (their number "
                f"in brackets): {', '.join(cells)}")
        if variants:
            line += f"; {variants} variant{'s' if variants > 1 else ''} with flags of their own in the tables"
        lines.append(line + ".")
    return "\n".join(lines)


def generated_regions(path: Path, text: str, names: list[str]) -> list[str]:
    """The generated regions (`names`: recipes, "summary") that the markdown `text` of `path` marks; a
    ValueError naming the file when a begin marker has no end after it or when there is no region."""
    found = []
    for name in names:
        begin, end = MARKER.format("begin", name), MARKER.format("end", name)
        if begin not in text:
            continue
        if end not in text.split(begin, 1)[1]:
            raise ValueError(f"{path}: {begin} has no {end} after it")
        found.append(name)
    if not found:
        raise ValueError(f"{path}: no results_table.py markers; put {MARKER.format('begin', SUMMARY)} and "
                         f"{MARKER.format('end', SUMMARY)} (or the begin/end markers of a recipe: "
                         f"{', '.join(n for n in names if n != SUMMARY)}) around the text to generate")
    return found


def figure_path(directory: Path, recipe: str, kind: str) -> Path:
    return Path(directory) / f"{recipe}_{kind}.png"


def figure_links(path: Path, recipe: str, directory: Path | None) -> list[tuple[str, str]]:
    """(title, link relative to the markdown file `path`) of each of the recipe's figures in `directory`."""
    if directory is None:
        return []
    metric = TASKS[recipe][2]
    titles = {"curves": "curves, dense vs SR-STE 2:4", "sad": "SAD rate between logs, per method",
              "sad_vs_quality": f"final SAD from init vs {metric}, every run"}
    return [(titles[kind], Path(os.path.relpath(figure.resolve(), Path(path).resolve().parent)).as_posix())
            for kind in FIGURES if (figure := figure_path(directory, recipe, kind)).exists()]


def render(path: Path, files: dict[str, Path], figures: Path | None = FIGURES_DIR) -> list[str]:
    """Replace each generated region of the markdown file `path` (between its begin and end markers): a
    recipe's with the tables of its results file (and links to its figures in `figures` that exist), the
    summary's with one line per task; returns the regions rendered. Nothing is written when a marker is
    missing (ValueError naming the file)."""
    text = path.read_text(encoding="utf-8")
    done = generated_regions(path, text, [*files, SUMMARY])
    for name in done:
        if name == SUMMARY:
            link = Path(os.path.relpath(RESULTS_DOC, Path(path).resolve().parent)).as_posix()
            body = summary(files, link)
        else:
            body = render_section(name, load_results_file(files[name])["runs"], files[name],
                                  figure_links(path, name, figures))
        begin, end = MARKER.format("begin", name), MARKER.format("end", name)
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"
    atomic_write_text(path, text)
    return done


#: the validation metric of a curve point per recipe: (title, function of the point or None)
CURVE_METRICS = {
    "language_modeling": ("validation perplexity",
                          lambda p: safe_exp(p["eval_loss"]) if _numbers([p.get("eval_loss")]) else None),
    "translation": ("validation BLEU", lambda p: p.get("eval_bleu")),
}
#: the rows a task's curve figure compares
CURVE_ROWS = ("dense", "sr-ste 2:4")


def safe_exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def _style(method: str) -> tuple[str, str]:
    """A method's colour and marker, the same in every figure; runs without a mask (pattern None) are grey."""
    order = [*available_methods(), *SCHEDULES]
    index = order.index(method) if method in order else len(order)
    return _COLOURS[index % len(_COLOURS)], _MARKERS[index % len(_MARKERS)]


def curve_figure(recipe: str, runs: list[dict], path: Path, rows: tuple[str, ...] = CURVE_ROWS) -> int:
    """A PNG of training loss and validation metric against steps for the runs of `rows` at each row's
    chosen learning rate (one colour per row, one line per seed); returns the number of runs drawn (0:
    no run of those rows has a curve, and nothing is written)."""
    chosen = chosen_learning_rates(recipe, runs)
    title, metric = CURVE_METRICS[recipe]
    picked = [(colour, row, runs_at_chosen_rate(runs, row, chosen))
              for colour, row in zip(("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red"), rows,
                                     strict=False)]
    if not any(run.get("curve") for _, _, rows_runs in picked for run in rows_runs):
        return 0
    plt = _pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4))
    drawn = 0
    for colour, row, row_runs in picked:
        for i, run in enumerate(row_runs):
            curve = run.get("curve") or []
            label = f"{row} (lr {_lr(chosen[row])})" if i == 0 else None
            losses = [(p["step"], p["loss"]) for p in curve if _numbers([p.get("loss")])]
            metrics = [(p["step"], metric(p)) for p in curve if metric(p) is not None]
            if losses:
                loss_ax.plot(*zip(*losses, strict=True), color=colour, alpha=0.8, label=label)
            if metrics:
                metric_ax.plot(*zip(*metrics, strict=True), color=colour, alpha=0.8, marker="o", label=label)
            drawn += 1
    for ax, name in ((loss_ax, "training loss"), (metric_ax, title)):
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"{recipe.replace('_', ' ')}: {' vs '.join(rows)}, every seed at the chosen learning rate")
    fig.tight_layout()
    _save_png(fig, path)
    return drawn


def sad_figure(recipe: str, runs: list[dict], path: Path) -> int:
    """A PNG of the SAD rate between consecutive logs (`sparsity/sad_rate` of the curves) against steps:
    one line per method's own row at 2:4 (and dense), at its chosen learning rate, the mean over its seeds;
    rows whose masks never changed (fixed) are named in the caption, not drawn. Returns the number of runs
    drawn (0: none has the key, and nothing is written)."""
    chosen = chosen_learning_rates(recipe, runs)
    lines, flat = [], []
    for row in rows_in_order(runs):
        picked = [r for r in runs_at_chosen_rate(runs, row, chosen)
                  if is_plain_row(r) and r.get("pattern") in (None, "2:4")]
        by_step: dict[float, list[float]] = {}
        used = 0
        for run in picked:
            points = [(float(p["step"]), float(p[SAD_RATE])) for p in run.get("curve") or []
                      if _numbers([p.get(SAD_RATE)]) and _numbers([p.get("step")])]
            used += bool(points)
            for step, value in points:
                by_step.setdefault(step, []).append(value)
        if not used:
            continue
        mean = sorted((step, statistics.fmean(values)) for step, values in by_step.items())
        if all(value == 0 for _, value in mean):
            flat.append(row)
        else:
            lines.append((row, picked[0], used, mean))
    if not lines:
        return 0
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for row, run, used, mean in lines:
        colour, _ = _style(run["method"]) if run.get("pattern") else ("tab:gray", "")
        ax.plot([step for step, _ in mean], [value if value > 0 else math.nan for _, value in mean],
                color=colour, linestyle="--" if run.get("pattern") is None else "-", alpha=0.9,
                label=f"{row} (lr {_lr(chosen[row])}, {used} seed{'s' if used > 1 else ''})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("share of mask entries changed since the previous log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    notes = ["Each line: the mean over seeds at the row's chosen learning rate; a zero (frozen mask) is a gap."]
    if any(run.get("pattern") is None for _, run, _, _ in lines):
        notes.append("Dashed: dense, the 2:4 magnitude mask of its weights (measured, not applied).")
    if flat:
        notes.append(f"Not drawn (no mask change at any log): {', '.join(flat)}.")
    ax.set_title(f"{TASKS[recipe][0]}: SAD rate between consecutive logs (sparsity/sad_rate)")
    fig.text(0.01, 0.01, "\n".join(notes), fontsize="small", va="bottom")
    fig.tight_layout(rect=(0, 0.03 * len(notes) + 0.02, 1, 1))
    _save_png(fig, path)
    return sum(used for _, _, used, _ in lines)


def sad_quality_figure(recipe: str, runs: list[dict], path: Path) -> int:
    """A PNG scatter of every recorded run: final SAD-from-init rate (share of mask entries unlike the
    initial mask) against the headline test metric, one colour and marker per method. Returns the number
    of runs drawn (0: none has both, and nothing is written)."""
    key = HEADLINES[recipe][1][0][1]
    task, _, metric = TASKS[recipe]
    by_method: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        x, y = _pick(run, ("sad/sad_from_init_rate",)), (run.get("test") or {}).get(key)
        if _numbers([x]) and _numbers([y]):
            by_method.setdefault(run["method"], []).append((float(x), float(y)))
    if not by_method:
        return 0
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    unmasked = {run["method"] for run in runs if run.get("pattern") is None}
    for method, points in by_method.items():
        colour, marker = ("tab:gray", "o") if method in unmasked else _style(method)
        ax.scatter(*zip(*points, strict=True), color=colour, marker=marker, alpha=0.85,
                   label=f"{method} ({len(points)} run{'s' if len(points) > 1 else ''})")
    ax.set_xlabel("final SAD-from-init rate (share of mask entries unlike the initial mask)")
    ax.set_ylabel(f"{metric} ({'higher' if HEADLINES[recipe][2] else 'lower'} is better)")
    ax.set_title(f"{task}: final SAD from init vs {metric}, every recorded run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    notes = "All learning rates, patterns, seeds and flags."
    if unmasked & set(by_method):
        notes += " Dense: the 2:4 magnitude mask of its weights (measured, not applied)."
    fig.text(0.01, 0.01, notes, fontsize="small", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save_png(fig, path)
    return sum(len(points) for points in by_method.values())


#: the figures `--figures DIR` draws per recipe, as DIR/<recipe>_<kind>.png
FIGURES = {"curves": curve_figure, "sad": sad_figure, "sad_vs_quality": sad_quality_figure}


def without_shared_flags(runs: list[dict]) -> list[dict]:
    """The runs without the flags that all of them set to the same value: those name the file (a diagnostic
    file's `max_steps`), not a row, so its dense and sr-ste 2:4 runs are the curves figure's rows."""
    flag_sets = [set((run.get("flags") or {}).items()) for run in runs]
    shared = dict(set.intersection(*flag_sets)) if len(runs) > 1 else {}
    return [{**run, "flags": {key: value for key, value in (run.get("flags") or {}).items() if key not in shared}}
            for run in runs]


def draw_figures(recipe: str, runs: list[dict], directory: Path, name: str | None = None) -> dict[Path, int]:
    """Every figure of a recipe that its runs have the data for, as `directory/<name>_<kind>.png` (`name`: the
    recipe's); prints and returns {path: runs drawn} (0: not written)."""
    drawn = {(path := figure_path(directory, name or recipe, kind)): draw(recipe, runs, path)
             for kind, draw in FIGURES.items()}
    for figure, count in drawn.items():
        print(f"{figure}: {count} runs drawn" if count else f"{figure}: not drawn (no runs with its data)")
    return drawn


def launch(recipe: str, config: str, spec: RunSpec, out_dir: Path, seed: int | None, extra: list[str],
           threads: int, resume: bool = False) -> subprocess.Popen:
    """Start one run in the background, its output in ``<out_dir>.log``; with `resume`, from the run's last
    complete checkpoint when it has one (the log appended to)."""
    seed_args = [] if seed is None else ["--seed", str(seed)]
    if resume:  # (nm_hf.trainer imports transformers' Trainer: only when resuming)
        from nm_hf.trainer import last_complete_checkpoint, saved_steps

        checkpoint = last_complete_checkpoint(out_dir)
        steps = saved_steps(checkpoint) if checkpoint is not None else None
        if steps is not None and 0 < steps[1] <= steps[0]:
            # saved at max_steps (the session ended in the final evaluation): the trainer refuses to resume it,
            # so the run starts again
            print(f"{checkpoint} is the end of training: {out_dir.name} starts again", flush=True)
            checkpoint = None
    else:
        checkpoint = None
    resume_args = [] if checkpoint is None else ["--resume_from_checkpoint", str(checkpoint)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
           "--num_cpu_threads_per_process", str(threads), str(ROOT / "recipes" / f"{recipe}.py"), config,
           "--method", spec.recipe_method, "--sparsity", spec.pattern, "--output_dir", str(out_dir), *spec.argv(),
           *seed_args, *extra, *resume_args]
    log = out_dir.parent / f"{out_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print("+", shlex.join(redact_command(cmd)), f"{'>>' if checkpoint else '>'} {log}", flush=True)  # may carry a token
    with open(log, "a" if checkpoint else "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def run_all(recipe: str, config: str, todo: list[tuple[RunSpec, int | None, Path]], extra: list[str],
            jobs: int, threads: int, results_file: Path | None = None, resume: bool = False) -> None:
    """Run ``todo`` ``jobs`` at a time (each batch starts together and is awaited together); each run is
    appended to ``results_file`` as soon as it has finished. `resume`: see `launch`."""
    for start in range(0, len(todo), jobs):
        batch = [(spec, out_dir, launch(recipe, config, spec, out_dir, seed, extra, threads, resume))
                 for spec, seed, out_dir in todo[start:start + jobs]]
        failed = []
        for spec, out_dir, proc in batch:
            if proc.wait() != 0:
                failed.append(str(out_dir))
            else:
                record_run(results_file, spec, out_dir, extra)
        if failed:
            raise SystemExit(f"run failed: {', '.join(failed)} (see the .log next to each)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", choices=sorted(COLUMNS))
    parser.add_argument("config", nargs="?")
    parser.add_argument("--runs", nargs="+", default=["dense:2:4", "fixed:2:4", "ste:2:4", "sr-ste:2:4"],
                        help="METHOD:N:M[,flag=value...] entries, run in this order")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="run every entry once per seed (--seed S); default: the config's seed, once")
    parser.add_argument("--output_root", default="runs/table")
    parser.add_argument("--force", action="store_true", help="rerun runs that already have results.json")
    parser.add_argument("--resume", action="store_true",
                        help="continue a run from the last complete checkpoint in its output directory")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (in the order of --runs)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (default: all cores divided by --jobs)")
    parser.add_argument("--table_only", action="store_true", help="only print the table of existing runs")
    parser.add_argument("--results_file", default=None,
                        help="append every finished run here (default: benchmarks/results/<recipe>.json)")
    parser.add_argument("--no_results_file", action="store_true", help="append the runs to no results file")
    parser.add_argument("--render", nargs="+", action="extend", default=None, metavar="MARKDOWN",
                        help="only rewrite the generated regions of these markdown files (docs/results.md: the "
                             "tables; README.md: the summary lines) from the results files (--results_file: the "
                             "given recipe's), then exit; may be repeated")
    parser.add_argument("--figures", default=None, metavar="DIR",
                        help="with --render: first draw DIR/<recipe>_curves.png (dense vs sr-ste 2:4 curves), "
                             "<recipe>_sad.png (SAD rate between logs per method) and <recipe>_sad_vs_quality.png "
                             "(final SAD from init vs the test metric); the tables link the figures found in DIR "
                             f"(default {_relative(FIGURES_DIR)}). Without --render: only draw the figures of the "
                             "recipe's --results_file, named after the file (DIR/<file stem>_curves.png, ...)")
    args = parser.parse_args(argv)
    if args.render:
        files = dict(RESULTS_FILES)
        if args.results_file and args.recipe:
            files[args.recipe] = Path(args.results_file)
        figures = Path(args.figures) if args.figures else FIGURES_DIR
        try:  # every file's markers are checked before any figure or file is written
            runs = {recipe: load_results_file(results_file)["runs"] for recipe, results_file in files.items()}
            for markdown in args.render:
                generated_regions(Path(markdown), Path(markdown).read_text(encoding="utf-8"), [*files, SUMMARY])
        except (OSError, ValueError) as err:
            parser.error(str(err))
        for recipe in files if args.figures else ():
            if runs[recipe]:
                draw_figures(recipe, runs[recipe], figures)
        for markdown in args.render:
            print(f"{markdown}: {', '.join(render(Path(markdown), files, figures))}")
        return
    if args.figures:  # without --render: one results file's figures, named after the file
        if args.recipe is None or args.config is not None:
            parser.error("--figures without --render draws one results file's figures: give the recipe and "
                         "--results_file (no config; nothing runs)")
        results_file = Path(args.results_file) if args.results_file else RESULTS_FILES[args.recipe]
        try:
            runs = load_results_file(results_file)["runs"]
        except (OSError, ValueError) as err:
            parser.error(str(err))
        if not runs:
            parser.error(f"{results_file}: no runs to draw")
        draw_figures(args.recipe, without_shared_flags(runs), Path(args.figures), name=results_file.stem)
        return
    if args.recipe is None or args.config is None:
        parser.error("the recipe and the config are required (except with --render)")

    try:
        specs = [parse_run_spec(entry) for entry in args.runs]
    except ValueError as err:
        parser.error(str(err))
    if len({spec.name for spec in specs}) != len(specs):
        parser.error("--runs lists the same entry twice")
    if "--seed" in extra and args.seeds:
        parser.error("pass the seed either with --seeds or as an extra --seed flag, not both")
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--jobs and --threads must be at least 1")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    root = Path(args.output_root)
    seeds: list[int | None] = list(args.seeds) if args.seeds else [None]
    planned = [(spec, seed, run_dir(root, spec, seed)) for seed in seeds for spec in specs]
    results_file = None if args.no_results_file else Path(args.results_file or RESULTS_FILES[args.recipe])
    if not args.table_only:
        todo = []
        for spec, seed, out_dir in planned:
            if (out_dir / "results.json").exists() and not args.force:
                print(f"skip {out_dir} (results.json exists; --force reruns it)", flush=True)
                record_run(results_file, spec, out_dir, extra)  # a run finished before it was recorded
            else:
                todo.append((spec, seed, out_dir))
        run_all(args.recipe, args.config, todo, extra, args.jobs, threads, results_file, args.resume)
    print()
    print(table(args.recipe, [(spec, [run_dir(root, spec, seed) for seed in seeds]) for spec in specs]))


if __name__ == "__main__":
    main()
