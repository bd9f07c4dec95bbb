"""The recipes' sparse training: how the first mask is chosen, then training and saving.

- `check_first_mask`: --dense_warmup_fraction and --prune_criterion (the two ways of choosing the first
  mask other than the method's own) checked against --method and the run, before anything is loaded;
- `train_recipe_model`: the optional one-shot prune of a pretrained model, the recipe trainer (token
  throughput, exact evaluation) with the optional dense warm-up switch, training and saving, and the
  result blocks recording all of it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from nm_hf.cpu_memory import keep_freed_memory

from .launch import user_errors
from .model_setup import check_prune_method, prune_pretrained
from .results import train_and_save
from .schedule import attach_dense_warmup, check_dense_warmup, resumed_step, starting_config
from .trainer_mixins import with_token_throughput

__all__ = ["check_first_mask", "train_recipe_model"]

logger = logging.getLogger(__name__)


def check_first_mask(model_args: Any, sparsity_config: Any, training_args: Any) -> None:
    """Refuse a --dense_warmup_fraction or --prune_criterion the run's --method or length cannot honour
    (one-line `ValueError`), before any data is loaded or file written."""
    check_dense_warmup(model_args.dense_warmup_fraction, sparsity_config, training_args.max_steps,
                       training_args.resume_from_checkpoint)
    check_prune_method(model_args.prune_criterion, sparsity_config)


def train_recipe_model(
    prog: str,
    trainer_class: type,
    *,
    model: torch.nn.Module,
    model_args: Any,
    sparsity_config: Any,
    training_args: Any,
    train_dataset: Any,
    eval_dataset: Any,
    data_collator: Any,
    processing_class: Any,
    compute_metrics: Any = None,
    count_label_tokens: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Prune (--prune_criterion), train and save `model`; returns the trainer and `train_and_save`'s
    result blocks, whose "sparsity_config" block also records the dense warm-up and the prune.

    --prune_criterion: a one-shot prune of the pretrained model (`prune_pretrained`, calibrated on the
    first training examples), which is then fine-tuned; a refusal exits with `prog: error: ...` before
    anything is written. On CPU, --keep_freed_memory (`nm_hf.keep_freed_memory`) is applied first and
    recorded in the "train" block. The trainer is `with_token_throughput(trainer_class, count_label_tokens)`;
    with --dense_warmup_fraction it starts dense and switches to --method (`attach_dense_warmup`); resumed
    from a checkpoint saved after the switch, it starts with --method (`starting_config`).
    """
    fraction = model_args.dense_warmup_fraction
    resumed_at = resumed_step(training_args.resume_from_checkpoint)  # which side of the warm-up's switch
    kept = model_args.keep_freed_memory and training_args.device.type == "cpu" and keep_freed_memory()
    if kept:
        logger.info("keeping freed memory in the process (glibc: no mmap for large blocks, no trimming); "
                    "--keep_freed_memory false to turn it off")
    with user_errors(prog):  # --prune_criterion: one-shot prune of the pretrained model, then fine-tune it
        prune_record = prune_pretrained(
            model, sparsity_config, model_args.prune_criterion, train_dataset=train_dataset,
            collator=data_collator, calibration_samples=model_args.calibration_samples,
            training_args=training_args)
    trainer = with_token_throughput(trainer_class, count_label_tokens=count_label_tokens)(
        model=model, args=training_args,
        sparsity_config=starting_config(fraction, sparsity_config, training_args.max_steps, resumed_at),
        train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=data_collator,
        processing_class=processing_class, compute_metrics=compute_metrics)
    warmup = attach_dense_warmup(trainer, fraction, sparsity_config, training_args.max_steps, resumed_at)
    blocks = train_and_save(trainer, training_args, sparsity_config)
    if warmup is not None:  # --dense_warmup_fraction: dense until the switch, then --method
        blocks["sparsity_config"]["dense_warmup"] = {"fraction": fraction, **warmup.summary()}
    if prune_record is not None:
        blocks["sparsity_config"]["prune"] = prune_record
    blocks["train"]["keep_freed_memory"] = kept
    return trainer, blocks
