"""Per-step process CPU, kernel time and minor page faults of a real recipe run, one model per process.

The recipe pairs (`results_table.py --jobs 2`) run each model in a process of its own, and there the
sparse process paid page faults that `train_step.py` (both models in one process) cannot see. This runs
a recipe unchanged, with `resource.getrusage` read around every training step and every forward (the
Trainer's `compute_loss`), and exits right after `train()` (no test prediction or saving; evaluations that
`train()` itself runs, including the one transformers adds at the last step with `--eval_strategy steps`,
still run and are in the wall time: pass `--eval_strategy no` to leave them out). A step is the Trainer's
`on_step_begin`..`on_step_end`: fetching and collating its batches comes before it, logging, evaluation and
checkpointing after it, so those are not counted:

    .venv/bin/python benchmarks/recipe_steps.py translation recipes/configs/translation_multi30k.yaml \\
        --method sr-ste --max_steps 40 --output_dir /tmp/steps [more recipe flags]

It prints medians and means over the steps after the first 10: process CPU, user and system time per
step, and minor page faults per step, per forward and per backward (the rest of the step). Counts, not
wall time, so it can run beside other work; compare runs made under the same load.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from _machine import machine_header
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
SKIP = 10  # first steps left out: the allocator and caches settle
RECIPES = ("translation", "language_modeling")


def _usage() -> tuple[float, float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


class StepUsage(TrainerCallback):
    """getrusage at the start and end of every training step."""

    def __init__(self, record: dict[str, list[float]]) -> None:
        self.record = record

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin = _usage()
        self.record["forward_faults"].append(0)  # compute_loss adds each forward's (all micro-batches)

    def on_step_end(self, args, state, control, **kwargs):
        end = _usage()
        self.record["user_s"].append(end[0] - self.begin[0])
        self.record["system_s"].append(end[1] - self.begin[1])
        self.record["faults"].append(end[2] - self.begin[2])


def measured(trainer_class: type, record: dict[str, list[float]]) -> type:
    """`trainer_class` with per-step and per-forward usage recorded and the process ended after train()."""

    class Measured(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(StepUsage(record))

        def compute_loss(self, *args, **kwargs):
            before = _usage()[2]
            out = super().compute_loss(*args, **kwargs)
            if self.model.training:  # not the evaluations' forwards
                record["forward_faults"][-1] += _usage()[2] - before
            return out

        def train(self, *args, **kwargs):
            start = time.perf_counter()
            super().train(*args, **kwargs)
            report(record, time.perf_counter() - start)
            sys.stdout.flush()  # os._exit skips Python's buffers: the report would be lost when stdout is a
            sys.stderr.flush()  # pipe or a file (unless PYTHONUNBUFFERED is set)
            os._exit(0)  # nothing after training is measured

    return Measured


def report(record: dict[str, list[float]], wall_s: float) -> None:
    steps = len(record["faults"])
    if not steps:
        print(f"no training steps in {wall_s:.1f} s")
        return
    kept = slice(SKIP, None) if steps > SKIP else slice(0, None)
    cpu = [u + s for u, s in zip(record["user_s"], record["system_s"], strict=True)]
    backward = [total - fwd for total, fwd in zip(record["faults"], record["forward_faults"], strict=True)]
    print(f"{steps} steps in {wall_s:.1f} s; per step over steps {kept.start + 1}-{steps}: median (mean)")
    for name, values, scale, unit in (("process CPU", cpu, 1e3, "ms"), ("user", record["user_s"], 1e3, "ms"),
                                      ("system", record["system_s"], 1e3, "ms"),
                                      ("minor faults", record["faults"], 1, ""),
                                      ("  in the forward", record["forward_faults"], 1, ""),
                                      ("  in the rest", backward, 1, "")):
        part = values[kept]
        print(f"  {name:<18} {scale * statistics.median(part):10.1f} ({scale * statistics.fmean(part):.1f}) {unit}")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in RECIPES:
        raise SystemExit(f"usage: recipe_steps.py {{{','.join(RECIPES)}}} CONFIG [recipe flags]")
    recipe, recipe_argv = argv[0], argv[1:]
    print(machine_header())
    print("recipe:", recipe, " ".join(recipe_argv))
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", ROOT / "recipes" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    record: dict[str, list[float]] = {"user_s": [], "system_s": [], "faults": [], "forward_faults": []}
    train_recipe_model = module.train_recipe_model

    def train_measured(prog, trainer_class, **kwargs):
        return train_recipe_model(prog, measured(trainer_class, record), **kwargs)

    module.train_recipe_model = train_measured
    module.main(recipe_argv)


if __name__ == "__main__":
    main(sys.argv[1:])
