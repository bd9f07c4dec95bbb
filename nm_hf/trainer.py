"""`SparseTrainer` / `SparseSeq2SeqTrainer` / `SparseTrainerMixin`: N:M sparse training with Hugging Face Trainers.

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
- decay placement: "gradient" decay is scaled by 1/(micro-batches per optimizer step) so it is
  applied once per update; each method's after-step hook (`nm_hf.after_optimizer_step`, e.g. SR-STE's
  decoupled decay) runs after each optimizer step with the current lr;
- `save_model(dir)` (called by you, or by `push_to_hub`) writes weights with the masks baked in and a
  "finalized" sparsity record, loadable by plain transformers, without touching the live model. It is
  staged and moved into `dir` file by file, so a crash never leaves a truncated model where one was;
- checkpoints keep the dense weights, in the model's own layout (fused MoE experts stay fused: the
  Trainer loads checkpoints unconverted), plus `sparsity_tracker.pt` and `sparse_training_state.pt` (the
  layers' step counter, method state such as S-STE's scale or STEP's phase, masks in use with
  `mask_update_interval > 1`), so resuming is exact. A resume is refused when the checkpoint was
  trained with another sparsity config; `resume_from_checkpoint=True` skips half-written checkpoints
  (a run killed while saving);
- a first-step check: a sparse layer whose weight got a gradient in the first optimizer step without being
  called (its model reads the weight directly, so the mask never applies there) is named in a warning;
- a method that needs its own optimizer (`method="step"`: `nm_hf.optim.StepAdamW`) gets it built from
  the TrainingArguments (lr, Adam betas and epsilon, weight decay groups, max_steps).

`SparseTrainerMixin` carries all of it, so any `Trainer` subclass gets it by listing the mixin first:
`class MyTrainer(SparseTrainerMixin, SomeTrainer)`. The metric logic lives in
`nm_hf.tracker.SparsityTracker`; this module only wires it into the Trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Seq2SeqTrainer, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from ._files import atomic_write, staged_files
from .config import SparsityConfig
from .injection import (
    SparsifyError,
    after_optimizer_step,
    baked_weights,
    current_record,
    is_sparsified,
    iter_sparse_layers,
    load_sparse_training_state,
    measured_sparsity,
    set_training_step,
    sparse_training_state,
    sparsify,
    sparsity_config_of,
    unwrap_model,
)
from .layers import SparseLayerMixin
from .layers.reads import weight_readers
from .methods import get_method
from .plot import PLOT_FILE
from .record import CONFIG_KEY, STATE_FINALIZED, config_from_record, read_record, write_record
from .save_warning import dense_save_intended
from .tracker import HISTORY_FILE, TRACKER_STATE_FILE, SparsityTracker

__all__ = ["SparseTrainer", "SparseSeq2SeqTrainer", "SparseTrainerMixin", "prepare_sparse_model",
           "last_complete_checkpoint", "saved_steps", "ResumeError", "HISTORY_FILE", "PLOT_FILE", "TRACKER_STATE_FILE",
           "SPARSE_STATE_FILE", "create_sparse_optimizer"]

logger = logging.getLogger(__name__)

#: what the refusals of a frozen (PEFT) base tell the user to do instead
_LORA_ON_NM = ("for LoRA on an N:M model use the plain trainer on a base from nm_hf.load_sparse or nm_hf.prune, "
               "with nm_hf.peft.preserve_sparsity (docs/pretrained.md)")

#: what `Trainer._save_checkpoint` writes last: its presence marks a checkpoint that was saved completely
TRAINER_STATE_NAME = "trainer_state.json"
#: model weight files a checkpoint may hold (one is enough)
_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
                 ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)
#: weight files of a previous save that a new save_model must not leave behind (a single file vs shards)
_WEIGHT_FILE_PATTERN = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")
_CHECKPOINT_PATTERN = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
#: `nm_hf.sparse_training_state(model)` in each checkpoint (step counter, method state, periodic masks)
SPARSE_STATE_FILE = "sparse_training_state.pt"


class ResumeError(ValueError):
    """A checkpoint `train(resume_from_checkpoint=...)` refuses (nothing was loaded)."""


def _as_config(config: SparsityConfig | dict[str, Any] | None) -> SparsityConfig | None:
    if config is None or isinstance(config, SparsityConfig):
        return config
    if isinstance(config, dict):
        return SparsityConfig.from_dict(config)
    raise TypeError(f"sparsity_config must be a SparsityConfig, a dict or None, got {type(config).__name__}")


def _differences(have: SparsityConfig, want: SparsityConfig, have_name: str, want_name: str) -> list[str]:
    """`field: HAVE_NAME has x, WANT_NAME has y` for every differing `SparsityConfig` field (method_args too)."""
    a, b = have.to_dict(), want.to_dict()
    return [f"{key}: {have_name} has {a.get(key)!r}, {want_name} has {b.get(key)!r}"
            for key in a if a.get(key) != b.get(key)]


def prepare_sparse_model(model: nn.Module, config: SparsityConfig | dict[str, Any] | None) -> SparsityConfig:
    """Make sure `model` is sparse as `config` asks; returns the config in effect.

    - not sparse, config given: `sparsify(model, config)`;
    - not sparse, no config, but an `nm_sparsity` record in `model.config` (a checkpoint or a saved
      sparse model reloaded with plain transformers): sparsify with that record;
    - already sparse, no config: kept as is;
    - already sparse, config given: every `SparsityConfig` field (method_args included) must match
      the model's, otherwise `SparsifyError` lists the differences.
    """
    config = _as_config(config)
    if is_sparsified(model):
        existing = sparsity_config_of(model)
        if config is None:
            return existing
        wanted = config
        if read_record(unwrap_model(model)) is None:
            # no record (a bare nn.Module): the settings come from the layers, which know neither the
            # selectors nor a decay their method ignores
            wanted = dataclasses.replace(config, target_modules=existing.target_modules,
                                         exclude_modules=existing.exclude_modules, decay=config.effective_decay)
        diffs = _differences(existing, wanted, "model", "sparsity_config")
        if diffs:
            raise SparsifyError(f"{type(model).__name__} is already sparsified with a different config "
                                "(pass sparsity_config=None to keep it, or start from a dense model):\n  - "
                                + "\n  - ".join(diffs))
        return existing
    if config is None:
        record = read_record(model) if getattr(model, "config", None) is not None else None
        if record is None:
            raise SparsifyError(f"{type(model).__name__} has no sparse layers and no sparsity_config was given: "
                                "pass sparsity_config=SparsityConfig(...) or call nm_hf.sparsify(model, config)")
        config = config_from_record(record)
        logger.info("sparsifying %s with the %s record found in its config", type(model).__name__, CONFIG_KEY)
    sparsify(model, config)
    return config


def create_sparse_optimizer(model: nn.Module, params: Any = None, *, lr: float = 1e-3,
                            betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                            total_steps: int | None = None) -> torch.optim.Optimizer:
    """The optimizer a sparsified `model` trains with: its method's own, else `torch.optim.AdamW`.

    For `method="step"` that is `nm_hf.optim.StepAdamW`, wired to the model's sparse layers (AutoSwitch
    watches their weights and tells them when the mask phase starts); it needs `total_steps`, the
    optimizer steps of the whole run, which its switch is clipped to (10%-50% by default). `params`
    (parameters or groups) defaults to `model.parameters()`. A plain loop calls
    `nm_hf.after_optimizer_step(model, lr)` after each `optimizer.step()` as with any optimizer.
    """
    layers = [layer for _, layer in iter_sparse_layers(model)]
    if not layers:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no sparse layers (call nm_hf.sparsify first)")
    params = model.parameters() if params is None else params
    method = layers[0].method
    optimizer_class = method.optimizer_class
    if optimizer_class is None:
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if total_steps is None:
        raise ValueError(f"create_sparse_optimizer: method {method.name!r} needs total_steps (the optimizer steps of "
                         "the run, which its phase switch is clipped to)")
    return optimizer_class(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, total_steps=total_steps,
                           **method.optimizer_kwargs(layers))


def _method_optimizer_class(config: SparsityConfig | None) -> type | None:
    """The optimizer class the config's method asks for (None: any optimizer will do)."""
    return None if config is None else get_method(config.method).optimizer_class


def _intended_config(model: nn.Module | None, config: SparsityConfig | None) -> SparsityConfig | None:
    """The config `prepare_sparse_model(model, config)` will use, without touching the model (None if unknown)."""
    if config is not None or model is None:
        return config
    if is_sparsified(model):
        return sparsity_config_of(model)
    record = read_record(model) if getattr(model, "config", None) is not None else None
    return config_from_record(record) if record is not None else None


# --------------------------------------------------------------------------- checkpoints


def _incomplete_reason(checkpoint: str | os.PathLike) -> str | None:
    """Why `checkpoint` is not a complete Trainer checkpoint (None: it is)."""
    path = Path(checkpoint)
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        return "no model weights"
    state = path / TRAINER_STATE_NAME
    if not state.is_file():
        return f"no {TRAINER_STATE_NAME}"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"unreadable {TRAINER_STATE_NAME}"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that was saved completely; None if there is none.

    A run killed while saving leaves a `checkpoint-N` without weights or without `trainer_state.json`
    (the Trainer writes it last); such folders are skipped with a warning naming them.
    """
    if not os.path.isdir(output_dir):
        return None
    found = []
    for entry in os.scandir(output_dir):
        match = _CHECKPOINT_PATTERN.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry.path))
    for _, path in sorted(found, reverse=True):
        reason = _incomplete_reason(path)
        if reason is None:
            return path
        logger.warning("skipping %s: an incomplete checkpoint (%s; a run stopped while saving it?)", path, reason)
    return None


def saved_steps(checkpoint: str | os.PathLike) -> tuple[int, int] | None:
    """(global_step, max_steps) of a Trainer checkpoint, from its trainer_state.json; None without a readable one."""
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        return int(state.get("global_step", 0)), int(state.get("max_steps", 0))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError):
        return None


def _is_weight_file(name: str) -> bool:
    return _WEIGHT_FILE_PATTERN.fullmatch(name) is not None


# --------------------------------------------------------------------------- Trainer wiring


class _DirectReadCheck:
    """Which sparse layers' weights got a gradient although the layer never ran: their model reads `layer.weight`
    without calling the layer (a linear used as a lookup table, `layer.weight.t()[ids]`, undeclared to
    transformers and outside what `sparsify` finds in the modules' source), so the mask applied in the layer's
    forward never reaches that computation. A read under `torch.no_grad()` leaves no gradient and is not seen.
    Layers whose reads `sparsify` found are left out: their readers see the masked weight (`nm_hf.layers.reads`).

    A forward pre-hook on each sparse module layer (expert weights are not modules: their experts module always
    passes the masked weight) marks the layer as run and removes itself on its first call with gradients on.
    A layer that neither ran nor got a gradient (an expert linear no token reached) is not reported.
    """

    def __init__(self, model: nn.Module) -> None:
        exposed = {id(layer) for _, _, layers in weight_readers(unwrap_model(model)) for layer in layers}
        self.layers = {name: layer for name, layer in iter_sparse_layers(model)
                       if isinstance(layer, nn.Module) and id(layer) not in exposed}
        self.called: set[str] = set()
        self._handles = {name: layer.register_forward_pre_hook(functools.partial(self._mark, name))
                         for name, layer in self.layers.items()}

    def _mark(self, name: str, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():  # an evaluation forward (eval_on_start) cannot explain a gradient
            self.called.add(name)
            handle = self._handles.pop(name, None)
            if handle is not None:
                handle.remove()

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

    def uncalled_with_gradient(self, called: set[str]) -> list[str]:
        """Names of the layers not in `called` whose weight holds a non-zero gradient (a weight shared with a
        layer that ran is not theirs to explain)."""
        ran = {id(self.layers[name].weight) for name in called if name in self.layers}
        return [name for name, layer in self.layers.items()
                if name not in called and id(layer.weight) not in ran
                and layer.weight.grad is not None and bool(layer.weight.grad.any())]


class _SparsityCallback(TrainerCallback):
    """Runs on every rank: method after-step hooks and mask-flip counting after each optimizer step."""

    def __init__(self, trainer: SparseTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._start_tracker()
        self.trainer._start_direct_read_check()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # after every micro-batch's backward of the first update, before optimizer.step() and zero_grad
        if self.trainer._nm_read_check is not None:
            self.trainer._finish_direct_read_check()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # per update: clipping, on_pre_optimizer_step, optimizer.step(), HERE, scheduler.step(), ...
        # so `_get_learning_rate()` still returns the lr this optimizer step used.
        trainer = self.trainer
        if not trainer.accelerator.optimizer_step_was_skipped:
            after_optimizer_step(trainer.model, trainer._get_learning_rate())
        if trainer.sparsity_tracker is not None:
            # the layers' mask cache already knows an optimizer step happened (fused AdamW included); deferred:
            # the next forward counts the flips while it re-chooses each mask (one pass over the weights)
            trainer.sparsity_tracker.step(mark_updated=False, defer=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._stop_direct_read_check()
        self.trainer._end_tracker()


class SparseTrainerMixin:
    """N:M sparse training for any `transformers.Trainer` subclass: list it first in the bases.

        class MySparseTrainer(SparseTrainerMixin, MyTrainer): ...
        trainer = MySparseTrainer(model=model, args=args, ..., sparsity_config=SparsityConfig())

    It adds the `sparsity_config=` argument and everything `SparseTrainer` does (see the module
    docstring): sparsification, mask metrics in the logs, history/plot files, decay handling, baked
    `save_model`, exact resume. Attributes: `sparsity_config` (the config in effect) and
    `sparsity_tracker` (the `SparsityTracker` of the current `train()` call, None before).
    """

    sparsity_tracker: SparsityTracker | None
    sparsity_config: SparsityConfig | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(SparseTrainerMixin):
            base = next((b.__name__ for b in cls.__bases__ if issubclass(b, Trainer)), "Trainer")
            raise TypeError(f"{cls.__name__}: list SparseTrainerMixin before the Trainer class in its bases: "
                            f"class {cls.__name__}(SparseTrainerMixin, {base})")

    def __init__(self, *args: Any, sparsity_config: SparsityConfig | dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        if kwargs.get("peft_config") is not None:
            # TRL would wrap the sparsified model in LoRA after this sparsifies it: the frozen base trains no mask
            # (metrics stay 0) and save_model writes the adapter alone, not the masked base it was trained against
            raise ValueError(
                f"{type(self).__name__}: peft_config is not supported (the base weights would be frozen: no mask "
                f"to train, and the masked base would not be saved); {_LORA_ON_NM}")
        self._nm_config_arg = _as_config(sparsity_config)
        self.sparsity_config = None
        self.sparsity_tracker = None
        self._nm_resume_dir: str | None = None
        self._nm_tracker_state: dict[str, Any] | None = None
        self._nm_sparse_state: dict[str, Any] | None = None
        self._nm_layers: list[SparseLayerMixin] | None = None  # the model's sparse layers (`_nm_sparse_layers`)
        self._nm_decay_in_use: tuple[int, bool] | None = None  # (global step, answer) of `_nm_gradient_decay_in_use`
        self._nm_bake = False
        self._nm_read_check: _DirectReadCheck | None = None  # until the first optimizer step of a train() call
        model = kwargs.get("model", args[0] if args else None)
        optimizer = (kwargs.get("optimizers") or (None, None))[0]
        optimizer_cls = (kwargs.get("optimizer_cls_and_kwargs") or (None, None))[0]
        self._check_optimizer(_intended_config(model, self._nm_config_arg), optimizer, optimizer_cls)
        self._check_not_sharded_at_load(model)  # before sparsify changes the model in place
        if isinstance(model, nn.Module):
            self.sparsity_config = prepare_sparse_model(model, self._nm_config_arg)
        super().__init__(*args, **kwargs)
        if model is not None and not isinstance(model, nn.Module):
            # trainers such as TRL's accept a model id or path and load it in their __init__
            self.sparsity_config = prepare_sparse_model(self.model, self._nm_config_arg)
        self._check_supported()
        self.add_callback(_SparsityCallback(self))

    def _check_some_sparse_weight_trains(self) -> None:
        """Refuse to train when every sparse layer's weight is frozen (a PEFT model: LoRA froze the base):
        no mask would move, the mask metrics would stay 0, and `save_model` would write what PEFT saves (the
        adapter), not the masked base the adapter was trained against."""
        layers = self._nm_sparse_layers()
        if layers and not any(layer.weight.requires_grad for layer in layers):
            raise ValueError(
                f"{type(self).__name__}: every sparse layer's weight is frozen (requires_grad=False; a PEFT model?), "
                f"so no N:M weight would train; {_LORA_ON_NM}")

    def _check_not_sharded_at_load(self, model: Any) -> None:
        """Refuse a model `from_pretrained(distributed_config=...)` sharded at load time (FSDP2 / TP / PP / EP).

        Such a model trains, but `save_model` cannot bake it: the masks cannot be chosen from the sharded
        (DTensor) state dict, and transformers' save gathers the model's own dense weights whatever state
        dict it is given (`gather_full_state_dict`), so the saved file would not be the N:M model.
        """
        if getattr(model, "is_distributed_loading_by_transformers", False):
            raise NotImplementedError(
                f"{type(self).__name__} does not support a model sharded at load time (from_pretrained("
                "distributed_config=...)): its save_model cannot write the baked N:M weights of such a model; load "
                "it without distributed_config and use DDP (accelerate launch --multi_gpu), or train with torch's "
                "fully_shard in your own loop as docs/distributed.md shows")

    def _check_supported(self) -> None:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        self._check_not_sharded_at_load(self.model)
        if getattr(self, "is_fsdp_enabled", False):
            # FSDP2 below the Trainer is tested (torch's fully_shard + nm_hf); this Trainer path is not: accelerate
            # and transformers build FSDP only on GPUs (on CPU they build DDP), so it has never run here
            raise NotImplementedError(
                f"{type(self).__name__} with FSDP (accelerate's FSDP plugin / --fsdp) is not supported: that path is "
                "untested (transformers builds FSDP only on GPUs); use DDP (accelerate launch --multi_gpu), or train "
                "with torch's fully_shard in your own loop as docs/distributed.md shows")
        if is_deepspeed_zero3_enabled():
            raise NotImplementedError(
                f"{type(self).__name__} does not support DeepSpeed ZeRO-3 (sharded parameters outside DTensor, "
                "untested); use DDP (accelerate launch --multi_gpu)")
        optimizer_cls = (self.optimizer_cls_and_kwargs or (None, None))[0]
        self._check_optimizer(self.sparsity_config, self.optimizer, optimizer_cls)

    @staticmethod
    def _check_optimizer(config: SparsityConfig | None, optimizer: Any, optimizer_cls: Any) -> None:
        """A method with its own optimizer (STEP) refuses another one passed to the Trainer."""
        wanted = _method_optimizer_class(config)
        if wanted is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        if optimizer_cls is not None or (optimizer is not None and not isinstance(inner, wanted)):
            given = (f"optimizers=({type(inner).__name__}, ...)" if optimizer is not None
                     else f"optimizer_cls_and_kwargs=({getattr(optimizer_cls, '__name__', optimizer_cls)}, ...)")
            raise ValueError(f"method {config.method!r} trains with {wanted.__module__}.{wanted.__name__} wired to the "
                             f"sparse layers (it decides when the mask phase starts), got {given}; leave both unset, "
                             "or pass optimizers=(nm_hf.create_sparse_optimizer(model, ...), None)")

    # ------------------------------------------------------------------ model set-up

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """`Trainer.create_optimizer`, with the method's own optimizer class when it has one (STEP's StepAdamW).

        The parameter groups (weight decay or not) are the Trainer's; lr, Adam betas and epsilon come
        from the TrainingArguments, `total_steps` is the run's max_steps.
        """
        wanted = _method_optimizer_class(self.sparsity_config)
        if wanted is None or self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            return super().create_optimizer(model)
        if "adamw" not in str(getattr(self.args.optim, "value", self.args.optim)):
            logger.warning("method %r trains with %s (AdamW); --optim %s is not used", self.sparsity_config.method,
                           wanted.__name__, getattr(self.args.optim, "value", self.args.optim))
        layers = [layer for _, layer in iter_sparse_layers(self.model)]
        method = get_method(self.sparsity_config.method)
        kwargs = {"lr": self.args.learning_rate, "betas": (self.args.adam_beta1, self.args.adam_beta2),
                  "eps": self.args.adam_epsilon, "total_steps": self.state.max_steps or self.args.max_steps,
                  **method.optimizer_kwargs(layers)}
        self.optimizer_cls_and_kwargs = (wanted, kwargs)
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = None

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        self.sparsity_config = prepare_sparse_model(model, self._nm_config_arg)
        self._nm_forget_layers()  # a new model: its layers are found again
        return model

    def _nm_forget_layers(self) -> None:
        """Drop what was cached about the model's layers (a new model, a new `train()` call)."""
        self._nm_layers = None
        self._nm_decay_in_use = None

    def _nm_sparse_layers(self) -> list[SparseLayerMixin]:
        """The model's sparse layers, found once per model and `train()` call (wrapping keeps the layer objects)."""
        if self._nm_layers is None:
            self._nm_layers = [layer for _, layer in iter_sparse_layers(self.model)]
        return self._nm_layers

    def _set_decay_scale(self, scale: float) -> None:
        """Gradient-mode decay is added in every micro-batch's backward: scale it so one update gets it once.

        Checked on the layers themselves, not remembered: a layer re-sparsified mid-run (the dense warm-up's
        switch: `finalize` then `sparsify`) starts again at scale 1.
        """
        for layer in self._nm_sparse_layers():
            if layer.nm_decay_scale != scale:
                layer.nm_decay_scale = scale

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        # the Trainer averages the data gradient over the micro-batches of one update (fewer in the last
        # update of an epoch when the batches do not divide evenly): scale the decay the same way
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        self._set_decay_scale(self._nm_loss_scale() / steps)
        return super().training_step(model, inputs, num_items_in_batch)

    def _nm_loss_scale(self) -> float:
        """fp16's loss scale while a gradient-mode decay is in use, else 1.

        The decay is added to the gradient in backward, where the gradient is still multiplied by the
        GradScaler's scale; the unscaling after backward divides the decay too, so it is scaled up here.
        Reading the scale costs one device sync per micro-batch, only in that case.
        """
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled() or not self._nm_gradient_decay_in_use():
            return 1.0
        return float(scaler.get_scale())

    def _nm_gradient_decay_in_use(self) -> bool:
        """True when a sparse layer's method adds a decay to its gradient in backward (`SparsityMethod.gradient_decay`
        non-zero: the methods decide, not the config).

        Asked once per optimizer step, not per micro-batch: a method may follow the layer's step count, which
        moves only between updates. The answer does not depend on the scale being chosen: the layers' current
        `nm_decay_scale` is never 0 (1 / accumulation steps, times a loss scale).
        """
        step = self.state.global_step
        if self._nm_decay_in_use is None or self._nm_decay_in_use[0] != step:
            in_use = any(layer.method.gradient_decay(layer) for layer in self._nm_sparse_layers())
            self._nm_decay_in_use = (step, in_use)
        return self._nm_decay_in_use[1]

    # ------------------------------------------------------------------ training / resume / tracker

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> TrainOutput:
        """`Trainer.train`, with checks on resume and the sparsity tracker restored from the checkpoint.

        `resume_from_checkpoint=True` takes the newest *complete* checkpoint in `output_dir` (half-written
        ones are skipped with a warning). A checkpoint trained with another sparsity config, or whose
        `sparsity_tracker.pt` or `sparse_training_state.pt` is unreadable or describes other layers,
        raises `ResumeError` before anything is loaded. The sparse training state is restored after the
        Trainer has loaded the weights and the optimizer (when training begins).
        """
        self._nm_forget_layers()  # this call's model: its layers are found once, here
        self._check_some_sparse_weight_trains()
        resume_dir: str | None = None
        if resume_from_checkpoint is True:
            resume_dir = last_complete_checkpoint(self.args.output_dir)
            if resume_dir is None:
                raise ResumeError(f"resume_from_checkpoint=True: no complete checkpoint in {self.args.output_dir}")
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            resume_dir = os.fspath(resume_from_checkpoint)
        if resume_dir is not None:
            self._check_not_finished(resume_dir)
        self._nm_tracker_state = self._check_resume(resume_dir) if resume_dir is not None else None
        self._nm_sparse_state = self._read_sparse_state(resume_dir) if resume_dir is not None else None
        self._nm_resume_dir = resume_dir
        self._set_decay_scale(1.0 / self.args.gradient_accumulation_steps)
        try:
            return super().train(resume_from_checkpoint=resume_dir, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:  # the layers leave with the plain decay (a loop of the caller's own may train them next)
            self._stop_direct_read_check()  # a run stopped before its first optimizer step leaves no hooks
            self._set_decay_scale(1.0)
            # kept until here, not dropped when training begins: auto_find_batch_size reruns the loop (and its
            # on_train_begin) after an out-of-memory error, from the same checkpoint
            self._nm_tracker_state = self._nm_sparse_state = None

    def _check_not_finished(self, checkpoint: str) -> None:
        """Refuse a checkpoint saved at the end of training (`max_steps` reached): transformers (5.23) resumed
        mid-epoch trains one step past `max_steps` before it checks, so the "resumed" model would not be the
        checkpoint's or an uninterrupted run's."""
        steps = saved_steps(checkpoint)  # None: the Trainer reports a missing or unreadable state itself
        if self.args.max_steps <= 0 or steps is None:
            return
        step = steps[0]
        if step >= self.args.max_steps:
            raise ResumeError(f"{checkpoint} was saved at step {step}, the end of training (max_steps="
                              f"{self.args.max_steps}): there is nothing left to train, and resuming would train one "
                              "step more; load its weights to evaluate them, or raise max_steps to train on")

    def _check_resume(self, checkpoint: str) -> dict[str, Any] | None:
        """Refuse a checkpoint of another sparsity config; read its tracker state (None when it has none)."""
        if not os.path.isdir(checkpoint):
            return None  # Trainer.train says it cannot find the checkpoint
        config_file = os.path.join(checkpoint, CONFIG_NAME)
        record = None
        if os.path.isfile(config_file):
            try:
                record = read_record(json.loads(Path(config_file).read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ResumeError(f"cannot resume from {checkpoint}: {config_file} is not readable JSON "
                                  f"({err})") from err
        if record is None:
            logger.warning("%s has no %s record in %s: cannot check that it was trained with the same sparsity "
                           "config", checkpoint, CONFIG_KEY, CONFIG_NAME)
        elif self.sparsity_config is not None:
            try:
                saved = config_from_record(record)
            except (TypeError, ValueError) as err:
                raise ResumeError(f"cannot resume from {checkpoint}: the {CONFIG_KEY} record in {config_file} is "
                                  f"not a valid sparsity config ({err})") from err
            diffs = _differences(saved, self.sparsity_config, "checkpoint", "this run")
            targeted = [name for name, _ in iter_sparse_layers(self.model)]
            saved_targets = list(record.get("targeted_modules") or [])
            if targeted and saved_targets != targeted:
                only_saved = [n for n in saved_targets if n not in targeted]
                only_now = [n for n in targeted if n not in saved_targets]
                diffs.append(f"targeted_modules: only the checkpoint has {only_saved[:3]}, only this run has "
                             f"{only_now[:3]}" if only_saved or only_now else "targeted_modules: another order")
            if diffs:
                raise ResumeError(f"cannot resume from {checkpoint}: it was trained with another sparsity config "
                                  f"({'; '.join(diffs)}); resume with the checkpoint's sparsity_config, or start "
                                  "a new run in a new output_dir")
        self._check_checkpoint_layout(checkpoint)
        state_file = os.path.join(checkpoint, TRACKER_STATE_FILE)
        if not os.path.exists(state_file):
            return None
        try:
            return SparsityTracker.read_state(state_file)
        except ValueError as err:
            raise ResumeError(f"cannot resume from {checkpoint}: {err}") from err

    def _check_checkpoint_layout(self, checkpoint: str) -> None:
        """Refuse a checkpoint whose sparse expert weights are saved per expert (transformers' original layout).

        `Trainer._load_from_checkpoint` loads the file with `load_state_dict` unconverted (transformers
        issue #48805): the fused expert Parameters would silently keep this run's initial values.
        SparseTrainer's own checkpoints keep the model's layout; older ones, or a plain Trainer's, do not.
        """
        expected = [name for name, layer in iter_sparse_layers(self.model) if layer.is_parameter_target]
        if not expected:
            return
        index = os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME)
        single = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
        try:
            if os.path.isfile(index):
                keys = set(json.loads(Path(index).read_text(encoding="utf-8")).get("weight_map", {}))
            elif os.path.isfile(single):
                from safetensors import safe_open

                with safe_open(single, framework="pt") as handle:
                    keys = set(handle.keys())
            else:
                return  # another format (FSDP, DeepSpeed, .bin): the Trainer reports what it cannot load
        except Exception as err:  # OSError, JSONDecodeError, SafetensorError, ... from a damaged file
            raise ResumeError(f"cannot resume from {checkpoint}: its weight files are not readable ({err})") from err
        missing = [name for name in expected if name not in keys]
        if missing:
            raise ResumeError(f"cannot resume from {checkpoint}: it stores the expert weights in another layout "
                              f"({missing[0]!r} is not in its files; saved per expert by save_pretrained?), which "
                              "Trainer cannot load on resume (transformers issue #48805); resume from a "
                              "checkpoint written by this SparseTrainer, or start a new run")

    def _read_sparse_state(self, checkpoint: str, doing: str = "resume from") -> dict[str, Any] | None:
        """The checkpoint's `sparse_training_state.pt`, checked to describe this model's sparse layers."""
        path = os.path.join(checkpoint, SPARSE_STATE_FILE)
        if not os.path.isfile(path) or not is_sparsified(self.model):
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # EOFError, RuntimeError, UnpicklingError, ... from a damaged file
            first = str(err).splitlines()[0] if str(err) else "empty or truncated file"
            raise ResumeError(f"cannot {doing} {checkpoint}: {path} is not a readable sparse training state "
                              f"({type(err).__name__}: {first})") from err
        layers = state.get("layers") if isinstance(state, dict) else None
        names = [name for name, _ in iter_sparse_layers(self.model)]
        if not isinstance(layers, dict) or sorted(layers) != sorted(names):
            raise ResumeError(f"cannot {doing} {checkpoint}: {path} is not a sparse training state of this "
                              "model's sparse layers")
        return state

    def _load_best_model(self) -> None:
        """`Trainer._load_best_model` (load_best_model_at_end), then the best checkpoint's sparse training
        state: its step count, method state and the masks in use with `mask_update_interval > 1`, so the
        model in memory, and the model `save_model` bakes, is the one evaluated at that checkpoint."""
        self._close_tracker_window()  # the history ends with the trained model, not the reloaded one
        super()._load_best_model()
        checkpoint = self.state.best_model_checkpoint
        if not is_sparsified(self.model) or not any(map(_is_weight_file, os.listdir(checkpoint))):
            return  # nothing was loaded (transformers warned that it could not locate the best model)
        state = self._read_sparse_state(checkpoint, doing="load the best model from")
        if state is not None:
            self._load_sparse_state(checkpoint, state)
        elif self._needs_sparse_state():
            logger.warning("%s has no %s: the best model's weights are loaded, but the sparse layers keep the "
                           "step count and method state of the end of training", checkpoint, SPARSE_STATE_FILE)

    def _load_sparse_state(self, checkpoint: str, state: dict[str, Any]) -> None:
        """`load_sparse_training_state`, its refusal as a ResumeError naming the checkpoint's file."""
        try:
            load_sparse_training_state(self.model, state)
        except ValueError as err:
            raise ResumeError(f"{os.path.join(checkpoint, SPARSE_STATE_FILE)}: {err}") from err

    def _needs_sparse_state(self) -> bool:
        """True when a layer's behaviour depends on state the weights cannot rebuild (step count, method
        state, periodic masks): a checkpoint without `sparse_training_state.pt` then cannot restore it."""
        return any(layer.method.uses_step or layer.mask_is_periodic or layer.nm_method_state
                   for _, layer in iter_sparse_layers(self.model))

    def _restore_sparse_state(self) -> None:
        """On resume: the layers' step counter, method state and periodic masks, after the weights loaded."""
        resume_dir, state = self._nm_resume_dir, self._nm_sparse_state
        if resume_dir is None or not is_sparsified(self.model):
            return
        if state is not None:
            self._load_sparse_state(resume_dir, state)
            return
        # an older or plain-Trainer checkpoint: the step count is the best guess (skipped fp16 steps aside)
        set_training_step(self.model, self.state.global_step)
        if self._needs_sparse_state():
            logger.warning("%s has no %s: the sparse layers' step counter is set to the global step %d; method state "
                           "and masks in use start afresh, so this resume is not exact", resume_dir,
                           SPARSE_STATE_FILE, self.state.global_step)

    def _start_tracker(self) -> None:
        self._restore_sparse_state()
        self._share_method_state()
        tracker = SparsityTracker(self.model)
        resume_dir, state = self._nm_resume_dir, self._nm_tracker_state
        if state is not None:
            try:
                tracker.load_state_dict(state)
            except ValueError as err:
                raise ResumeError(f"{os.path.join(resume_dir, TRACKER_STATE_FILE)}: {err}") from err
        elif resume_dir is not None:
            logger.warning("%s has no %s: the sparsity history restarts at step %d with the current masks "
                           "as the initial ones", resume_dir, TRACKER_STATE_FILE, self.state.global_step)
        self.sparsity_tracker = tracker

    def _start_direct_read_check(self) -> None:
        """Watch the first optimizer step for weights read without calling their layer (`_DirectReadCheck`).

        Not for a compiled model: adding and removing hooks would recompile it.
        """
        self._stop_direct_read_check()  # auto_find_batch_size's retry begins training again
        if not self.args.torch_compile and not hasattr(self.model, "_orig_mod"):
            self._nm_read_check = _DirectReadCheck(self.model)

    def _stop_direct_read_check(self) -> None:
        if self._nm_read_check is not None:
            self._nm_read_check.remove()
            self._nm_read_check = None

    def _finish_direct_read_check(self) -> None:
        """Warn about each sparse layer whose weight got a gradient in the first optimizer step without being
        called; then the hooks are gone. A warning, not an error: the run itself is sound (it trains that
        weight densely), and the user may mean to finalize otherwise or exclude the layer in the next run."""
        check, self._nm_read_check = self._nm_read_check, None
        check.remove()
        names = check.uncalled_with_gradient(self._called_on_any_rank(check))
        if not self.is_world_process_zero():
            return  # every rank found the same layers (reduced gradients, called on any rank)
        for name in names:
            logger.warning("%s: its weight got a gradient although the layer was never called: the model reads the "
                           "weight without calling the layer, so the N:M mask does not apply there (training uses "
                           "the dense weight, and finalize / save_model will change the model's outputs); leave it "
                           "dense with SparsityConfig(exclude_modules=[%r, ...])", name, name)

    def _called_on_any_rank(self, check: _DirectReadCheck) -> set[str]:
        """The layers that ran on any rank: DDP averages a gradient into ranks where the layer got no input."""
        import torch.distributed as dist

        if self.args.world_size <= 1 or not dist.is_available() or not dist.is_initialized():
            return check.called
        names = list(check.layers)
        flags = torch.tensor([name in check.called for name in names], dtype=torch.int32, device=self.args.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return {name for name, flag in zip(names, flags.tolist(), strict=True) if flag}

    def _share_method_state(self) -> None:
        """Multi-process: every rank takes the main process's method state (S-STE's scale).

        A method state computed at `sparsify` from each rank's own initial weights (a model built from
        a config without the same seed on every rank) would otherwise stay per rank after DDP copied the
        main process's weights to all ranks: the ranks would train different forwards, and the checkpoint
        (rank 0's) would not resume the others. One small broadcast when training begins.
        """
        import torch.distributed as dist

        if self.args.world_size <= 1 or not dist.is_available() or not dist.is_initialized():
            return
        layers = [layer for _, layer in iter_sparse_layers(self.model)]
        if not layers:
            return
        states = [[dict(layer.nm_method_state) for layer in layers]]
        dist.broadcast_object_list(states, src=0)
        for layer, state in zip(layers, states[0], strict=True):
            layer.nm_method_state = layer.method.check_state(layer, state or {})
            layer.forget_eval_weight()

    def _end_tracker(self) -> None:
        if self.sparsity_tracker is None:
            return
        self._close_tracker_window()
        self.save_sparsity_history(self.args.output_dir)

    def _close_tracker_window(self) -> None:
        """Log the steps since the last log, so the history ends at the final step."""
        tracker = self.sparsity_tracker
        if tracker is not None and tracker.steps_since_log:
            tracker.log_metrics(self.state.global_step)

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
        Every file is written atomically with the umask's permissions (`nm_hf._files`).
        """
        if self.sparsity_tracker is None or not self.args.should_save or not output_dirs:
            return
        tracker = self.sparsity_tracker
        for directory in output_dirs:
            tracker.save(os.path.join(directory, HISTORY_FILE))
        from .plot import MatplotlibMissing, plot_histories  # imports matplotlib only when called

        first = os.path.join(output_dirs[0], PLOT_FILE)
        try:
            plot_histories([(tracker.method, tracker.history_document())], first,
                           title=f"{tracker.pattern} {tracker.method}")
        except MatplotlibMissing as err:
            logger.warning("%s; wrote %s only", err, HISTORY_FILE)
            return
        data = Path(first).read_bytes()
        for directory in output_dirs[1:]:
            if os.path.abspath(directory) != os.path.abspath(output_dirs[0]):
                atomic_write(os.path.join(directory, PLOT_FILE), lambda handle: handle.write(data))

    # ------------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Your call (or `push_to_hub`'s): masks baked in, "finalized" record. Checkpoints: dense + tracker state.

        The baked model is written to a staging folder and moved into `output_dir` file by file
        (`nm_hf._files.staged_files`, config.json last), so a crash or kill midway leaves the model
        that was there whole; checkpoint folders and other files in `output_dir` are kept, weight files
        of a previous save that the new one does not have are removed. The live model is not modified
        either way, so training can continue after a save.
        """
        checkpoint = _internal_call and output_dir is not None  # `_save_checkpoint` passes its folder
        target = output_dir if output_dir is not None else self.args.output_dir
        if not is_sparsified(self.model):
            super().save_model(output_dir, _internal_call)
            return
        if checkpoint or not self.args.should_save:
            self._nm_bake = not checkpoint
            try:  # checkpoints keep the dense weights to resume from, in the model's own layout
                with dense_save_intended(), self._own_layout_saves(checkpoint):
                    super().save_model(output_dir, _internal_call)
            finally:
                self._nm_bake = False
            if checkpoint and self.args.should_save:
                state = sparse_training_state(self.model)
                atomic_write(os.path.join(target, SPARSE_STATE_FILE), lambda handle: torch.save(state, handle))
            if checkpoint and self.sparsity_tracker is not None and self.args.should_save:
                self.sparsity_tracker.save_state(os.path.join(target, TRACKER_STATE_FILE))
                # keep the run directory's history current too (a crashed run still has it)
                self.save_sparsity_history(target, self.args.output_dir)
            return
        self._nm_bake = True
        try:
            with staged_files(target, last=(CONFIG_NAME,), stale=_is_weight_file) as staging:
                super().save_model(str(staging), _internal_call=True)  # the push (if any) comes after the move
                self.save_sparsity_history(staging)
        finally:
            self._nm_bake = False
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    @contextmanager
    def _own_layout_saves(self, active: bool):
        """While active, the model's `save_pretrained` keeps its state-dict layout (`save_original_format=False`).

        transformers 5 saves fused MoE experts per expert (the original checkpoints' layout), but
        `Trainer._load_from_checkpoint` loads a checkpoint with `load_state_dict` unconverted: a resumed
        run would silently keep its initial expert weights (transformers issue #48805). Plain
        `from_pretrained` loads either layout.
        """
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not active or not isinstance(model, PreTrainedModel) or "save_pretrained" in model.__dict__:
            yield
            return
        model.save_pretrained = functools.partial(model.save_pretrained, save_original_format=False)
        try:
            yield
        finally:
            model.__dict__.pop("save_pretrained", None)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._nm_bake or not self.args.should_save:
            return super()._save(output_dir, state_dict=state_dict)
        baked, sparsity = self._baked_state_dict(state_dict)
        with self._finalized_record(sparsity):
            return super()._save(output_dir, state_dict=baked)

    @torch.no_grad()
    def _baked_state_dict(self, state_dict: dict | None) -> tuple[dict, float]:
        """State dict with `weight * mask` for the sparse layers (`nm_hf.injection.baked_weights`), and its sparsity.

        The mask is recomputed from the dense weight in the state dict, exactly as the layers do, so a
        state dict gathered elsewhere (e.g. by DeepSpeed) is baked correctly too.
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
        record = read_record(model) if getattr(model, "config", None) is not None else None
        if record is None:
            yield
            return
        targeted = [name for name, _ in iter_sparse_layers(model)]
        write_record(model, current_record(model, sparsity_config_of(model), targeted, STATE_FINALIZED,
                                           sparsity=sparsity))
        try:
            yield
        finally:
            write_record(model, record)


class SparseTrainer(SparseTrainerMixin, Trainer):
    """`transformers.Trainer` for N:M sparse training; extra argument `sparsity_config=`.

    See `nm_hf.trainer` for what it adds (metrics, history/plot files, decay handling, saving).
    """


class SparseSeq2SeqTrainer(SparseTrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` (predict_with_generate, ...) for N:M sparse training."""
