"""A dense warm-up before sparse training (`--dense_warmup_fraction`): NVIDIA ASP's recipe with `--method fixed`.

The run trains the model dense (the "dense" method: layers patched, nothing masked) for the given
fraction of `max_steps`; then `DenseWarmupSwitch` finalizes the dense layers and sparsifies them again
with the run's own config, so each method chooses its first mask from the warmed-up weights (`fixed`:
a one-shot magnitude prune, frozen for the remaining steps). The layers keep their Parameter objects
(`finalize` and `sparsify` swap classes in place), so the optimizer carries on; the Adam state of the
weights the new mask prunes is zeroed, so their old momentum cannot move them off zero. Same total
steps as any other run.

A run resumes from either side of the switch: a checkpoint saved before it is dense (the trainer starts
dense and switches at the same step), one saved at or after it holds the sparse layers' state (the
trainer starts with the run's own config, `starting_config`), and a resume is as exact as without a
warm-up.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from transformers import TrainerCallback

from nm_hf.config import SparsityConfig
from nm_hf.injection import finalize, iter_sparse_layers, set_training_step, sparsify, unwrap_model
from nm_hf.methods import get_method
from nm_hf.trainer import saved_steps

__all__ = ["DenseWarmupSwitch", "attach_dense_warmup", "check_dense_warmup", "dense_warmup_config",
           "resumed_step", "starting_config", "switch_step"]

logger = logging.getLogger(__name__)

DENSE = "dense"  # the registered method that patches the layers without masking them


def check_dense_warmup(fraction: float, config: SparsityConfig, max_steps: int, resume: Any = None) -> None:
    """Refuse a warm-up the run could not honour, before anything is loaded (one-line ValueError)."""
    if not fraction:
        return
    if max_steps < 2:
        raise ValueError(f"--dense_warmup_fraction needs --max_steps (at least 2), got {max_steps}")
    method = get_method(config.method)
    if not method.masks_forward:
        raise ValueError(f"--dense_warmup_fraction {fraction} needs a sparse --method to switch to, "
                         f"not {config.method!r}")
    if method.optimizer_class is not None:
        raise ValueError(f"--dense_warmup_fraction cannot switch to --method {config.method}: it trains with its "
                         f"own optimizer ({method.optimizer_class.__name__}) from the first step")
    if resume and resumed_step(resume) is None:
        raise ValueError(f"--resume_from_checkpoint {resume}: no readable trainer_state.json, so whether the dense "
                         "warm-up had ended is unknown")


def resumed_step(resume: Any) -> int | None:
    """The optimizer step a `--resume_from_checkpoint` directory was saved at (None: no readable trainer state,
    or no resume)."""
    steps = saved_steps(resume) if resume else None
    return None if steps is None else steps[0]


def dense_warmup_config(fraction: float, config: SparsityConfig) -> SparsityConfig:
    """The config the run starts with: `config` itself without a warm-up, else the same layers and pattern
    with the dense method."""
    if not fraction:
        return config
    # decay=0: the dense phase applies none (its method reads none), and sparsify would warn about the sparse one's
    return dataclasses.replace(config, method=DENSE, method_args={}, decay=0.0, transposable=False,
                               mask_update_interval=1)


def starting_config(fraction: float, config: SparsityConfig, max_steps: int,
                    resumed_at: int | None = None) -> SparsityConfig:
    """The config the trainer is built with: the dense warm-up's (`dense_warmup_config`), or `config` itself
    without a warm-up or when the run resumes from a checkpoint saved at or after the switch (`resumed_at`:
    its step)."""
    if fraction and _resumed_past_switch(resumed_at, switch_step(fraction, max_steps)):
        return config
    return dense_warmup_config(fraction, config)


def _resumed_past_switch(resumed_at: int | None, step: int) -> bool:
    """Whether a checkpoint saved at `resumed_at` was saved after the switch at the end of `step` (the switch
    comes before that step's save)."""
    return resumed_at is not None and resumed_at >= step


def switch_step(fraction: float, max_steps: int) -> int:
    """The optimizer step after which the layers become sparse (at least 1, before the last step)."""
    return min(max(1, round(fraction * max_steps)), max_steps - 1)


class DenseWarmupSwitch(TrainerCallback):
    """At the end of optimizer step `step`: finalize the dense layers, sparsify with `config`, zero the
    optimizer state of the newly pruned weights, and make `config` the trainer's sparsity config."""

    def __init__(self, trainer: Any, config: SparsityConfig, step: int) -> None:
        self.trainer, self.config, self.step = trainer, config, step
        self.switched_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step or self.switched_at is not None:
            return
        model = unwrap_model(self.trainer.model)
        finalize(model)
        sparsify(model, self.config)
        optimizer = self.trainer.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        with torch.no_grad():
            for _, layer in iter_sparse_layers(model):
                pruned = ~layer.current_mask()
                for value in inner.state.get(layer.weight, {}).values():
                    if torch.is_tensor(value) and value.shape == pruned.shape:
                        value.masked_fill_(pruned, 0)
        set_training_step(model, state.global_step)  # sparsify starts the layers' step count at 0
        self.trainer.sparsity_config = self.config
        self.switched_at = state.global_step
        logger.info(f"dense warm-up over after step {state.global_step}: layers now {self.config.method} "
                    f"{self.config.n}:{self.config.m}")

    def summary(self) -> dict[str, Any]:
        """The results.json entry: the planned and the actual switch step."""
        return {"dense_until_step": self.step, "switched_at_step": self.switched_at}


def attach_dense_warmup(trainer: Any, fraction: float, config: SparsityConfig, max_steps: int,
                        resumed_at: int | None = None) -> DenseWarmupSwitch | None:
    """Give `trainer` (built with `starting_config(fraction, config, max_steps, resumed_at)`) the switch to
    `config`; None without a warm-up. Resumed from a checkpoint saved at or after the switch, the switch is
    recorded as made at its step and does nothing more."""
    if not fraction:
        return None
    switch = DenseWarmupSwitch(trainer, config, switch_step(fraction, max_steps))
    if _resumed_past_switch(resumed_at, switch.step):
        switch.switched_at = switch.step
    trainer.add_callback(switch)
    return switch
