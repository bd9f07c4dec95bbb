"""Trainer mixins of the recipes: training-token throughput and exact, in-order evaluation.

`with_token_throughput(SparseSeq2SeqTrainer, count_label_tokens=True)` is the recipes' trainer class.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["ExactEvalMixin", "TokenThroughputMixin", "batch_token_count", "with_token_throughput"]


class TokenThroughputMixin:
    """Counts the non-pad tokens each training step consumes, and the time spent in `evaluate`.

    Tokens: `attention_mask` ones (or all `input_ids`), plus target tokens (`labels != -100`) when
    `count_label_tokens` is true (seq2seq: target tokens are not in `input_ids`).
    """

    count_label_tokens: bool = False

    def _throughput_state(self) -> dict[str, float]:
        state = self.__dict__.get("_nm_throughput")
        if state is None:
            state = {"tokens": 0, "eval_seconds": 0.0, "in_train": False}
            self.__dict__["_nm_throughput"] = state
        return state

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
        state = self._throughput_state()
        state["tokens"] += batch_token_count(inputs, self.count_label_tokens)
        return super().training_step(model, inputs, num_items_in_batch)

    def train(self, *args, **kwargs):  # type: ignore[override]
        state = self._throughput_state()
        state["in_train"] = True
        try:
            return super().train(*args, **kwargs)
        finally:
            state["in_train"] = False

    def evaluate(self, *args, **kwargs):  # type: ignore[override]
        state = self._throughput_state()
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if state["in_train"]:
                state["eval_seconds"] += time.perf_counter() - start

    def throughput(self, train_runtime: float) -> dict[str, float]:
        """Totals over all processes (every rank must call this: it is a collective)."""
        state = self._throughput_state()
        local = torch.tensor([float(state["tokens"])], device=self.args.device)
        total = float(self.accelerator.reduce(local, reduction="sum").item())
        train_only = max(train_runtime - state["eval_seconds"], 1e-9)
        return {
            "train_tokens": int(total),
            "train_eval_seconds": round(state["eval_seconds"], 3),
            "tokens_per_second": total / train_only,
        }


def batch_token_count(inputs: Mapping[str, Any], count_label_tokens: bool) -> int:
    """Non-pad input tokens of a batch, plus its target tokens when `count_label_tokens`."""
    count = 0
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        count += int(mask.sum())
    elif isinstance(inputs.get("input_ids"), torch.Tensor):
        count += inputs["input_ids"].numel()
    labels = inputs.get("labels")
    if count_label_tokens and isinstance(labels, torch.Tensor):
        count += int((labels != -100).sum())
    return count


class ExactEvalMixin:
    """Evaluate each example exactly once, in dataset order, also in multi-process runs.

    - Order: with `--train_sampling_strategy group_by_length`, `Trainer` also length-groups the
      *evaluation* sampler, so predictions come back shuffled and a metric that matches them to the
      references by position (BLEU, a predictions file) scores the wrong pairs. Evaluation here always
      uses the dataset order (a sequential sampler, sharded by accelerate across processes).
    - Duplicates: a distributed sampler pads the last round of batches with examples from the start so
      every rank gets a full batch. `Trainer` drops those copies (`gather_for_metrics`), but
      `Seq2SeqTrainer.evaluate/predict` switch to a plain `gather` that keeps them, so with 2 processes
      BLEU and the loss would count some sentences twice. Restore `gather_for_metrics` for the loop.
    """

    def _get_eval_sampler(self, eval_dataset):  # type: ignore[override]
        if eval_dataset is None or not hasattr(eval_dataset, "__len__"):
            return None
        return torch.utils.data.SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def evaluation_loop(self, *args, **kwargs):  # type: ignore[override]
        self.gather_function = functools.partial(self.accelerator.gather_for_metrics,
                                                 use_gather_object=self.args.eval_use_gather_object)
        return super().evaluation_loop(*args, **kwargs)


def with_token_throughput(trainer_cls: type, count_label_tokens: bool = False) -> type:
    """`trainer_cls` with `TokenThroughputMixin` and `ExactEvalMixin` mixed in."""
    return type(f"Recipe{trainer_cls.__name__}", (TokenThroughputMixin, ExactEvalMixin, trainer_cls),
                {"count_label_tokens": count_label_tokens})
