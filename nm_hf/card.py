"""Model cards for sparse models: metadata the Hub indexes (tags, datasets, model-index results) + a README.

`write_model_card(output_dir, ...)` reads what a training run left in `output_dir` (config.json with
the nm_sparsity record, the weights, results.json, sparsity_history.json, sparsity.png) and writes
README.md there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .compressed import CheckpointError, _read_json, inspect_checkpoint, is_compressed, read_config
from .record import CONFIG_KEY
from .report import SparsityReport, sparsity_report

__all__ = ["write_model_card", "card_metrics"]

#: result key (without test_/eval_ prefixes) -> (model-index metric type, display name)
_METRICS = {
    "bleu": ("bleu", "BLEU"),
    "sacrebleu": ("bleu", "BLEU"),
    "chrf": ("chrf", "chrF"),
    "perplexity": ("perplexity", "Perplexity"),
    "loss": ("loss", "Loss"),
    "accuracy": ("accuracy", "Accuracy"),
}
_TASK_NAMES = {
    "translation": "Translation",
    "text-generation": "Text Generation",
    "fill-mask": "Fill-Mask",
    "summarization": "Summarization",
    "text2text-generation": "Text2Text Generation",
}
PLOT_NAME = "sparsity.png"
HISTORY_NAME = "sparsity_history.json"
RESULTS_NAME = "results.json"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def card_metrics(results: dict[str, Any]) -> list[tuple[str, str, str | None, float]]:
    """(metric type, display name, split, value) for the known metrics in a results dict.

    Keys may carry a `test_` (split "test") or `eval_` (split "validation") prefix: `test_bleu`,
    `eval_loss`, `bleu`.
    """
    found = []
    for key, value in results.items():
        if not _is_number(value):
            continue
        split, base = None, key
        if key.startswith("test_"):
            split, base = "test", key[len("test_"):]
        elif key.startswith("eval_"):
            split, base = "validation", key[len("eval_"):]
        if base in _METRICS:
            metric_type, display = _METRICS[base]
            found.append((metric_type, display, split, float(value)))
    return found


def _infer_task(metrics: list[tuple[str, str, str | None, float]], config: dict) -> str | None:
    kinds = {m[0] for m in metrics}
    if kinds & {"bleu", "chrf"}:
        return "translation"
    if "perplexity" in kinds:
        return "text-generation"
    archs = " ".join(config.get("architectures") or [])
    if "CausalLM" in archs or "LMHead" in archs:
        return "text-generation"
    if "MaskedLM" in archs:
        return "fill-mask"
    return None


def _history_summary(path: Path) -> str | None:
    """One line about sparsity_history.json (SparsityTracker.save: {"records": [{"step", "sad", ...}]})."""
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    records = history.get("records") if isinstance(history, dict) else history
    link = f"[`{HISTORY_NAME}`]({HISTORY_NAME})"
    if not isinstance(records, list) or not records:
        return f"The mask history is in {link}."
    text = f"The mask history ({len(records)} records) is in {link}"
    last = records[-1]
    if isinstance(last, dict):
        numbers = [(k, v) for k, v in last.items() if _is_number(v)][:8]
        if numbers:
            text += "; last record: " + ", ".join(f"{k}={v:.4g}" for k, v in numbers)
    return text + "."


def _fmt(value: float) -> str:
    return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"


def _usage(repo: str, arch: str | None, compressed: bool) -> str:
    lines = ["## How to load it", ""]
    if compressed:
        lines += [
            "This repository holds the **nm_hf compressed format** (`nm_compressed.safetensors`: kept values "
            "plus packed positions), which plain `from_pretrained` cannot read. With nm_hf:",
            "",
            "```python",
            "import nm_hf",
            "",
            f'model = nm_hf.load_sparse("{repo}")  # sparse layers re-patched, ready for more SR-STE training',
            "```",
            "",
            "or turn a downloaded copy into a normal transformers checkpoint: `nm-hf decompress DIR OUT`.",
        ]
        return "\n".join(lines)
    cls = arch or "AutoModel"
    lines += [
        "With plain transformers (the pruned weights are stored as zeros; nothing else is needed):",
        "",
        "```python",
        f"from transformers import {cls}",
        "",
        f'model = {cls}.from_pretrained("{repo}")',
        "```",
        "",
        "With nm_hf, to continue training with the N:M masks in place:",
        "",
        "```python",
        "import nm_hf",
        "",
        f'model = nm_hf.load_sparse("{repo}")',
        "```",
    ]
    return "\n".join(lines)


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    results: dict | None = None,
    dataset_name: str | None = None,
    task: str | None = None,
    command: str | None = None,
    base_model: str | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """Write README.md (a Hub model card) into `output_dir` and return it.

    Reads config.json (for the nm_sparsity record; `model.config` if given), the per-layer table from
    `model` or else from the saved weights, and `results.json` / `sparsity_history.json` /
    `sparsity.png` when present. `results` overrides results.json keys. The file is replaced atomically.
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    report: SparsityReport
    if model is not None:
        config = model.config.to_dict()
        record = config.get(CONFIG_KEY)
        if not isinstance(record, dict):
            raise CheckpointError(f"{type(model).__name__} has no '{CONFIG_KEY}' record: sparsify it with nm_hf")
        report = sparsity_report(model)
        if (directory / "config.json").exists():  # the saved record may say more (compressed, ignored layers)
            saved = _read_json(directory / "config.json", "the model config").get(CONFIG_KEY)
            if isinstance(saved, dict):
                record = {**record, **saved}
    else:
        config, record = read_config(directory)
        report, _ = inspect_checkpoint(directory)

    merged: dict[str, Any] = {}
    if (directory / RESULTS_NAME).exists():
        merged.update(_read_json(directory / RESULTS_NAME, "results"))
    merged.update(results or {})
    metrics = card_metrics(merged)
    task = task or _infer_task(metrics, config)
    n, m, method = record["n"], record["m"], record.get("method", "sr-ste")
    pattern = f"{n}:{m}"
    compressed = is_compressed(record)
    arch = (config.get("architectures") or [None])[0]
    name = repo_id.split("/")[-1] if repo_id else directory.resolve().name
    repo = repo_id or f"<user>/{name}"

    eval_results = [
        EvalResult(task_type=task or "other", task_name=_TASK_NAMES.get(task or "", task),
                   dataset_type=dataset_name or "custom", dataset_name=dataset_name or "custom",
                   dataset_split=split, metric_type=metric_type, metric_name=display, metric_value=value)
        for metric_type, display, split, value in metrics
    ]
    tags = list(dict.fromkeys(["nm-sparsity", pattern, method, "nm_hf", "sparse"]))
    card_data = ModelCardData(
        library_name="transformers",
        tags=tags,
        datasets=[dataset_name] if dataset_name else None,
        metrics=sorted({m_[0] for m_ in metrics}) or None,
        base_model=base_model,
        pipeline_tag=task,
        model_name=name,
        eval_results=eval_results or None,
    )

    sparsity = record.get("sparsity", report.sparsity)
    ignored = record.get("ignored_modules")
    facts = [
        ("pattern", f"{pattern} (at most {n} non-zero weights in every {m} consecutive input weights)"),
        ("method", method + (f", decay {record['decay']:g} ({record.get('decay_mode', 'gradient')})"
                             if method == "sr-ste" and "decay" in record else "")),
        ("targeted layers", f"{len(record.get('targeted_modules', []))} "
                            f"(selector: `{record.get('target_modules', 'all-linear')}`)"),
        ("layers left dense", ", ".join(f"`{x}`" for x in ignored) if ignored else
         ("none" if ignored is not None else "not recorded")),
        ("measured sparsity of the targeted layers", f"{sparsity:.2%}"),
        ("N:M pattern holds", "yes" if report.nm_ok else "NO"),
        ("weights format", "nm_hf compressed" if compressed else "safetensors (dense, pruned weights are zeros)"),
    ]
    body = [
        f"# {name}",
        "",
        f"A {arch or 'transformers'} model whose linear layers are **{pattern} sparse**: in every group of {m} "
        f"consecutive weights along the input dimension at most {n} are non-zero (the pattern sparse tensor "
        f"cores accelerate). Trained with `nm_hf`, method `{method}`"
        + (" (SR-STE: Zhou et al., *Learning N:M Fine-grained Structured Sparse Neural Networks From "
           "Scratch*, ICLR 2021)" if method == "sr-ste" else "")
        + (f", starting from `{base_model}`" if base_model else "") + ".",
        "",
        "## Sparsity",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in facts],
        "",
    ]
    shown = {k: v for k, v in merged.items() if _is_number(v)}
    if shown:
        body += ["## Results", ""]
        if dataset_name:
            body += [f"On `{dataset_name}`:", ""]
        body += ["| metric | value |", "|---|---|", *[f"| {k} | {_fmt(float(v))} |" for k, v in shown.items()], ""]
    body += ["## Per-layer sparsity", "", report.to_markdown(), ""]
    plot = (directory / PLOT_NAME).exists()
    history = _history_summary(directory / HISTORY_NAME) if (directory / HISTORY_NAME).exists() else None
    if plot or history:
        body += ["## Mask changes during training", ""]
        if plot:
            body += [f"![Sparse architecture divergence and sparsity during training]({PLOT_NAME})", ""]
        if history:
            body += [history, ""]
    body += [_usage(repo, arch, compressed), ""]
    if command:
        body += ["## Training command", "", "```bash", command, "```", ""]

    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body))
    target = directory / "README.md"
    tmp = directory / f".README.md.tmp-{os.getpid()}"
    try:
        tmp.write_text(str(card), encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return card
