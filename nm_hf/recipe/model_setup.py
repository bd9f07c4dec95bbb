"""Building the recipe's model and tokenizer without touching the output directory.

- `apply_config_overrides`: `--config_overrides "key=value,..."` on a model config, all checked first;
- `skeleton`: the model a builder makes, materialised without initialisation (meta device, then empty
  CPU memory): enough to check the layer selection before any data is loaded;
- `check_sparsity_targets`: `nm_hf.find_target_modules` with a one-line error naming the flags;
- `shared_tokenizer`: a tokenizer trained once (process 0) and sent to every process in memory; it is
  written to the output directory only with the trained model, so a run that fails early leaves a
  previous run's model and tokenizer untouched;
- `pretrained_model_config`, `model_and_tokenizer`: --model_name_or_path's config, and the run's model
  and tokenizer (pretrained, or built from scratch with a shared tokenizer), its layers checked;
- `count_causal_lm_targets`: makes the Trainer divide a causal LM's loss by the positions it predicts
  (GPT-2 needs it under transformers 5.23, see the function);
- `check_prune_method`, `prune_pretrained`: `--prune_criterion` / `--calibration_samples`, the one-shot
  prune of a pretrained model (`nm_hf.prune`) before it is fine-tuned, with the first training examples
  as calibration data.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..injection import SparsifyError, find_target_modules
from ..methods import get_method
from ..prune import CALIBRATED, PruneError, prune
from .args import CALIBRATION_SAMPLES
from .config_files import ArgumentsError

__all__ = ["apply_config_overrides", "calibration_batches", "check_prune_method", "check_sparsity_targets",
           "count_causal_lm_targets", "model_and_tokenizer", "pretrained_model_config", "prune_pretrained",
           "resume_dirs", "shared_tokenizer", "skeleton"]

logger = logging.getLogger(__name__)


def _convert_like(old: Any, raw: str, key: str) -> Any:
    lowered = raw.strip().lower()
    if isinstance(old, bool) or (old is None and lowered in ("true", "false")):
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"--config_overrides: {key}={raw!r} is not a boolean")
    if old is None and lowered in ("none", "null"):
        return None
    for kind in (int, float):
        if isinstance(old, kind) or old is None:
            try:
                return kind(raw)
            except ValueError:
                if old is not None:
                    raise ValueError(f"--config_overrides: {key}={raw!r} is not a valid "
                                     f"{kind.__name__}") from None
    return raw


def apply_config_overrides(config: Any, overrides: str | None) -> dict[str, Any]:
    """Apply `--config_overrides "key=value,key=value"` to a model config; all checked before any is set."""
    if not overrides:
        return {}
    updates: dict[str, Any] = {}
    for item in overrides.split(","):
        if "=" not in item:
            raise ValueError(f"--config_overrides: {item!r} is not key=value (write 'a=1,b=0.1')")
        key, raw = (part.strip() for part in item.split("=", 1))
        if not hasattr(config, key):
            raise ValueError(f"--config_overrides: {type(config).__name__} has no attribute {key!r}")
        updates[key] = _convert_like(getattr(config, key), raw, key)
    for key, value in updates.items():
        setattr(config, key, value)
    return updates


def skeleton(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()` on the meta device, then given uninitialised CPU memory: the real layer structure, shapes
    and weight tying at almost no cost (pages never touched are never allocated). Its weights are garbage."""
    with torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu")


def count_causal_lm_targets(model: torch.nn.Module) -> bool:
    """Name the causal-LM loss of a decoder model whose class name does not (GPT-2's `GPT2LMHeadModel`).

    transformers 5.23's Trainer divides a causal LM's summed loss by the labels it will predict
    (`labels[..., 1:]`) only when `model.loss_type` maps to the causal-LM loss; it is derived from the
    class name, so for `GPT2LMHeadModel` it stays None and the Trainer divides by every label, the
    first of each block included, which is never predicted: its loss reads low by (block - 1) / block
    (1/128 of the loss, 3% of the perplexity, for 128-token blocks). The model computes that loss
    already; naming it only fixes the count. True when the model was changed.
    """
    from transformers.loss.loss_utils import LOSS_MAPPING  # the recipe support may import transformers

    causal = LOSS_MAPPING["ForCausalLM"]
    config = getattr(model, "config", None)
    if getattr(model, "loss_type", "") is not None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(model, "loss_function", None) is not causal:
        return False
    model.loss_type = "ForCausalLM"
    return True


def check_sparsity_targets(model: torch.nn.Module, sparsity_config: Any) -> list[str]:
    """The layers the sparse trainer will convert; `ArgumentsError` (one line, naming the flags) if the
    selection is empty or a selected layer cannot be N:M sparse (e.g. its input size is not a multiple
    of M)."""

    try:
        return find_target_modules(model, sparsity_config)
    except SparsifyError as err:
        problems = [line.strip().removeprefix("- ") for line in str(err).splitlines()[1:] if line.strip()]
        shown = problems[:3] + ([f"and {len(problems) - 3} more"] if len(problems) > 3 else [])
        detail = "; ".join(shown) or str(err)
        raise ArgumentsError(f"--sparsity {sparsity_config.pattern} --target_modules/--exclude_modules on "
                             f"{type(model).__name__}: {detail}") from None


def resume_dirs(training_args: Any) -> list[str]:
    """Where a resumed run's tokenizer is: the checkpoint resumed from, then the output directory (none
    for a fresh run, which trains its own)."""
    if not training_args.resume_from_checkpoint:
        return []
    return [str(training_args.resume_from_checkpoint), str(training_args.output_dir)]


def shared_tokenizer(training_args: Any, train: Callable[[], Any],
                     reuse_from: Sequence[str | os.PathLike[str] | None] = ()) -> Any:
    """A tokenizer trained once, on process 0, and given to every process; nothing is written to disk
    outside a temporary directory.

    BPE training may break ties differently from one run to the next, so replicas must not train
    their own: every process (every node too) gets process 0's files through a broadcast. The first
    directory of `reuse_from` holding a tokenizer.json (a resumed run's checkpoint) is loaded instead
    of training, so the vocabulary keeps matching the checkpoint's embeddings.
    """
    from transformers import AutoTokenizer

    for directory in reuse_from:
        if directory is not None and (Path(directory) / "tokenizer.json").is_file():
            logger.info(f"resuming: using the tokenizer saved in {directory}")
            return AutoTokenizer.from_pretrained(directory)
    distributed = (training_args.world_size > 1 and torch.distributed.is_available()
                   and torch.distributed.is_initialized())
    if not distributed or training_args.process_index == 0:
        start = time.perf_counter()
        tokenizer = train()
        logger.info(f"trained a tokenizer of {len(tokenizer)} tokens in {time.perf_counter() - start:.1f} s")
    if not distributed:
        return tokenizer
    payload: list[dict[str, bytes] | None] = [None]
    if training_args.process_index == 0:
        with tempfile.TemporaryDirectory(prefix="nm_hf_tokenizer_") as tmp:
            tokenizer.save_pretrained(tmp)
            payload = [{path.name: path.read_bytes() for path in Path(tmp).iterdir() if path.is_file()}]
    torch.distributed.broadcast_object_list(payload, src=0)
    if training_args.process_index == 0:
        return tokenizer  # the one that is saved with the model: without a loader's temporary-path settings
    files = payload[0]
    assert files is not None
    with tempfile.TemporaryDirectory(prefix="nm_hf_tokenizer_") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)


def pretrained_model_config(model_args: Any) -> Any:
    """The config of --model_name_or_path (`AutoConfig`); --config_overrides, which only applies to a model
    built from scratch, is refused (`ArgumentsError`) first."""
    if model_args.config_overrides:
        raise ArgumentsError("--config_overrides only applies to a model built from scratch, not to "
                             f"--model_name_or_path {model_args.model_name_or_path}")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_args.model_name_or_path)


def model_and_tokenizer(model_args: Any, training_args: Any, sparsity_config: Any, *,
                        load_pretrained: Callable[[], torch.nn.Module], train_tokenizer: Callable[[], Any],
                        build_model: Callable[[Any], torch.nn.Module]) -> tuple[torch.nn.Module, Any]:
    """The run's model and tokenizer, with the layer selection checked on the real model.

    With --model_name_or_path: `load_pretrained()` and the model's own tokenizer. From scratch: a
    tokenizer trained once, by `train_tokenizer()` on process 0 (`shared_tokenizer`; a resumed run
    loads the one it saved, `resume_dirs`), and the model `build_model(tokenizer)` makes for it.
    """
    if model_args.model_name_or_path:
        from transformers import AutoTokenizer

        model = load_pretrained()
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    else:
        tokenizer = shared_tokenizer(training_args, reuse_from=resume_dirs(training_args), train=train_tokenizer)
        model = build_model(tokenizer)
    check_sparsity_targets(model, sparsity_config)
    return model, tokenizer


def check_prune_method(criterion: str | None, sparsity_config: Any) -> None:
    """Refuse, before any data is loaded, a `--prune_criterion` the run's `--method` would ignore: a method
    that does not mask the forward pass (`dense`) would use the dense weights again."""
    if criterion is None:
        return
    if not get_method(sparsity_config.method).masks_forward:
        raise ArgumentsError(f"--prune_criterion {criterion} needs a --method that masks (e.g. fixed or sr-ste), "
                             f"not {sparsity_config.method!r}")


def calibration_batches(dataset: Any, collator: Callable[[list[Any]], Any], samples: int,
                        batch_size: int) -> list[Any]:
    """The first `samples` examples of `dataset` (fewer if it is shorter), collated in order into batches of
    `batch_size`: the same calibration data on every run and every process."""
    count = min(samples, len(dataset))
    rows = [dataset[i] for i in range(count)]
    return [collator(rows[start:start + batch_size]) for start in range(0, count, batch_size)]


def prune_pretrained(model: torch.nn.Module, sparsity_config: Any, criterion: str | None, *,
                     train_dataset: Any, collator: Callable[[list[Any]], Any], calibration_samples: int | None,
                     training_args: Any) -> dict[str, Any] | None:
    """`--prune_criterion`: prune `model` one-shot (`nm_hf.prune`) and leave it sparsified with
    `sparsity_config`, which the sparse trainer then accepts as is; returns the results.json record
    (None without a criterion).

    Calibration (wanda, sparsegpt): the first `calibration_samples` (default `CALIBRATION_SAMPLES`)
    tokenized training examples, collated by the run's collator in batches of the run's
    `per_device_train_batch_size`. The model is pruned on the run's device (where it will train), with a
    progress bar on the main process unless `disable_tqdm`. A refusal of `nm_hf.prune` becomes a one-line
    `ArgumentsError` naming the flag; the model is unchanged then and nothing has been written.
    """
    if criterion is None:
        return None
    calibration = None
    requested = None
    if criterion in CALIBRATED:
        requested = calibration_samples or CALIBRATION_SAMPLES
        calibration = calibration_batches(train_dataset, collator, requested,
                                          training_args.per_device_train_batch_size)
        used = min(requested, len(train_dataset))
        if used < requested:
            logger.warning(f"--calibration_samples {requested}: the training data has {used} examples; "
                           "calibrating with all of them")
    model.to(training_args.device)
    progress = not training_args.disable_tqdm and training_args.local_process_index == 0
    start = time.perf_counter()
    try:
        prune(model, sparsity_config, criterion=criterion, calibration=calibration, progress=progress)
    except PruneError as err:
        raise ArgumentsError(f"--prune_criterion {criterion}: {err}") from None
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {
        "criterion": criterion,
        "calibration_samples": None if calibration is None else min(requested, len(train_dataset)),
        "calibration_batches": None if calibration is None else len(calibration),
        "seconds": round(seconds, 2),
    }
    logger.info(f"one-shot prune to {sparsity_config.pattern} ({criterion}"
                + ("" if calibration is None else f", {record['calibration_samples']} calibration examples")
                + f") in {seconds:.1f} s")
    return record
