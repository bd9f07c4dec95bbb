"""Model cards for sparse models: metadata the Hub indexes (tags, datasets, model-index results) + a README.

`write_model_card(output_dir, ...)` reads what a training run left in `output_dir` (config.json with
the nm_sparsity record, the weights, results.json, sparsity_history.json, sparsity.png,
trainer_state.json) and writes README.md there: the sparsity facts, results, training
hyperparameters, the per-layer table, a usage snippet that runs with the installed transformers
(tokenizer + `generate` for generative models) and the framework versions. The card never holds a
secret: tokens in the training command are redacted here too (`nm_hf.redact`, the rules and
`REDACTED` marker the recipes use; `redact_secrets` is re-exported here).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from ._files import atomic_write_text
from .checkpoint.directory import CONFIG_NAME, CheckpointError, read_config, read_json
from .checkpoint.inspect import inspect_checkpoint
from .checkpoint.layout import skeleton
from .layers import iter_targets
from .layers.experts import unsupported_experts
from .methods import UnknownMethodError, get_method
from .record import STATE_TRAINING, is_compressed, read_record, require_record
from .redact import redact_secrets
from .report import SparsityReport, sparsity_report

__all__ = ["write_model_card", "CardOptions", "check_card_options", "card_metrics", "redact_secrets",
           "is_dataset_id", "pipeline_tag_for", "training_hyperparameters", "nm_hf_version",
           "framework_versions"]


class CardOptions(TypedDict, total=False):
    """What a model card says about a run beyond the files it reads: the keyword arguments of
    `write_model_card` that `nm_hf.hub.prepare_upload` and `push_to_hub` pass on as they are."""

    dataset_name: str | None
    task: str | None
    command: str | None
    base_model: str | None
    license: str | None
    training_args: Any


def check_card_options(options: dict[str, Any], where: str) -> None:
    """Refuse a keyword argument that is not a `CardOptions` key (TypeError naming `where`), before any work."""
    unknown = sorted(set(options) - set(CardOptions.__annotations__))
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))} "
                        f"(model card options: {', '.join(CardOptions.__annotations__)})")

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
TRAINER_STATE_NAME = "trainer_state.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

#: TrainingArguments fields shown in the card (never anything secret)
_HYPERPARAMETERS = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "seed", "optim", "lr_scheduler_type", "warmup_steps",
                    "warmup_ratio", "num_train_epochs", "max_steps", "weight_decay", "adam_beta1", "adam_beta2",
                    "adam_epsilon", "max_grad_norm", "label_smoothing_factor", "bf16", "fp16")
#: trainer_state.json fields shown when no TrainingArguments are given
_STATE_FIELDS = ("train_batch_size", "max_steps", "num_train_epochs", "global_step")

_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zip", ".xz", ".bz2")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_dataset_id(name: str | None) -> bool:
    """True for something that can be a Hub dataset id ("name" or "namespace/name"), not a local path or label."""
    if not name or not _DATASET_ID.fullmatch(name) or ".." in name or "--" in name:
        return False
    return not (os.path.exists(name) or name.lower().endswith(_DATA_SUFFIXES))


def pipeline_tag_for(task: str | None) -> str | None:
    """`task` if the installed transformers has a pipeline for it, else None (no widget that cannot run)."""
    if not task:
        return None
    try:
        from transformers.pipelines import SUPPORTED_TASKS
    except ImportError:  # pragma: no cover - transformers without pipelines
        return None
    return task if task in SUPPORTED_TASKS else None


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


def training_hyperparameters(training_args: Any = None, trainer_state: Mapping[str, Any] | None = None,
                             results: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The training settings worth a card: TrainingArguments (or its dict), else trainer_state.json, else results."""
    found: dict[str, Any] = {}
    if training_args is not None:
        args = training_args if isinstance(training_args, Mapping) else training_args.to_dict()
        found = {k: args[k] for k in _HYPERPARAMETERS if args.get(k) not in (None, "", False)}
        if "warmup_steps" in found and not found["warmup_steps"]:
            found.pop("warmup_steps")
        world = getattr(training_args, "world_size", None) if not isinstance(training_args, Mapping) \
            else training_args.get("world_size")
        if _is_number(world) and "per_device_train_batch_size" in found:
            found["num_processes"] = int(world)
            found["total_train_batch_size"] = (int(found["per_device_train_batch_size"]) * int(world)
                                               * int(found.get("gradient_accumulation_steps", 1)))
    elif trainer_state:
        found = {k: trainer_state[k] for k in _STATE_FIELDS if _is_number(trainer_state.get(k))}
    train = (results or {}).get("train")
    if isinstance(train, Mapping):
        for key, name in (("steps", "training_steps"), ("tokens", "training_tokens"), ("processes", "num_processes")):
            if _is_number(train.get(key)) and name not in found:
                found[name] = train[key]
    for key, value in list(found.items()):
        if isinstance(value, float) and not value.is_integer():
            found[key] = float(f"{value:.6g}")
        elif not isinstance(value, (int, float, bool, str)):
            found[key] = str(value)
    return found


def _trainer_state(path: Path) -> dict[str, Any] | None:
    """trainer_state.json if it is there and readable (the card is written without it otherwise)."""
    try:
        return read_json(path, "the trainer state") if path.is_file() else None
    except CheckpointError:
        return None


def nm_hf_version() -> str:
    """The running nm_hf's version (the package's `__version__`, else the installed distribution's)."""
    version = getattr(sys.modules.get(__package__ or "nm_hf"), "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("nm-hf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def framework_versions() -> list[tuple[str, str]]:
    """(package, version) of nm_hf, transformers, torch and Python: the model card's "Framework versions"
    and the environment a recipe records in results.json."""
    import torch
    import transformers

    return [("nm_hf", nm_hf_version()), ("transformers", transformers.__version__), ("torch", torch.__version__),
            ("Python", platform.python_version())]


def _auto_class(config: Mapping[str, Any]) -> tuple[str, str]:
    """(Auto class name, kind) for the usage snippet: kind is "causal", "seq2seq", "masked" or "base"."""
    from transformers.models.auto import modeling_auto

    archs = set(config.get("architectures") or [])
    for mapping, auto, kind in (
        (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM", "causal"),
        (modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "AutoModelForSeq2SeqLM", "seq2seq"),
        (modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, "AutoModelForMaskedLM", "masked"),
    ):
        if archs & set(mapping.values()):
            return auto, kind
    if config.get("is_encoder_decoder"):
        return "AutoModelForSeq2SeqLM", "seq2seq"
    return "AutoModel", "base"


def _usage(repo: str, config: Mapping[str, Any], compressed: bool, tokenizer_source: str | None) -> str:
    auto, kind = _auto_class(config)
    lines = ["## How to use it", ""]
    if compressed:
        lines += ["This repository holds the **nm_hf compressed format** (`nm_compressed.safetensors`: kept values "
                  "plus packed positions), which plain `from_pretrained` cannot read. With nm_hf (the sparse "
                  "layers come back re-patched, ready for more training or for inference):", ""]
    else:
        lines += ["With plain transformers (the pruned weights are stored as zeros; nothing else is needed):", ""]
    code = ["```python"]
    imports = ["AutoTokenizer"] if tokenizer_source else []
    if compressed:
        code += ["import nm_hf"]
    else:
        imports = [auto, *imports]
    if imports:
        code += [f"from transformers import {', '.join(sorted(imports))}"]
    code += [""]
    if tokenizer_source:
        code += [f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_source}")']
    else:
        code += ["# no tokenizer was uploaded with this model: load the one it was trained with as `tokenizer`"]
    load = f'nm_hf.load_sparse("{repo}")' if compressed else f'{auto}.from_pretrained("{repo}")'
    code += [f"model = {load}.eval()", ""]
    if kind == "causal":
        code += ['inputs = tokenizer("The first words of a text", return_tensors="pt")',
                 "outputs = model.generate(**inputs, max_new_tokens=40)",
                 "print(tokenizer.decode(outputs[0], skip_special_tokens=True))"]
    elif kind == "seq2seq":
        code += ['inputs = tokenizer("A sentence for the model.", return_tensors="pt")',
                 "outputs = model.generate(**inputs, max_new_tokens=64, num_beams=4)",
                 "print(tokenizer.decode(outputs[0], skip_special_tokens=True))"]
    elif kind == "masked":
        code += ['inputs = tokenizer(f"Paris is the {tokenizer.mask_token} of France.", return_tensors="pt")',
                 "logits = model(**inputs).logits",
                 "position = (inputs.input_ids[0] == tokenizer.mask_token_id).nonzero()[0, 0]",
                 "print(tokenizer.decode(logits[0, position].argmax()))"]
    else:
        code += ['inputs = tokenizer("Some text", return_tensors="pt")',
                 "hidden_states = model(**inputs).last_hidden_state"]
    code += ["```"]
    lines += code
    if compressed:
        lines += ["", "Or turn a downloaded copy into a normal transformers checkpoint: `nm-hf decompress DIR OUT`."]
    else:
        lines += ["", "With nm_hf, to continue training with the N:M masks in place:", "", "```python", "import nm_hf",
                  "", f'model = nm_hf.load_sparse("{repo}")', "```"]
    return "\n".join(lines)


def _method_facts(record: Mapping[str, Any]) -> tuple[str, str]:
    """(short method label for the table, one-sentence description) from the method registry."""
    name = str(record.get("method", "sr-ste"))
    try:
        method = get_method(name)
    except UnknownMethodError:
        return name, f"Trained with nm_hf, method `{name}`."
    label = name
    if method.uses_decay and "decay" in record:
        label += f", decay {record['decay']:g} ({record.get('decay_mode', 'gradient')})"
    return label, method.describe(record)


def _expert_weights(record: Mapping[str, Any], model: nn.Module | None, directory: Path) -> tuple[list[str], list[str]]:
    """(targeted MoE expert weight tensors, expert weight tensors left dense), from the record and the model
    (or a meta skeleton of config.json): a card must not call a MoE model sparse whose experts are dense."""
    targeted = [str(name) for name in record.get("parameter_targets") or []]
    source = model if model is not None else skeleton(directory)
    every = [t.name for t in iter_targets(source) if t.kind.parameter_targets] if source is not None else []
    if source is not None:  # expert weights in a layout nm_hf has none for are dense experts too
        every += [f"{module}.{param}" for module, params in unsupported_experts(source).items() for param in params]
    return targeted, [name for name in every if name not in set(targeted)]


def _experts_clause(experts: list[str], dense_experts: list[str]) -> str:
    if dense_experts:
        return " (not its mixture-of-experts expert weights" + (", some of which" if experts else ", which") \
            + " stay dense)"
    return ", mixture-of-experts expert weights included," if experts else ""


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
    license: str | None = None,
    training_args: Any = None,
    source_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """Write README.md (a Hub model card) into `output_dir` and return it.

    Reads config.json (for the nm_sparsity record; `model.config` if given), the per-layer table from
    `model` or else from the saved weights, and `results.json` / `sparsity_history.json` /
    `sparsity.png` when present. `results` overrides results.json keys. `training_args` (a
    TrainingArguments or its dict) gives the hyperparameters, else `trainer_state.json` in
    `source_dir` (default `output_dir`). `license` is written only when given (or in config.json).
    `dataset_name` goes into the metadata only if it can be a Hub dataset id (a local path or a
    free-form label is only named in the text). The file is replaced atomically.
    """
    directory = Path(output_dir)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    report: SparsityReport
    if model is not None:
        config = model.config.to_dict()
        record = require_record(config, where=type(model).__name__, error=CheckpointError)
        report = sparsity_report(model)
        if (directory / CONFIG_NAME).exists():  # the saved record may say more (compressed, ignored layers)
            saved = read_record(read_json(directory / CONFIG_NAME, "the model config"))
            if saved is not None:
                record = {**record, **saved}
    else:
        config, record = read_config(directory)
        report, _ = inspect_checkpoint(directory)

    merged: dict[str, Any] = {}
    if (directory / RESULTS_NAME).exists():
        merged.update(read_json(directory / RESULTS_NAME, "results"))
    merged.update(results or {})
    metrics = card_metrics(merged)
    task = task or _infer_task(metrics, config)
    n, m = record["n"], record["m"]
    method = str(record.get("method", "sr-ste"))
    pattern = f"{n}:{m}"
    compressed = is_compressed(record)
    arch = (config.get("architectures") or [None])[0]
    name = repo_id.split("/")[-1] if repo_id else (model_name or directory.resolve().name)
    repo = repo_id or f"<user>/{name}"
    dataset_id = dataset_name if is_dataset_id(dataset_name) else None
    license = license or (config.get("license") if isinstance(config.get("license"), str) else None)

    eval_results = [
        EvalResult(task_type=task or "other", task_name=_TASK_NAMES.get(task or "", task),
                   dataset_type=dataset_id or "custom", dataset_name=dataset_name or "custom",
                   dataset_split=split, metric_type=metric_type, metric_name=display, metric_value=value)
        for metric_type, display, split, value in metrics
    ]
    nm_ok = report.nm_ok
    tags = list(dict.fromkeys(["nm-sparsity", pattern, method, "nm_hf"] + (["sparse"] if nm_ok else [])
                              + ([task] if task else [])))
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        metrics=sorted({m_[0] for m_ in metrics}) or None,
        base_model=base_model,
        pipeline_tag=pipeline_tag_for(task),
        model_name=name,
        eval_results=eval_results or None,
    )

    sparsity = report.sparsity  # measured in the weights (the record's figure is from finalize time)
    ignored = record.get("ignored_modules")
    method_label, method_sentence = _method_facts(record)
    experts, dense_experts = _expert_weights(record, model, directory)
    targets = len(record.get("targeted_modules", []))
    selector = f"(selector: `{record.get('target_modules', 'all-linear')}`)"
    left_dense = [f"`{x}`" for x in ignored or []]
    unlisted = [name for name in dense_experts if name not in set(ignored or [])]
    if unlisted:
        left_dense.append(f"{len(unlisted)} MoE expert weight tensors (`{unlisted[0]}`, ...)")
    facts = [
        ("pattern", f"{pattern} (at most {n} non-zero weights in every {m} consecutive input weights)"),
        ("method", method_label),
        ("targeted layers", f"{targets - len(experts)} layers and {len(experts)} MoE expert weight tensors "
                            f"(one matrix per expert, N:M per expert along each expert matrix's input dimension; "
                            f"routers stay dense) {selector}" if experts else f"{targets} {selector}"),
        ("layers left dense", ", ".join(left_dense) if left_dense else
         ("none" if ignored is not None else "not recorded")),
        ("measured sparsity of the targeted layers", f"{sparsity:.2%}"),
        ("N:M pattern holds", "yes" if nm_ok else "NO"),
        ("weights format", "nm_hf compressed" if compressed else "safetensors (dense, pruned weights are zeros)"),
    ]
    if nm_ok:
        headline = (f"A {arch or 'transformers'} model whose linear layers{_experts_clause(experts, dense_experts)} "
                    f"are **{pattern} sparse**: in every group of {m} consecutive weights along the input dimension "
                    f"at most {n} are non-zero (the pattern sparse tensor cores accelerate).")
    else:  # a dense baseline, dense training weights saved before finalize, or broken weights: say so
        why = ("the record says state='training': these are the dense training weights, saved before "
               "`nm_hf.finalize`" if record.get("state") == STATE_TRAINING else "see the per-layer table")
        headline = (f"A {arch or 'transformers'} model trained for the {pattern} pattern whose saved "
                    f"weights are **not {pattern} sparse** ({why}).")
    body = [
        f"# {name}",
        "",
        headline + " Trained with `nm_hf`" + (f", starting from `{base_model}`" if base_model else "")
        + f". {method_sentence}",
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
    elif dataset_name:
        body += [f"Trained on `{dataset_name}`.", ""]
    trainer_state = _trainer_state(Path(source_dir or directory) / TRAINER_STATE_NAME)
    hyper = training_hyperparameters(training_args, trainer_state, merged)
    if hyper:
        body += ["## Training hyperparameters", "", "| | |", "|---|---|",
                 *[f"| {k} | {v} |" for k, v in hyper.items()], ""]
    body += ["## Per-layer sparsity", "", report.to_markdown(), ""]
    plot = (directory / PLOT_NAME).exists()
    history = _history_summary(directory / HISTORY_NAME) if (directory / HISTORY_NAME).exists() else None
    if plot or history:
        body += ["## Mask changes during training", ""]
        if plot:
            body += [f"![Sparse architecture divergence and sparsity during training]({PLOT_NAME})", ""]
        if history:
            body += [history, ""]
    has_tokenizer = any((directory / f).exists() for f in _TOKENIZER_FILES)
    body += [_usage(repo, config, compressed, repo if has_tokenizer else base_model), ""]
    if command:
        body += ["## Training command", "", "```bash", redact_secrets(command), "```", ""]
    body += ["## Framework versions", "", *[f"- {k} {v}" for k, v in framework_versions()], ""]

    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body))
    atomic_write_text(directory / "README.md", str(card))
    return card
