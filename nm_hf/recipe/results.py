"""A recipe run's results: training and saving, the results files, the printed table, the model card and push.

Files in the output directory (main process only, each written atomically with the umask's mode):

- `results.json`: everything the run measured (headline numbers at the top level, details in blocks);
- `train_results.json`, `eval_results.json`, `test_results.json`, `all_results.json`: the Trainer's
  metrics per split, written with `Trainer.save_metrics` like the transformers examples;
- `generated_predictions.txt` (translation): one generated test translation per line, in test order;
- `README.md`: the model card (`nm_hf.card.write_model_card`), with the redacted command line.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nm_hf._files import atomic_write_json, atomic_write_text

from .launch import HubTarget, launch_command, process_elapsed_seconds, run_environment

__all__ = [
    "PREDICTIONS_FILE",
    "RESULTS_FILE",
    "count_parameters",
    "dataset_label",
    "finish_run",
    "format_results_table",
    "format_samples",
    "json_safe",
    "model_summary",
    "pick_samples",
    "results_record",
    "safe_perplexity",
    "train_and_save",
    "training_curve",
    "write_predictions",
    "write_results_json",
]

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "generated_predictions.txt"  # the name transformers' run_translation.py uses


# ---------------------------------------------------------------------------------------------------------
# writing


def json_safe(value: Any) -> Any:
    """`value` with tensors and numpy values as Python numbers/lists, and NaN/inf floats as the strings
    "nan"/"inf"/"-inf" (strict JSON has no such numbers)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_results_json(path: str | os.PathLike[str], results: Mapping[str, Any]) -> Path:
    """Write `results` as JSON atomically (tensors and numpy scalars as numbers, NaN/inf as strings)."""
    return atomic_write_json(path, json_safe(results))


def write_predictions(path: str | os.PathLike[str], lines: Sequence[str]) -> Path:
    """One prediction per line (a line break inside a prediction becomes a space), atomically."""
    return atomic_write_text(path, "".join(" ".join(line.splitlines()) + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------------------
# formatting


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def format_results_table(results: Mapping[str, Any], title: str = "results") -> str:
    """A two-column text table of the scalar entries of `results` (nested dicts flattened with '/').

    Lists of records (such as the translation samples) are left out: `format_samples` prints those.
    """
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, data: Mapping[str, Any]) -> None:
        for key, value in data.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(f"{name}/", value)
            elif isinstance(value, (list, tuple)):
                if not any(isinstance(item, Mapping) for item in value):
                    rows.append((name, ", ".join(map(str, value))))
            else:
                rows.append((name, _format_value(value)))

    walk("", results)
    width = max([len(name) for name, _ in rows] + [len(title)])
    line = "-" * min(width + 2 + max([len(v) for _, v in rows] + [8]), 100)
    out = [line, title, line]
    out += [f"{name:<{width}}  {value}" for name, value in rows]
    out.append(line)
    return "\n".join(out)


def pick_samples(sources: Sequence[str], outputs: Sequence[str], references: Sequence[str],
                 count: int = 5) -> list[dict[str, Any]]:
    """`count` examples spread evenly over the set (first and last included), as
    `{"index", "source", "output", "reference"}` records."""
    total = min(len(sources), len(outputs), len(references))
    if total == 0 or count < 1:
        return []
    if count == 1 or total == 1:
        indices = [0]
    else:
        indices = sorted({round(i * (total - 1) / (min(count, total) - 1)) for i in range(min(count, total))})
    return [{"index": i, "source": sources[i], "output": outputs[i], "reference": references[i]}
            for i in indices]


def format_samples(samples: Sequence[Mapping[str, Any]], title: str = "samples") -> str:
    """Source / output / reference blocks, one per sample (an empty output says so: a model early in
    training often generates the end-of-sentence token first)."""
    out = [title]
    for sample in samples:
        out += ["", f"[{sample['index']}]",
                f"  source:    {sample['source']}",
                f"  output:    {sample['output'] or '(empty: the model ends the sentence at once)'}",
                f"  reference: {sample['reference']}"]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# measuring


def safe_perplexity(loss: float) -> float:
    """exp(loss), or inf where it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def model_summary(model: torch.nn.Module, model_name_or_path: str | None) -> dict[str, Any]:
    """The results.json "model" block."""
    return {
        "type": getattr(getattr(model, "config", None), "model_type", type(model).__name__),
        "parameters": count_parameters(model),
        "from_scratch": not model_name_or_path,
        "base_model": model_name_or_path,
    }


def dataset_label(data_args: Any, builtin: str) -> str:
    """How results.json and the model card name the run's data: the Hub dataset (with its configuration),
    the local training file, or else `builtin`, the description of the recipe's built-in data set."""
    if data_args.dataset_name:
        config = data_args.dataset_config_name
        return data_args.dataset_name + (f" ({config})" if config else "")
    if data_args.train_file:
        return f"local files ({Path(data_args.train_file).name})"
    return builtin


#: log_history keys left out of the curve: timings and totals, not quantities that evolve with training
_CURVE_SKIP_SUFFIXES = ("_runtime", "_per_second", "total_flos")


def training_curve(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The run's curve from `trainer.state.log_history`: one point per training log (loss, learning rate,
    mask metrics) and per evaluation (`eval_*`), each with its step, in order; timings and the end-of-training
    summary are left out, so a results file can show whether a model still improves or overfits."""
    curve: list[dict[str, Any]] = []
    for entry in log_history:
        if "train_runtime" in entry or "step" not in entry:
            continue  # the summary Trainer.train() logs at the end
        point = {key: value for key, value in entry.items()
                 if isinstance(value, (int, float)) and not isinstance(value, bool)
                 and not key.endswith(_CURVE_SKIP_SUFFIXES)}
        if len(point) > 2:  # more than step and epoch
            curve.append(point)
    return curve


def train_and_save(trainer: Any, training_args: Any, sparsity_config: Any) -> dict[str, Any]:
    """Train, measure, save the finalized model; returns the "train" and "sparsity" result blocks.

    `trainer` is a `with_token_throughput(SparseTrainer/SparseSeq2SeqTrainer)` instance. The sparsity
    block combines the tracker's summary (SAD, flip rate) with a check of the weights the forward pass
    uses (`nm_ok`: every group of m holds at most n non-zeros in every targeted layer). The training
    metrics go to train_results.json and a fresh all_results.json (`Trainer.save_metrics`).
    """
    from nm_hf.report import sparsity_report

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    runtime = float(train_result.metrics.get("train_runtime", 0.0))
    throughput = trainer.throughput(runtime)
    summary = trainer.sparsity_summary()
    report = sparsity_report(trainer.model)
    trainer.save_model()  # masks baked in; the live model stays sparse
    trainer.save_state()
    metrics = dict(train_result.metrics)
    if trainer.train_dataset is not None and hasattr(trainer.train_dataset, "__len__"):
        metrics["train_samples"] = len(trainer.train_dataset)
    if trainer.is_world_process_zero():
        (Path(training_args.output_dir) / "all_results.json").unlink(missing_ok=True)  # a previous run's
    trainer.save_metrics("train", metrics)
    return {
        # headline numbers (top-level numbers of results.json become rows of the model card's table)
        "sparsity": round(report.sparsity, 6),
        "nm_ok": report.nm_ok,
        "sad": summary.get("sad"),
        "sad_from_init": summary.get("sad_from_init"),
        "train_runtime_s": round(runtime, 2),
        "tokens_per_second": round(throughput["tokens_per_second"], 1),
        "curve": training_curve(trainer.state.log_history),
        # details
        "sparsity_config": {
            "pattern": sparsity_config.pattern, "method": sparsity_config.method,
            "decay": sparsity_config.decay, "decay_mode": sparsity_config.decay_mode,
            "method_args": dict(sparsity_config.method_args), "transposable": sparsity_config.transposable,
            "mask_update_interval": sparsity_config.mask_update_interval,
            "target_modules": sparsity_config.target_modules, "exclude_modules": sparsity_config.exclude_modules,
            "layers": len(report.layers),
        },
        "mask_stats": {key: summary.get(key) for key in ("flip_rate", "mean_flip_rate", "sad_rate",
                                                         "sad_from_init_rate", "pruned_weight_norm")},
        "train": {
            "steps": trainer.state.global_step,
            "loss": train_result.metrics.get("train_loss"),
            "tokens": throughput["train_tokens"],
            "eval_seconds_during_training": throughput["train_eval_seconds"],
            "processes": training_args.world_size,
            "learning_rate": training_args.learning_rate,
            "seed": training_args.seed,
        },
    }


def results_record(
    headline: Mapping[str, Any],
    blocks: Mapping[str, Any],
    *,
    evaluation: Mapping[str, Any],
    model: torch.nn.Module,
    model_name_or_path: str | None,
    data: Mapping[str, Any],
    notes: Mapping[str, Any] | None = None,
    samples: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A recipe's results.json, in the order the printed table shows it: the task's `headline` (task,
    dataset, test and validation metrics), the headline numbers of `blocks` (`train_and_save`: sparsity,
    SAD, throughput, curve), `notes`, the `evaluation` details, the detail blocks of `blocks`, the model
    (`model_summary`), `data`, the test `samples` (when given) and the run (total time, command,
    `run_environment`)."""
    return {
        **headline,
        **{key: value for key, value in blocks.items() if not isinstance(value, dict)},
        **(notes or {}),
        "evaluation": dict(evaluation),
        **{key: value for key, value in blocks.items() if isinstance(value, dict)},
        "model": model_summary(model, model_name_or_path),
        "data": dict(data),
        **({} if samples is None else {"samples": samples}),
        "run": {"total_time_s": round(process_elapsed_seconds(), 1), "command": launch_command(),
                "environment": run_environment()},
    }


# ---------------------------------------------------------------------------------------------------------
# the end of a run


def finish_run(
    training_args: Any,
    results: dict[str, Any],
    *,
    model: Any,
    task: str,
    dataset_name: str | None,
    base_model: str | None,
    hub: HubTarget | None,
    title: str = "results",
) -> None:
    """On the main process: results.json, model card, results table (and samples), then the optional Hub push.

    Must be called by every process (it only waits for the others at the end). The command recorded
    in the card and pushed is `launch_command()`: secrets redacted. The card's training hyperparameters
    are the run's own `training_args` (the pushed card too).
    """
    output_dir = Path(training_args.output_dir)
    if training_args.should_save:
        command = launch_command()
        repo_id = hub.repo_id if hub is not None else None
        safe = json_safe(results)
        write_results_json(output_dir / RESULTS_FILE, safe)
        from nm_hf.card import write_model_card

        write_model_card(output_dir, model=model, results=safe, dataset_name=dataset_name, task=task,
                         command=command, base_model=base_model, repo_id=repo_id, training_args=training_args)
        print("\n" + format_results_table(results, title=title), flush=True)
        if results.get("samples"):
            print("\n" + format_samples(results["samples"], title="samples from the test set"), flush=True)
        print(f"outputs in {output_dir}/", flush=True)
        if hub is not None and training_args.process_index == 0:  # one push, not one per node (save_on_each_node)
            from nm_hf.hub import push_to_hub

            info = push_to_hub(output_dir, hub.repo_id, token=hub.token, private=hub.private,
                               commit_message=f"nm_hf {task} recipe", results=safe,
                               dataset_name=dataset_name, task=task, command=command, base_model=base_model,
                               training_args=training_args)
            logger.info(f"pushed {output_dir} to {getattr(info, 'commit_url', hub.repo_id)}")
    if training_args.world_size > 1:
        _barrier()


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
