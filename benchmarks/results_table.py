"""Run a recipe once per sparsity method (same model, data, steps, seed) and print a results table.

    python benchmarks/results_table.py translation recipes/configs/translation_multi30k.yaml \
        --runs dense:2:4 sr-ste:2:4 fixed:2:4 ste:2:4 --jobs 2 --threads 1 --output_root runs/table_mt

Each run is `accelerate launch --num_processes 1 --num_cpu_threads_per_process T recipes/<recipe>.py
CONFIG --method M --sparsity N:M --output_dir ROOT/<method>-<n>x<m> [extra flags]`. By default runs go one
after the other with all cores (`--threads` = CPU count); `--jobs 2 --threads 1` runs them in pairs, one
core each, in the order given, so that the dense run and the run it is compared with share the machine's
conditions (put them next to each other in `--runs`). Each run's output goes to ROOT/<name>.log. Runs whose
`results.json` exists are not repeated (`--force` redoes them). The table reads every run's
`results.json`; throughput is also printed as a ratio to the dense run of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (column title, candidate keys in results.json, format)
COLUMNS = {
    "translation": [
        ("BLEU", ("test_bleu", "bleu"), "{:.2f}"),
        ("chrF", ("test_chrf", "chrf"), "{:.2f}"),
    ],
    "language_modeling": [
        ("test ppl", ("test_perplexity", "perplexity"), "{:.2f}"),
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


def launch(recipe: str, config: str, method: str, pattern: str, out_dir: Path, extra: list[str],
           threads: int) -> subprocess.Popen:
    """Start one run in the background, its output in ``<out_dir>.log``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
           "--num_cpu_threads_per_process", str(threads), str(ROOT / "recipes" / f"{recipe}.py"), config,
           "--method", method, "--sparsity", pattern, "--output_dir", str(out_dir), *extra]
    log = out_dir.parent / f"{out_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print("+", shlex.join(cmd), f"> {log}", flush=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def run_all(recipe: str, config: str, todo: list[tuple[str, str, Path]], extra: list[str], jobs: int,
            threads: int) -> None:
    """Run ``todo`` ``jobs`` at a time (each batch starts together and is awaited together)."""
    for start in range(0, len(todo), jobs):
        batch = [(out_dir, launch(recipe, config, method, pattern, out_dir, extra, threads))
                 for method, pattern, out_dir in todo[start:start + jobs]]
        failed = [str(out_dir) for out_dir, proc in batch if proc.wait() != 0]
        if failed:
            raise SystemExit(f"run failed: {', '.join(failed)} (see the .log next to each)")


def table(recipe: str, runs: list[tuple[str, str, Path]]) -> str:
    columns = COLUMNS[recipe] + COMMON
    header = "| method | n:m | " + " | ".join(c[0] for c in columns) + " | tokens/s vs dense |"
    lines = [header, "|" + "---|" * (len(columns) + 3)]
    dense_tps = None
    loaded = []
    for method, pattern, out_dir in runs:
        path = out_dir / "results.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        loaded.append((method, pattern, results))
        if method == "dense" and results:
            dense_tps = _pick(results, ("tokens_per_second",))
    for method, pattern, results in loaded:
        cells = [_cell(_pick(results, keys), fmt) for _, keys, fmt in columns]
        tps = _pick(results, ("tokens_per_second",))
        ratio = f"{tps / dense_tps:.3f}" if tps and dense_tps else "-"
        shown = "-" if method == "dense" else pattern  # dense runs patched but unmasked
        lines.append(f"| {method} | {shown} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=sorted(COLUMNS))
    parser.add_argument("config")
    parser.add_argument("--runs", nargs="+", default=["dense:2:4", "fixed:2:4", "ste:2:4", "sr-ste:2:4"],
                        help="METHOD:N:M entries, run in this order")
    parser.add_argument("--output_root", default="runs/table")
    parser.add_argument("--force", action="store_true", help="rerun runs that already have results.json")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (in the order of --runs)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (default: all cores divided by --jobs)")
    parser.add_argument("--table_only", action="store_true", help="only print the table of existing runs")
    args = parser.parse_args(argv)

    runs = []
    for entry in args.runs:
        method, _, pattern = entry.partition(":")
        if not pattern or pattern.count(":") != 1:
            parser.error(f"--runs entry {entry!r} must look like METHOD:N:M, e.g. sr-ste:2:4")
        runs.append((method, pattern, Path(args.output_root) / f"{method}-{pattern.replace(':', 'x')}"))
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--jobs and --threads must be at least 1")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if not args.table_only:
        todo = []
        for method, pattern, out_dir in runs:
            if (out_dir / "results.json").exists() and not args.force:
                print(f"skip {out_dir} (results.json exists; --force reruns it)", flush=True)
            else:
                todo.append((method, pattern, out_dir))
        run_all(args.recipe, args.config, todo, extra, args.jobs, threads)
    print()
    print(table(args.recipe, runs))


if __name__ == "__main__":
    main()
