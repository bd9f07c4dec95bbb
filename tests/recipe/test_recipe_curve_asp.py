"""The run's curve in results.json (training loss and validation metrics by step) and the dense warm-up
(`--dense_warmup_fraction`, the asp baseline)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from nm_hf.config import SparsityConfig
from nm_hf.injection import iter_sparse_layers
from nm_hf.masks import check_nm, nm_mask
from nm_hf.recipe import CausalLMModelArguments
from nm_hf.recipe.results import training_curve
from nm_hf.recipe.schedule import (
    attach_dense_warmup,
    check_dense_warmup,
    dense_warmup_config,
    resumed_step,
    starting_config,
)
from nm_hf.trainer import SparseTrainer
from tiny_models import lm_rows, tiny_model

ROOT = Path(__file__).resolve().parents[2]
TINY_LM = ["--d_model", "32", "--ffn_dim", "64", "--num_layers", "2", "--num_attention_heads", "4",
           "--vocab_size", "300", "--block_size", "32", "--max_position_embeddings", "64",
           "--max_train_samples", "300", "--max_eval_samples", "60", "--max_steps", "6",
           "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
           "--disable_tqdm", "true", "--seed", "0"]


def test_training_curve_keeps_losses_and_eval_metrics_by_step():
    history = [
        {"loss": 6.0, "grad_norm": 1.5, "learning_rate": 1e-3, "epoch": 0.1, "step": 50, "sad": 12},
        {"eval_loss": 5.5, "eval_runtime": 2.0, "eval_samples_per_second": 100.0, "epoch": 0.2, "step": 100},
        {"train_runtime": 10.0, "train_loss": 5.8, "total_flos": 1.0, "epoch": 0.2, "step": 100},
    ]
    assert training_curve(history) == [
        {"loss": 6.0, "grad_norm": 1.5, "learning_rate": 1e-3, "epoch": 0.1, "step": 50, "sad": 12},
        {"eval_loss": 5.5, "epoch": 0.2, "step": 100},
    ]


# --------------------------------------------------------------------------------------------- dense warm-up (asp)


def _lm_rows(n: int = 32, length: int = 16) -> list[dict[str, torch.Tensor]]:
    return lm_rows(n, length)


class Recorder(TrainerCallback):
    """Per optimizer step: each layer's method, the weights the optimizer just produced, and the mask."""

    def __init__(self, trainer):
        self.trainer, self.steps, self.weights = trainer, {}, {}

    def on_optimizer_step(self, args, state, control, **kwargs):  # before the switch's on_step_end
        self.weights = {n: layer.weight.detach().clone() for n, layer in iter_sparse_layers(self.trainer.model)}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[state.global_step] = {
            name: (layer.nm_method, layer.weight.detach().clone(), layer.current_mask().clone(),
                   self.weights[name]) for name, layer in iter_sparse_layers(self.trainer.model)}


def test_dense_warmup_then_magnitude_prune_with_a_frozen_mask(tmp_path):
    """asp: dense (nothing masked) up to the switch, then the magnitude mask of the warmed-up weights,
    frozen to the end; N:M holds in the saved model; the optimizer carries on with the same Parameters."""
    model = tiny_model("gpt2", seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = SparsityConfig(method="fixed", n=2, m=4)
    check_dense_warmup(0.5, config, max_steps=8)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, logging_steps=2,
                             save_strategy="no", learning_rate=1e-2, report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0, optim="adamw_torch")
    trainer = SparseTrainer(model=model, args=args, train_dataset=_lm_rows(),
                            sparsity_config=dense_warmup_config(0.5, config))
    parameters = [id(p) for p in model.parameters()]
    switch = attach_dense_warmup(trainer, 0.5, config, max_steps=8)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()

    assert switch.summary() == {"dense_until_step": 4, "switched_at_step": 4}
    assert [id(p) for p in model.parameters()] == parameters
    for step in (1, 2, 3):
        for name, (method, weight, _, _) in recorder.steps[step].items():
            assert method == "dense" and (weight != 0).all(), (step, name)  # dense: nothing pruned
    at_switch = recorder.steps[4]
    for name, (method, weight, mask, before) in at_switch.items():
        layer = dict(iter_sparse_layers(model))[name]
        assert method == "fixed"
        assert torch.equal(mask, nm_mask(before, 2, 4, dim=layer.group_dim)), name  # magnitude of warmed-up weights
        assert (weight[~mask] == 0).all(), name
    for step in range(5, 9):
        for name, (method, weight, mask, _) in recorder.steps[step].items():
            assert method == "fixed" and torch.equal(mask, at_switch[name][2]), (step, name)  # frozen
            assert (weight[~mask] == 0).all(), (step, name)  # no Adam momentum moved a pruned weight
            assert not torch.equal(weight, at_switch[name][1]), (step, name)  # the kept weights still train
    trainer.save_model()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert saved.config.nm_sparsity["method"] == "fixed"
    modules = dict(saved.named_modules())
    for name in saved.config.nm_sparsity["targeted_modules"]:
        assert check_nm(modules[name].weight, 2, 4, dim=0), name  # GPT-2 Conv1D: groups along dim 0


def test_dense_warmup_then_gradient_decay_under_accumulation_matches_one_big_batch(tmp_path):
    """After the switch the re-sparsified layers get SR-STE's gradient decay once per update, as without the
    warm-up: 2 micro-batches of 4 train the weights a batch of 8 does."""
    config = SparsityConfig(method="sr-ste", n=2, m=4, decay=0.1)
    models = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model = tiny_model("gpt2", seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        args = TrainingArguments(output_dir=str(tmp_path / str(batch)), max_steps=4, per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation, save_strategy="no", learning_rate=1e-2,
                                 report_to="none", use_cpu=True, disable_tqdm=True, seed=0, optim="adamw_torch")
        trainer = SparseTrainer(model=model, args=args, train_dataset=_lm_rows(),
                                sparsity_config=dense_warmup_config(0.5, config))
        attach_dense_warmup(trainer, 0.5, config, max_steps=4)
        trainer.train()
        models.append(model)
    for (name, big), (_, small) in zip(iter_sparse_layers(models[0]), iter_sparse_layers(models[1]), strict=True):
        assert torch.allclose(big.weight, small.weight, atol=1e-5), name


def _warmup_trainer(out_dir, config, seed=0, resume=None, max_steps=8, save_steps=2):
    """A SparseTrainer with a dense warm-up of half the steps, built as the recipes build it."""
    model = tiny_model("gpt2", seed=seed, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    args = TrainingArguments(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=8,
                             logging_steps=2, save_strategy="steps", save_steps=save_steps, learning_rate=1e-2,
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=0, optim="adamw_torch")
    resumed_at = resumed_step(resume)
    trainer = SparseTrainer(model=model, args=args, train_dataset=_lm_rows(),
                            sparsity_config=starting_config(0.5, config, max_steps, resumed_at))
    return trainer, attach_dense_warmup(trainer, 0.5, config, max_steps, resumed_at)


@pytest.mark.parametrize("checkpoint", [2, 4, 6])  # before the switch (after step 4), at it, after it
@pytest.mark.parametrize("method", ["fixed", "sr-ste"])
def test_a_dense_warmup_run_resumes_exactly_from_either_side_of_the_switch(tmp_path, checkpoint, method):
    """Resumed from a dense checkpoint it switches at the same step; from a sparse one it carries on with the
    checkpoint's masks: either way the model, masks and sparsity history equal the uninterrupted run's."""
    config = SparsityConfig(method=method, n=2, m=4, decay=0.05)
    full, full_switch = _warmup_trainer(tmp_path / "full", config)
    full.train()
    resume = str(tmp_path / "full" / f"checkpoint-{checkpoint}")
    check_dense_warmup(0.5, config, 8, resume)
    expected_method = "dense" if checkpoint < 4 else method
    assert json.loads((Path(resume) / "config.json").read_text())["nm_sparsity"]["method"] == expected_method
    assert starting_config(0.5, config, 8, resumed_step(resume)).method == expected_method

    resumed, switch = _warmup_trainer(tmp_path / "resumed", config, seed=1, resume=resume)  # another init
    resumed.train(resume_from_checkpoint=resume)
    assert switch.summary() == full_switch.summary() == {"dense_until_step": 4, "switched_at_step": 4}
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    for (name, a), (_, b) in zip(iter_sparse_layers(full.model), iter_sparse_layers(resumed.model), strict=True):
        assert a.nm_method == b.nm_method == method, name
        assert torch.equal(a.current_mask(), b.current_mask()) and a.nm_step == b.nm_step == 8, name
    assert resumed.sparsity_tracker.history == full.sparsity_tracker.history
    # the tracker follows the switch: the masked weights' sparsity, the run's method and record
    assert [record["sparsity"] for record in full.sparsity_tracker.history] == [0.0, 0.5, 0.5, 0.5]
    for trainer in (full, resumed):
        document = trainer.sparsity_tracker.history_document()
        assert document["method"] == document["config"]["method"] == method


@pytest.mark.parametrize("fraction, method, max_steps, resume, message", [
    (0.5, "dense", 10, None, "--dense_warmup_fraction 0.5 needs a sparse --method to switch to, not 'dense'"),
    (0.5, "step", 10, None, "cannot switch to --method step: it trains with its own optimizer"),
    (0.5, "fixed", -1, None, "--dense_warmup_fraction needs --max_steps (at least 2), got -1"),
    (0.5, "fixed", 10, "runs/x/checkpoint-5", "--resume_from_checkpoint runs/x/checkpoint-5: no readable "
                                              "trainer_state.json, so whether the dense warm-up had ended is unknown"),
])
def test_dense_warmup_refusals(fraction, method, max_steps, resume, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_dense_warmup(fraction, SparsityConfig(method=method, n=2, m=4), max_steps, resume)
    check_dense_warmup(0.0, SparsityConfig(method=method, n=2, m=4), max_steps, resume)  # no warm-up: no check


def test_dense_warmup_fraction_is_checked_by_the_recipe_flags():
    with pytest.raises(ValueError, match=r"--dense_warmup_fraction must be in \[0, 1\), got 1.0"):
        CausalLMModelArguments(dense_warmup_fraction=1.0)


def test_language_modeling_recipe_with_asp_and_a_curve(tmp_path):
    """A tiny recipe run: --method fixed --dense_warmup_fraction 0.5 (asp) records the switch, keeps N:M,
    and results.json carries the curve with the validation loss at every eval_steps; resumed from its
    checkpoint after the switch it ends where the uninterrupted run ended."""
    spec = importlib.util.spec_from_file_location("lm_recipe_asp", ROOT / "recipes" / "language_modeling.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "out"
    asp = [*TINY_LM, "--method", "fixed", "--dense_warmup_fraction", "0.5", "--eval_strategy", "steps",
           "--eval_steps", "2", "--logging_steps", "2", "--save_strategy", "steps", "--save_steps", "4"]
    results = recipe.main([*asp, "--output_dir", str(out)])
    resumed = recipe.main([*asp, "--output_dir", str(tmp_path / "resumed"),
                           "--resume_from_checkpoint", str(out / "checkpoint-4")])  # switched after step 3
    assert resumed["sparsity_config"]["dense_warmup"] == results["sparsity_config"]["dense_warmup"]
    assert resumed["eval_loss"] == results["eval_loss"] and resumed["sparsity"] == results["sparsity"] == 0.5
    assert results["sparsity_config"]["method"] == "fixed" and results["nm_ok"] is True
    assert results["sparsity_config"]["dense_warmup"] == {"fraction": 0.5, "dense_until_step": 3,
                                                          "switched_at_step": 3}
    written = json.loads((out / "results.json").read_text())
    evals = [(p["step"], p["eval_loss"]) for p in written["curve"] if "eval_loss" in p]
    assert [step for step, _ in evals] == [2, 4, 6] and all(math.isfinite(loss) for _, loss in evals)
    assert [p["step"] for p in written["curve"] if "loss" in p] == [2, 4, 6]
    assert written["train"]["learning_rate"] == pytest.approx(2e-3) and written["train"]["seed"] == 0
