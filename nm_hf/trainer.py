"""`SparseTrainer` / `SparseSeq2SeqTrainer`: N:M sparse training with the stock Hugging Face Trainer.

Everything a `Trainer` user relies on keeps working (report_to, gradient accumulation, checkpoints and
`resume_from_checkpoint`, `predict_with_generate`, multi-process runs through accelerate). On top:

- `sparsity_config=`: the model is sparsified in place if it is not already (an already sparse model
  with a *different* config is an error);
- mask metrics (`sparsity/sad`, `sparsity/sad_rate`, `sparsity/sad_from_init`, `sparsity/flip_rate`,
  `sparsity/pruned_weight_norm`, `sparsity/sparsity`, ...) added to every *training* log, through
  `Trainer.log`, so every reporting integration sees them (eval logs and the final train summary are
  left alone: their step already has a training log, or the numbers would be a duplicate);
- `output_dir/sparsity_history.json` (per-layer values) and `output_dir/sparsity.png`, written at the
  end of training and at every save (checkpoint directories too), on the main process only;
- SR-STE decay placement: "gradient" decay is scaled by 1/(micro-batches per optimizer step) so it is
  applied once per update; "decoupled" decay is applied after each optimizer step with the current lr;
- `save_model(dir)` (called by you, or by `push_to_hub`) writes weights with the masks baked in and a
  "finalized" sparsity record, loadable by plain transformers, without touching the live model;
  checkpoints keep the dense weights plus `sparsity_tracker.pt`, so resuming is exact.

The metric logic lives in `nm_hf.tracker.SparsityTracker`; this module only wires it into the Trainer.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from .config import SparsityConfig
from .injection import (
    SparsifyError,
    after_optimizer_step,
    baked_weights,
    current_record,
    is_sparsified,
    iter_sparse_layers,
    measured_sparsity,
    sparsify,
    sparsity_config_of,
)
from .plot import PLOT_FILE
from .record import CONFIG_KEY, config_from_record
from .tracker import HISTORY_FILE, TRACKER_STATE_FILE, SparsityTracker

__all__ = ["SparseTrainer", "SparseSeq2SeqTrainer", "prepare_sparse_model", "HISTORY_FILE", "PLOT_FILE",
           "TRACKER_STATE_FILE"]

logger = logging.getLogger(__name__)

# config fields that must agree between a sparse model and a `sparsity_config` passed with it
_COMPARED_FIELDS = ("n", "m", "method", "decay", "decay_mode", "target_modules", "exclude_modules")


def _as_config(config: SparsityConfig | dict[str, Any] | None) -> SparsityConfig | None:
    if config is None or isinstance(config, SparsityConfig):
        return config
    if isinstance(config, dict):
        return SparsityConfig.from_dict(config)
    raise TypeError(f"sparsity_config must be a SparsityConfig, a dict or None, got {type(config).__name__}")


def prepare_sparse_model(model: nn.Module, config: SparsityConfig | dict[str, Any] | None) -> SparsityConfig:
    """Make sure `model` is sparse as `config` asks; returns the config in effect.

    - not sparse, config given: `sparsify(model, config)`;
    - not sparse, no config, but a "training"/"finalized" `nm_sparsity` record in `model.config`
      (a checkpoint or a saved sparse model reloaded with plain transformers): sparsify with that record;
    - already sparse, no config: kept as is;
    - already sparse, config given: it must match the model's (n, m, method, decay, decay_mode,
      target/exclude modules), otherwise `SparsifyError` lists the differences.
    """
    config = _as_config(config)
    if is_sparsified(model):
        existing = sparsity_config_of(model)
        if config is None:
            return existing
        have, want = existing.to_dict(), config.to_dict()
        diffs = [f"{key}: model has {have.get(key)!r}, sparsity_config has {want.get(key)!r}"
                 for key in _COMPARED_FIELDS if have.get(key) != want.get(key)]
        if diffs:
            raise SparsifyError(f"{type(model).__name__} is already sparsified with a different config "
                                "(pass sparsity_config=None to keep it, or start from a dense model):\n  - "
                                + "\n  - ".join(diffs))
        return existing
    if config is None:
        record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
        if not isinstance(record, dict):
            raise SparsifyError(f"{type(model).__name__} has no sparse layers and no sparsity_config was given: "
                                "pass sparsity_config=SparsityConfig(...) or call nm_hf.sparsify(model, config)")
        config = config_from_record(record)
        logger.info("sparsifying %s with the %s record found in its config", type(model).__name__, CONFIG_KEY)
    sparsify(model, config)
    return config


class _SparsityCallback(TrainerCallback):
    """Runs on every rank: decoupled decay and mask-flip counting after each optimizer step."""

    def __init__(self, trainer: _SparseTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._start_tracker()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # per update: clipping, on_pre_optimizer_step, optimizer.step(), HERE, scheduler.step(), ...
        # so `_get_learning_rate()` still returns the lr this optimizer step used.
        trainer = self.trainer
        # (the layers' optimizer step hook already marked the weights updated, fused AdamW included)
        if not trainer.accelerator.optimizer_step_was_skipped:
            after_optimizer_step(trainer.model, trainer._get_learning_rate())
        if trainer.sparsity_tracker is not None:
            trainer.sparsity_tracker.step(mark_updated=False)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._end_tracker()


class _SparseTrainerMixin:
    """Shared by `SparseTrainer` and `SparseSeq2SeqTrainer` (see the module docstring)."""

    sparsity_tracker: SparsityTracker | None

    def __init__(self, *args: Any, sparsity_config: SparsityConfig | dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self._nm_config_arg = _as_config(sparsity_config)
        self.sparsity_config: SparsityConfig | None = None
        self.sparsity_tracker = None
        self._nm_resume_dir: str | None = None
        self._nm_decay_scale: float | None = None
        self._nm_bake = False
        self._nm_layers: list = []
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:
            self.sparsity_config = prepare_sparse_model(model, self._nm_config_arg)
        super().__init__(*args, **kwargs)
        self._check_supported()
        self.add_callback(_SparsityCallback(self))

    def _check_supported(self) -> None:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if getattr(self, "is_fsdp_enabled", False) or is_deepspeed_zero3_enabled():
            raise NotImplementedError(
                f"{type(self).__name__} does not support sharded parameters (FSDP / DeepSpeed ZeRO-3): N:M masks "
                "and the sparsity tracker need whole weight matrices; use DDP (accelerate --multi_gpu) or ZeRO-1/2")

    # ------------------------------------------------------------------ model set-up

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        self.sparsity_config = prepare_sparse_model(model, self._nm_config_arg)
        self._nm_decay_scale = None  # a new model: its layers still have the default scale
        return model

    def _set_decay_scale(self, scale: float) -> None:
        """Gradient-mode decay is added in every micro-batch's backward: scale it so one update gets it once."""
        if scale != self._nm_decay_scale:
            for _, layer in iter_sparse_layers(self.model):
                layer.nm_decay_scale = scale
            self._nm_decay_scale = scale

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        # the Trainer averages the data gradient over the micro-batches of one update (fewer in the last
        # update of an epoch when the batches do not divide evenly): scale the decay the same way
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        self._set_decay_scale(1.0 / steps)
        return super().training_step(model, inputs, num_items_in_batch)

    # ------------------------------------------------------------------ training / tracker

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> TrainOutput:
        """`Trainer.train`; on resume the sparsity tracker (history, initial and last-log masks) is restored."""
        resume_dir = resume_from_checkpoint
        if resume_dir is True:
            resume_dir = get_last_checkpoint(self.args.output_dir)  # None: Trainer.train raises the error
        self._nm_resume_dir = resume_dir if isinstance(resume_dir, (str, os.PathLike)) else None
        self._nm_decay_scale = None
        self._set_decay_scale(1.0 / self.args.gradient_accumulation_steps)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _start_tracker(self) -> None:
        layers = [layer for _, layer in iter_sparse_layers(self.model)]
        self._nm_layers = layers
        tracker = SparsityTracker(self.model)
        resume_dir = self._nm_resume_dir
        if resume_dir is not None:
            state_file = os.path.join(resume_dir, TRACKER_STATE_FILE)
            if os.path.isfile(state_file):
                tracker.load_state(state_file)
            else:
                logger.warning("%s has no %s: the sparsity history restarts at step %d with the current masks "
                               "as the initial ones", resume_dir, TRACKER_STATE_FILE, self.state.global_step)
        self.sparsity_tracker = tracker

    def _end_tracker(self) -> None:
        tracker = self.sparsity_tracker
        if tracker is None:
            return
        if tracker.steps_since_log:  # close the last window so the history ends at the final step
            tracker.log_metrics(self.state.global_step)
        self.save_sparsity_history(self.args.output_dir)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mask metrics to training logs (those with a "loss"), then log as usual."""
        if self.sparsity_tracker is not None and self.is_in_train and "loss" in logs:
            logs.update(self.sparsity_tracker.log_metrics(self.state.global_step))
        super().log(logs, start_time)

    def sparsity_summary(self) -> dict[str, Any]:
        """Final SAD totals for a results table (see `SparsityTracker.summary`).

        Before any training it describes the current masks (SAD 0 by definition).
        """
        tracker = self.sparsity_tracker or SparsityTracker(self.model)
        return tracker.summary()

    def save_sparsity_history(self, *output_dirs: str | os.PathLike) -> None:
        """Write `sparsity_history.json` and `sparsity.png` into each directory (main process only).

        The plot is drawn once and copied. Without matplotlib only the JSON is written (with a warning).
        """
        if self.sparsity_tracker is None or not self.args.should_save or not output_dirs:
            return
        tracker = self.sparsity_tracker
        for directory in output_dirs:
            tracker.save(os.path.join(directory, HISTORY_FILE))
        try:
            from .plot import MatplotlibMissing, plot_histories  # imports matplotlib only when called
        except ImportError:  # pragma: no cover - plot.py itself has no hard dependency
            return
        first = os.path.join(output_dirs[0], PLOT_FILE)
        try:
            plot_histories([(tracker.method, tracker.history_document())], first,
                           title=f"{tracker.pattern} {tracker.method}")
        except MatplotlibMissing as err:
            logger.warning("%s; wrote %s only", err, HISTORY_FILE)
            return
        for directory in output_dirs[1:]:
            if os.path.abspath(directory) != os.path.abspath(output_dirs[0]):
                shutil.copyfile(first, os.path.join(directory, PLOT_FILE))

    # ------------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Your call (or `push_to_hub`'s): masks baked in, "finalized" record. Checkpoints: dense + tracker state.

        The live model is not modified either way, so training can continue after a save.
        """
        checkpoint = _internal_call and output_dir is not None  # `_save_checkpoint` passes its folder
        if not is_sparsified(self.model):
            super().save_model(output_dir, _internal_call)
            return
        self._nm_bake = not checkpoint
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._nm_bake = False
        target = output_dir if output_dir is not None else self.args.output_dir
        if checkpoint and self.sparsity_tracker is not None and self.args.should_save:
            self.sparsity_tracker.save_state(os.path.join(target, TRACKER_STATE_FILE))
            # keep the run directory's history current too (a crashed run still has it)
            self.save_sparsity_history(target, self.args.output_dir)
        else:
            self.save_sparsity_history(target)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._nm_bake or not self.args.should_save:
            return super()._save(output_dir, state_dict=state_dict)
        baked, sparsity = self._baked_state_dict(state_dict)
        with self._finalized_record(sparsity):
            return super()._save(output_dir, state_dict=baked)

    @torch.no_grad()
    def _baked_state_dict(self, state_dict: dict | None) -> tuple[dict, float]:
        """State dict with `weight * mask` for the masked layers, and the measured sparsity of all sparse layers.

        The mask is computed from the dense weight in the state dict, which is exactly what the layers do
        (so a state dict gathered elsewhere, e.g. by DeepSpeed, is baked correctly too).
        """
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if state_dict is None:
            state_dict = model.state_dict()
        baked_layers = baked_weights(model, state_dict)
        return {**state_dict, **baked_layers}, measured_sparsity(list(baked_layers.values()))

    @contextmanager
    def _finalized_record(self, sparsity: float):
        """Temporarily give `model.config` the "finalized" record `nm_hf.finalize` would write."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        config = getattr(model, "config", None)
        record = getattr(config, CONFIG_KEY, None)
        if config is None or not isinstance(record, dict):
            yield
            return
        targeted = [name for name, _ in iter_sparse_layers(model)]
        setattr(config, CONFIG_KEY, current_record(model, sparsity_config_of(model), targeted, "finalized",
                                                   sparsity=sparsity))
        try:
            yield
        finally:
            setattr(config, CONFIG_KEY, record)


class SparseTrainer(_SparseTrainerMixin, Trainer):
    """`transformers.Trainer` for N:M sparse training; extra argument `sparsity_config=`.

    See `nm_hf.trainer` for what it adds (metrics, history/plot files, decay handling, saving).
    """


class SparseSeq2SeqTrainer(_SparseTrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` (predict_with_generate, ...) for N:M sparse training."""
