"""SparseTrainer / SparseSeq2SeqTrainer: short real CPU training runs on tiny models (synthetic data)."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.pytorch_utils import Conv1D

from nm_hf.config import SparsityConfig
from nm_hf.injection import SparsifyError, finalize, iter_sparse_layers, sparsify
from nm_hf.layers import SparseLayerMixin
from nm_hf.masks import check_nm, nm_group_counts, nm_mask
from nm_hf.methods import SparsityMethod, available_methods, get_method, register_method
from nm_hf.methods.base import _REGISTRY
from nm_hf.plot import PLOT_FILE
from nm_hf.record import CONFIG_KEY
from nm_hf.tracker import HISTORY_FILE, TRACKER_STATE_FILE, SparsityTracker
from nm_hf.trainer import (
    SPARSE_STATE_FILE,
    ResumeError,
    SparseSeq2SeqTrainer,
    SparseTrainer,
    SparseTrainerMixin,
    prepare_sparse_model,
)
from tiny_models import VOCAB, lm_rows, tiny_model

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
PNG = b"\x89PNG\r\n\x1a\n"
METRICS = ("sparsity/sad", "sparsity/sad_rate", "sparsity/sad_from_init", "sparsity/flip_rate",
           "sparsity/pruned_weight_norm", "sparsity/sparsity")


pytestmark = pytest.mark.usefixtures("one_thread")


def lm_data(n: int = 32, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return lm_rows(n, length, seed)


def gpt2(seed: int = 0):
    return tiny_model("gpt2", seed=seed, **NO_DROPOUT)


def lm_args(out: Path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=8, logging_steps=4,
                  save_strategy="no", learning_rate=1e-3, report_to="none", use_cpu=True, disable_tqdm=True,
                  seed=0, data_seed=0, optim="adamw_torch")  # the fused default is ~2x slower on tiny CPU models
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def group_dim(module) -> int:
    return 0 if isinstance(module, Conv1D) else 1


class CountingTrainer(Trainer):
    """A user's own Trainer subclass (as TRL's trainers are): its overrides must keep working under the mixin."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.loss_calls += 1
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class CountingSparseTrainer(SparseTrainerMixin, CountingTrainer):
    pass


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --------------------------------------------------------------------------- full runs per method


@pytest.mark.parametrize("method", ["dense", "ste", "sr-ste", "fixed"])
def test_training_run_logs_metrics_writes_files_and_saves_exact_nm(tmp_path, method):
    model = gpt2()
    cfg = SparsityConfig(n=2, m=4, method=method, decay=0.1)
    # checkpoints (and their history/plot files) for one method only: plotting dominates these tiny runs
    checkpoints = method == "sr-ste"
    args = lm_args(tmp_path / "run", save_strategy="steps" if checkpoints else "no", save_steps=6)
    trainer = SparseTrainer(model=model, args=args, train_dataset=lm_data(), sparsity_config=cfg)
    initial_masks = {name: layer.current_mask().clone() for name, layer in iter_sparse_layers(model)}
    trainer.train()

    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in train_logs] == [4, 8, 12]
    for log in train_logs:
        for key in METRICS:
            assert key in log, key
        assert 0 <= log["sparsity/sad_rate"] <= 1 and 0 <= log["sparsity/flip_rate"] <= 1
    summary_log = trainer.state.log_history[-1]
    assert "train_loss" in summary_log and not any(k.startswith("sparsity/") for k in summary_log)

    tracker = trainer.sparsity_tracker
    numel = tracker.num_masked_weights
    assert [r["step"] for r in tracker.history] == [4, 8, 12]
    for log, record in zip(train_logs, tracker.history, strict=True):
        assert log["sparsity/sad"] == record["sad"] == sum(row["sad"] for row in record["layers"].values())
        assert log["sparsity/sad_rate"] == pytest.approx(record["sad"] / numel)
    final_masks = {name: layer.current_mask() for name, layer in iter_sparse_layers(model)}
    # sad_from_init is the L1 distance to the masks at the start, summed over layers
    assert tracker.history[-1]["sad_from_init"] == sum(int((final_masks[k] != initial_masks[k]).sum())
                                                       for k in final_masks)
    if method == "fixed":
        assert all(r["sad"] == 0 and r["flip_rate"] == 0 for r in tracker.history)
    else:
        assert tracker.history[0]["sad"] > 0
    expected_sparsity = 0.0 if method == "dense" else 0.5
    assert tracker.history[-1]["sparsity"] == pytest.approx(expected_sparsity, abs=1e-3)

    run = tmp_path / "run"
    doc = SparsityTracker.load_history(run / HISTORY_FILE)
    assert doc["method"] == method and doc["pattern"] == "2:4"
    assert [r["step"] for r in doc["records"]] == [4, 8, 12]
    assert set(doc["records"][0]["layers"]) == set(doc["layers"]) == {n for n, _ in iter_sparse_layers(model)}
    assert (run / PLOT_FILE).read_bytes()[:8] == PNG
    if checkpoints:
        for ckpt in ("checkpoint-6", "checkpoint-12"):
            assert (run / ckpt / TRACKER_STATE_FILE).is_file()
            assert (run / ckpt / HISTORY_FILE).is_file() and (run / ckpt / PLOT_FILE).read_bytes()[:8] == PNG
        assert [r["step"] for r in SparsityTracker.load_history(run / "checkpoint-6")["records"]] == [4]
        assert torch.load(run / "checkpoint-6" / TRACKER_STATE_FILE, weights_only=True)["total_steps"] == 6

    live_before = weights(model)
    out = tmp_path / "final"
    trainer.save_model(str(out))
    # the live model is untouched: still sparse layers, same dense weights, record still "training"
    assert all(torch.equal(v, live_before[k]) for k, v in model.state_dict().items())
    assert getattr(model.config, CONFIG_KEY)["state"] == "training"
    assert all(isinstance(layer, SparseLayerMixin) for _, layer in iter_sparse_layers(model))

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    record = json.loads((out / "config.json").read_text())[CONFIG_KEY]
    assert record["state"] == "finalized" and record["method"] == method
    targeted = record["targeted_modules"]
    assert targeted == [n for n, _ in iter_sparse_layers(model)] and len(targeted) == 8
    assert record["sparsity"] == pytest.approx(expected_sparsity, abs=1e-3)
    modules = dict(reloaded.named_modules())
    live = dict(iter_sparse_layers(model))
    for name in targeted:
        weight = modules[name].weight
        assert type(modules[name]) is Conv1D
        assert torch.equal(weight, live[name].effective_weight())
        if method != "dense":
            counts = nm_group_counts(weight, 4, dim=group_dim(modules[name]))
            assert torch.equal(counts, torch.full_like(counts, 2)), name  # exactly 2 of every 4
    # everything else is the trained dense weight
    for key, value in reloaded.state_dict().items():
        if key.rsplit(".", 1)[0] not in targeted:
            assert torch.equal(value, live_before[key]), key
    assert SparsityTracker.load_history(out)["records"] == tracker.history
    assert (out / PLOT_FILE).is_file()
    summary = trainer.sparsity_summary()
    assert summary["sad_from_init"] == tracker.history[-1]["sad_from_init"]
    assert summary["steps"] == 12 and summary["method"] == method
    assert summary["sparsity"] == pytest.approx(expected_sparsity, abs=1e-3)
    for key in ("sad", "flip_rate", "mean_flip_rate", "pruned_weight_norm"):
        assert key in summary


def test_checkpoint_keeps_dense_weights(tmp_path):
    model = gpt2()
    trainer = SparseTrainer(model=model, args=lm_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4),
                            train_dataset=lm_data(), sparsity_config=SparsityConfig(method="sr-ste"))
    trainer.train()
    ckpt = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-4")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ckpt.state_dict().items())
    record = getattr(ckpt.config, CONFIG_KEY)
    assert record["state"] == "training"
    pruned = [ckpt.get_submodule(n).weight[~layer.current_mask()] for n, layer in iter_sparse_layers(model)]
    assert all(bool((p != 0).all()) for p in pruned)  # SR-STE needs the pruned values to resume


def test_srste_ends_with_lower_sad_than_ste(tmp_path):
    """The paper's claim: SR-STE's decay stabilises the masks. Same seed, data and lr for both."""
    results = {}
    for method in ("ste", "sr-ste"):
        config = SparsityConfig(method=method, decay=1.0 if method == "sr-ste" else 0)  # ste reads no decay
        trainer = SparseTrainer(model=gpt2(), args=lm_args(tmp_path / method, max_steps=16, logging_steps=4),
                                train_dataset=lm_data(), sparsity_config=config)
        trainer.train()
        results[method] = trainer.sparsity_tracker.history
    late = {m: sum(r["sad"] for r in h[len(h) // 2:]) for m, h in results.items()}
    assert late["sr-ste"] < 0.6 * late["ste"], late
    assert results["sr-ste"][-1]["sad_from_init"] < 0.6 * results["ste"][-1]["sad_from_init"]
    assert results["sr-ste"][-1]["pruned_weight_norm"] < 0.5 * results["ste"][-1]["pruned_weight_norm"]


def test_masks_follow_fused_optimizer_updates(tmp_path):
    """The Trainer's default optimizer (fused AdamW) does not bump weight versions: masks must still move."""
    model = gpt2()
    args = lm_args(tmp_path, max_steps=3, logging_steps=1, learning_rate=1e-2, optim="adamw_torch_fused")
    trainer = SparseTrainer(model=model, args=args, train_dataset=lm_data(), sparsity_config=SparsityConfig())
    trainer.train()
    for _, layer in iter_sparse_layers(model):
        assert torch.equal(layer.current_mask(), nm_mask(layer.weight.detach(), 2, 4, dim=layer.group_dim))
    assert sum(r["sad"] for r in trainer.sparsity_tracker.history) > 0


# --------------------------------------------------------------------------- config handling


def test_sparsity_config_against_already_sparse_model(tmp_path):
    model = sparsify(gpt2(), SparsityConfig(method="ste"))
    SparseTrainer(model=model, args=lm_args(tmp_path), train_dataset=lm_data())  # kept as is
    SparseTrainer(model=model, args=lm_args(tmp_path), train_dataset=lm_data(),
                  sparsity_config=SparsityConfig(method="ste"))  # same config: fine
    with pytest.raises(SparsifyError, match=r"method: model has 'ste', sparsity_config has 'sr-ste'"):
        SparseTrainer(model=model, args=lm_args(tmp_path), train_dataset=lm_data(),
                      sparsity_config=SparsityConfig(method="sr-ste"))
    with pytest.raises(SparsifyError, match=r"decay: model has 0.0002, sparsity_config has 0.5"):
        SparseTrainer(model=model, args=lm_args(tmp_path), train_dataset=lm_data(),
                      sparsity_config=SparsityConfig(method="ste", decay=0.5))
    before_training = SparseTrainer(model=model, args=lm_args(tmp_path), train_dataset=lm_data()).sparsity_summary()
    assert before_training["sad_from_init"] == 0 and before_training["sparsity"] == 0.5
    with pytest.raises(SparsifyError, match="no sparsity_config was given"):
        SparseTrainer(model=gpt2(), args=lm_args(tmp_path), train_dataset=lm_data())
    with pytest.raises(TypeError, match="sparsity_config must be"):
        SparseTrainer(model=gpt2(), args=lm_args(tmp_path), train_dataset=lm_data(), sparsity_config="2:4")


def test_prepare_sparse_model_compares_every_field_of_a_model_without_record():
    from torch import nn

    config = SparsityConfig(method="ste", target_modules=["0"])
    model = sparsify(nn.Sequential(nn.Linear(8, 4)), config)  # no model.config: the layers are the record
    assert prepare_sparse_model(model, config).method == "ste"
    assert prepare_sparse_model(model, SparsityConfig(method="ste", target_modules=["0"], decay=3.0)).n == 2
    with pytest.raises(SparsifyError, match=r"n: model has 2, sparsity_config has 1"):
        prepare_sparse_model(model, SparsityConfig(n=1, method="ste", target_modules=["0"]))


def test_dict_config_and_model_init(tmp_path):
    trainer = SparseTrainer(model_init=lambda: gpt2(), args=lm_args(tmp_path, max_steps=2, logging_steps=1),
                            train_dataset=lm_data(), sparsity_config={"n": 1, "m": 4, "method": "ste"})
    trainer.train()
    layers = list(iter_sparse_layers(trainer.model))
    assert layers and all(layer.pattern == "1:4" for _, layer in layers)
    assert trainer.sparsity_tracker.history[-1]["sparsity"] == pytest.approx(0.75)


def test_finalized_model_reloaded_plainly_is_sparsified_from_its_record(tmp_path):
    model = sparsify(gpt2(), SparsityConfig(method="fixed"))
    finalize(model).save_pretrained(tmp_path / "finalized")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "finalized")
    trainer = SparseTrainer(model=reloaded, args=lm_args(tmp_path / "run", max_steps=3, logging_steps=1),
                            train_dataset=lm_data())
    assert trainer.sparsity_config.method == "fixed"
    trainer.train()
    assert trainer.sparsity_tracker.history[-1]["sad_from_init"] == 0


# --------------------------------------------------------------------------- decay placement


class _DecayScalesSeen(TrainerCallback):
    """Records the sparse layers' `nm_decay_scale` at the end of every update (what backward used)."""

    def __init__(self):
        self.seen = set()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.update(layer.nm_decay_scale for _, layer in iter_sparse_layers(model))


def _one_step(tmp_path, name, cfg, batch, accumulation, optim="sgd", lr=0.1, callbacks=None):
    model = gpt2()
    args = lm_args(tmp_path / name, max_steps=1, per_device_train_batch_size=batch,
                   gradient_accumulation_steps=accumulation, optim=optim, learning_rate=lr,
                   lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1)
    trainer = SparseTrainer(model=model, args=args, train_dataset=lm_data(4), sparsity_config=cfg, callbacks=callbacks)
    trainer.train()
    return model


def test_gradient_accumulation_applies_gradient_decay_once_per_update(tmp_path):
    lr, decay = 0.1, 2.0
    cfg = SparsityConfig(method="sr-ste", decay=decay, decay_mode="gradient")
    start = gpt2()
    full = _one_step(tmp_path, "full", cfg, batch=4, accumulation=1, lr=lr)
    scales = _DecayScalesSeen()
    accumulated = _one_step(tmp_path, "acc", cfg, batch=2, accumulation=2, lr=lr, callbacks=[scales])
    # STE has the same data gradient (straight-through) and no decay: with plain SGD the difference
    # is exactly one decay term, lr * decay * w0, on the pruned weights
    ste = _one_step(tmp_path, "ste", SparsityConfig(method="ste"), batch=4, accumulation=1, lr=lr)
    assert scales.seen == {0.5}
    for name, _ in iter_sparse_layers(full):
        w_full = full.get_submodule(name).weight.detach()
        w_acc = accumulated.get_submodule(name).weight.detach()
        w_ste = ste.get_submodule(name).weight.detach()
        torch.testing.assert_close(w_acc, w_full, rtol=0, atol=2e-6)
        w0 = start.get_submodule(name).weight.detach()
        pruned = ~nm_mask(w0, 2, 4, dim=0)
        torch.testing.assert_close((w_ste - w_acc)[pruned], lr * decay * w0[pruned], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(w_acc[~pruned], w_ste[~pruned], rtol=0, atol=2e-6)


def test_gradient_decay_is_not_divided_by_the_fp16_loss_scale(tmp_path):
    # fp16 training scales the loss before backward and unscales the gradients after it; the decay term
    # added in backward must come out of the unscaling as decay * (1 - mask) * W, not divided by the scale.
    # A CPU GradScaler stands in for the one accelerate builds for fp16 on a GPU.
    lr, decay = 0.1, 2.0
    cfg = SparsityConfig(method="sr-ste", decay=decay, decay_mode="gradient")
    plain = _one_step(tmp_path, "plain", cfg, batch=4, accumulation=1, lr=lr)
    model = gpt2()
    args = lm_args(tmp_path / "scaled", max_steps=1, per_device_train_batch_size=4, optim="sgd", learning_rate=lr,
                   lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1)
    trainer = SparseTrainer(model=model, args=args, train_dataset=lm_data(4), sparsity_config=cfg)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    trainer.train()
    for name, _ in iter_sparse_layers(plain):
        torch.testing.assert_close(model.get_submodule(name).weight.detach(),
                                   plain.get_submodule(name).weight.detach(), rtol=1e-5, atol=1e-6)


class _StepDecay(SparsityMethod):
    """A toy method: STE plus a gradient decay of `strength` from optimizer step `from_step` on, scaled like SR-STE's;
    it uses no `SparsityConfig.decay` (effective_decay 0), so only the method can tell the trainer a decay is in use."""

    name = "test-step-decay"
    summary = "toy"
    arg_defaults = {"strength": 2.0, "from_step": 0}

    def gradient_decay(self, layer) -> float:
        args = layer.nm_method_args
        return args["strength"] * layer.nm_decay_scale if layer.nm_step >= args["from_step"] else 0.0


@pytest.fixture
def step_decay():
    register_method(_StepDecay())
    yield
    _REGISTRY.pop(_StepDecay.name, None)


def _fp16_like_run(tmp_path, name, cfg, steps, scaler=None, callbacks=None):
    """`steps` plain SGD updates; `scaler`: a CPU GradScaler standing in for the one accelerate builds for fp16."""
    model = gpt2()
    args = lm_args(tmp_path / name, max_steps=steps, per_device_train_batch_size=4, optim="sgd", learning_rate=0.1,
                   lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1)
    trainer = SparseTrainer(model=model, args=args, train_dataset=lm_data(4 * steps), sparsity_config=cfg,
                            callbacks=callbacks)
    if scaler is not None:
        trainer.accelerator.scaler = scaler
    trainer.train()
    return model


@pytest.mark.parametrize("from_step", [0, 1])
def test_the_method_says_whether_a_gradient_decay_needs_the_fp16_loss_scale(tmp_path, step_decay, from_step):
    # not SparsityConfig.decay / decay_mode: this method's decay is 0 in the config, and (from_step=1) it starts
    # only after the first update, so the answer is asked again as training goes
    cfg = SparsityConfig(method=_StepDecay.name, method_args={"from_step": from_step})
    assert cfg.effective_decay == 0
    plain = _fp16_like_run(tmp_path, "plain", cfg, steps=2)
    ste = _fp16_like_run(tmp_path, "ste", SparsityConfig(method="ste"), steps=2)
    scales = _DecayScalesSeen()
    scaled = _fp16_like_run(tmp_path, "scaled", cfg, steps=2, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10),
                            callbacks=[scales])
    for name, _ in iter_sparse_layers(plain):
        w_plain = plain.get_submodule(name).weight.detach()
        assert not torch.allclose(w_plain, ste.get_submodule(name).weight.detach())  # the decay did something
        torch.testing.assert_close(scaled.get_submodule(name).weight.detach(), w_plain, rtol=1e-5, atol=1e-6)
    assert scales.seen == ({2.0 ** 10} if from_step == 0 else {1.0, 2.0 ** 10})  # step 0 of from_step=1: no decay
    # after train() the layers are back at the plain scale: a loop of the caller's own gets the decay as configured
    assert all(layer.nm_decay_scale == 1.0 for _, layer in iter_sparse_layers(scaled))


def test_decoupled_decay_does_not_read_the_fp16_loss_scale(tmp_path):
    # SR-STE decoupled adds nothing to the gradient: its layers keep the plain scale, 1 / accumulation steps
    cfg = SparsityConfig(method="sr-ste", decay=0.5, decay_mode="decoupled")
    scales = _DecayScalesSeen()
    _fp16_like_run(tmp_path, "decoupled", cfg, steps=1, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10),
                   callbacks=[scales])
    assert scales.seen == {1.0}


def test_decoupled_decay_shrinks_pruned_weights_after_the_step(tmp_path):
    lr, decay = 0.1, 0.5
    ste = _one_step(tmp_path, "ste", SparsityConfig(method="ste"), batch=4, accumulation=1, lr=lr)
    dec = _one_step(tmp_path, "dec", SparsityConfig(method="sr-ste", decay=decay, decay_mode="decoupled"),
                    batch=4, accumulation=1, lr=lr)
    for name, layer in iter_sparse_layers(ste):
        w_ste = layer.weight.detach()
        mask = nm_mask(w_ste, 2, 4, dim=0)  # mask after the optimizer step, which the decay uses
        expected = torch.where(mask, w_ste, w_ste * (1 - lr * decay))
        torch.testing.assert_close(dec.get_submodule(name).weight.detach(), expected, rtol=1e-6, atol=1e-7)
        assert bool((expected != w_ste).any())


# --------------------------------------------------------------------------- resume


#: method_args that make each method's schedule move within the 10 steps of the resume test
RESUME_METHOD_ARGS = {"decaying-mask": {"decay_start": 2, "decay_steps": 6},
                      "step": {"switch_threshold": 0.0}}  # switch at max_switch_fraction of the run
#: (method, extra SparsityConfig fields, trainer class): every registered method, the mask options, the mixin
RESUME_CASES = (
    [(method, {}, SparseTrainer) for method in available_methods()]
    + [("sr-ste", {"transposable": True}, SparseTrainer), ("sr-ste", {"mask_update_interval": 3}, SparseTrainer),
       ("step", {"method_args": {"max_switch_fraction": 0.8}}, SparseTrainer),  # switches after the resume
       ("sr-ste", {}, CountingSparseTrainer)]
)


@pytest.mark.parametrize("method,options,trainer_class", RESUME_CASES,
                         ids=[f"{m}-{'-'.join(map(str, o)) or 'plain'}-{c.__name__}" for m, o, c in RESUME_CASES])
def test_resume_from_checkpoint_is_exact(tmp_path, method, options, trainer_class):
    options = {**options, "method_args": {**RESUME_METHOD_ARGS.get(method, {}), **options.get("method_args", {})}}
    cfg = SparsityConfig(method=method, decay=0.05, **options)
    overrides = dict(max_steps=10, logging_steps=2, save_strategy="steps", save_steps=5)
    full = trainer_class(model=gpt2(), args=lm_args(tmp_path / "full", **overrides), train_dataset=lm_data(48),
                         sparsity_config=cfg)
    full.train()
    assert (tmp_path / "full" / "checkpoint-5" / SPARSE_STATE_FILE).is_file()

    # another initialisation: everything the run depends on must come from the checkpoint (S-STE's scale too)
    resumed_model = gpt2(seed=1)
    resumed = trainer_class(model=resumed_model, args=lm_args(tmp_path / "resumed", **overrides),
                            train_dataset=lm_data(48), sparsity_config=cfg)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))

    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    for (name, a), (_, b) in zip(iter_sparse_layers(full.model), iter_sparse_layers(resumed_model), strict=True):
        assert torch.equal(a.current_mask(), b.current_mask()), name
        assert a.nm_method_state == b.nm_method_state and a.nm_step == b.nm_step == 10, name
    if method == "step":  # at the checkpoint (5) or after the resume (8)
        switch = round(10 * cfg.method_args["max_switch_fraction"])
        assert all(layer.nm_method_state == {"switch_step": switch} for _, layer in iter_sparse_layers(resumed_model))
    assert resumed.sparsity_tracker.history == full.sparsity_tracker.history
    assert [r["step"] for r in resumed.sparsity_tracker.history] == [2, 4, 6, 8, 10]
    # the tracker state restores the window since the last log (step 4), so even the first log after
    # the resume (step 6) matches; Trainer's own loss average restarts its window at the resume step
    for key in ("sparsity/sad", "sparsity/sad_from_init", "sparsity/flip_rate", "sparsity/pruned_weight_norm"):
        a = [log[key] for log in full.state.log_history if "loss" in log]
        b = [log[key] for log in resumed.state.log_history if "loss" in log]
        assert a == b, key
    a = [log["loss"] for log in full.state.log_history if "loss" in log and log["step"] > 6]
    b = [log["loss"] for log in resumed.state.log_history if "loss" in log and log["step"] > 6]
    assert a == b and len(a) == 2
    doc = SparsityTracker.load_history(tmp_path / "resumed" / HISTORY_FILE)
    assert [r["step"] for r in doc["records"]] == [2, 4, 6, 8, 10]

    # the saved model: plain transformers loads it, with the N:M pattern in every targeted layer
    resumed.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    modules = dict(reloaded.named_modules())
    for name, layer in iter_sparse_layers(resumed_model):
        weight = modules[name].weight
        assert type(modules[name]) is Conv1D and torch.equal(weight, layer.effective_weight()), name
        if get_method(method).masks_forward:
            assert check_nm(weight, 2, 4, dim=group_dim(modules[name])), name
            if cfg.transposable:
                assert check_nm(weight, 2, 4, dim=1 - group_dim(modules[name])), name


def test_a_skipped_optimizer_step_is_not_counted(tmp_path, monkeypatch):
    """fp16 overflow: the Trainer skips the update; the layers' step counter (schedules) must not move."""
    skipped = {3, 4}

    class Skipping(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            flags["skip"] = state.global_step + 1 in skipped

    flags = {"skip": False}
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: flags["skip"]))
    cfg = SparsityConfig(method="decaying-mask", method_args={"decay_steps": 4})
    model = gpt2()
    trainer = SparseTrainer(model=model, args=lm_args(tmp_path, max_steps=6), train_dataset=lm_data(),
                            sparsity_config=cfg, callbacks=[Skipping()])
    trainer.train()
    assert trainer.state.global_step == 6
    assert all(layer.nm_step == 4 for _, layer in iter_sparse_layers(model))


class OutOfMemoryOnce(TrainerCallback):
    """The first optimizer step runs out of memory, as a too large batch on a GPU would."""

    def __init__(self):
        self.fired = False

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.fired:
            self.fired = True
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def test_auto_find_batch_size_retry_of_a_resumed_run_keeps_the_checkpoints_history(tmp_path, caplog):
    """The Trainer reruns its loop with a smaller batch after an out-of-memory error: the retry resumes from
    the same checkpoint, its sparsity history and training state included, without a warning."""
    overrides = dict(logging_steps=1, auto_find_batch_size=True)
    full = SparseTrainer(model=gpt2(), args=lm_args(tmp_path / "full", max_steps=2, save_strategy="steps", save_steps=2,
                                                     **overrides),
                         train_dataset=lm_data(), sparsity_config=SparsityConfig(method="s-ste"))
    full.train()
    out_of_memory = OutOfMemoryOnce()
    retried = SparseTrainer(model=gpt2(), args=lm_args(tmp_path / "retried", max_steps=3, **overrides),
                            train_dataset=lm_data(),
                            sparsity_config=SparsityConfig(method="s-ste"), callbacks=[out_of_memory])
    with caplog.at_level("WARNING", logger="nm_hf"):
        retried.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert out_of_memory.fired and retried.state.global_step == 3  # the retry (a smaller batch) trained to the end
    assert [r["step"] for r in retried.sparsity_tracker.history] == [1, 2, 3]
    assert retried.sparsity_tracker.history[:2] == full.sparsity_tracker.history
    assert not [r for r in caplog.records if r.name.startswith("nm_hf")], caplog.text


def test_resume_from_a_checkpoint_without_sparse_state_sets_the_step_with_a_warning(tmp_path, caplog):
    cfg = SparsityConfig(method="decaying-mask", method_args={"decay_steps": 8})
    args = lm_args(tmp_path, max_steps=4, logging_steps=2, save_strategy="steps", save_steps=4)
    SparseTrainer(model=gpt2(), args=args, train_dataset=lm_data(), sparsity_config=cfg).train()
    (tmp_path / "checkpoint-4" / SPARSE_STATE_FILE).unlink()  # written before nm_hf saved it
    model = gpt2(seed=1)
    trainer = SparseTrainer(model=model, args=lm_args(tmp_path, max_steps=6, logging_steps=2), train_dataset=lm_data(),
                            sparsity_config=cfg)
    with caplog.at_level("WARNING", logger="nm_hf.trainer"):
        trainer.train(resume_from_checkpoint=True)
    assert f"has no {SPARSE_STATE_FILE}: the sparse layers' step counter is set to the global step 4" in caplog.text
    assert all(layer.nm_step == 6 for _, layer in iter_sparse_layers(model))


def test_resume_true_uses_last_checkpoint_and_tolerates_a_missing_tracker_state(tmp_path, caplog):
    cfg = SparsityConfig()
    args = lm_args(tmp_path, max_steps=4, logging_steps=2, save_strategy="steps", save_steps=2)
    SparseTrainer(model=gpt2(), args=args, train_dataset=lm_data(), sparsity_config=cfg).train()
    # a run killed while writing checkpoint-6: weights cut short, no trainer_state.json
    half = tmp_path / "checkpoint-6"
    half.mkdir()
    shutil.copy(tmp_path / "checkpoint-4" / "config.json", half)
    weights_file = (tmp_path / "checkpoint-4" / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(weights_file[: len(weights_file) // 3])
    more = lm_args(tmp_path, max_steps=6, logging_steps=2, save_strategy="no")
    trainer = SparseTrainer(model=gpt2(), args=more, train_dataset=lm_data(), sparsity_config=cfg)
    with caplog.at_level("WARNING", logger="nm_hf.trainer"):
        trainer.train(resume_from_checkpoint=True)  # checkpoint-4, not the half-written checkpoint-6
    assert "checkpoint-6: an incomplete checkpoint (no trainer_state.json" in caplog.text
    assert [r["step"] for r in trainer.sparsity_tracker.history] == [2, 4, 6]
    caplog.clear()

    (tmp_path / "checkpoint-4" / TRACKER_STATE_FILE).unlink()  # e.g. written by a plain Trainer
    trainer = SparseTrainer(model=gpt2(), args=more, train_dataset=lm_data(), sparsity_config=cfg)
    with caplog.at_level("WARNING", logger="nm_hf.trainer"):
        trainer.train(resume_from_checkpoint=True)
    assert f"has no {TRACKER_STATE_FILE}" in caplog.text
    assert [r["step"] for r in trainer.sparsity_tracker.history] == [6]


def test_resume_true_without_a_complete_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()  # killed before the weights were written
    trainer = SparseTrainer(model=gpt2(), args=lm_args(tmp_path), train_dataset=lm_data(),
                            sparsity_config=SparsityConfig())
    with pytest.raises(ResumeError, match="no complete checkpoint in"):
        trainer.train(resume_from_checkpoint=True)


@pytest.fixture
def srste_checkpoint(tmp_path) -> Path:
    """checkpoint-2 of a 2:4 sr-ste run (its config.json has a "training" record)."""
    args = lm_args(tmp_path / "run", max_steps=2, logging_steps=1, save_strategy="steps", save_steps=2)
    SparseTrainer(model=gpt2(), args=args, train_dataset=lm_data(), sparsity_config=SparsityConfig()).train()
    return tmp_path / "run" / "checkpoint-2"


def _refused_resume(checkpoint: Path, config: SparsityConfig, resume, match: str) -> None:
    """The resume raises `match` before loading anything: weights, step and tracker untouched."""
    model = gpt2(seed=1)
    args = lm_args(checkpoint.parent, max_steps=4, logging_steps=1, save_strategy="no")
    trainer = SparseTrainer(model=model, args=args, train_dataset=lm_data(), sparsity_config=config)
    before = weights(model)
    with pytest.raises(ResumeError, match=match):
        trainer.train(resume_from_checkpoint=resume)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert trainer.state.global_step == 0 and trainer.sparsity_tracker is None


@pytest.mark.parametrize("config,field", [
    (SparsityConfig(n=1), "n: checkpoint has 2, this run has 1"),
    (SparsityConfig(method="fixed"), "method: checkpoint has 'sr-ste', this run has 'fixed'"),
    (SparsityConfig(method="ste"), "method: checkpoint has 'sr-ste', this run has 'ste'"),
    (SparsityConfig(decay=0.1, decay_mode="decoupled"), "decay_mode: checkpoint has 'gradient', this run has "
                                                       "'decoupled'"),
])
def test_resume_with_another_sparsity_config_is_refused(srste_checkpoint, config, field):
    for resume in (str(srste_checkpoint), True):
        _refused_resume(srste_checkpoint, config, resume, f"cannot resume from .*checkpoint-2: .*{re.escape(field)}")


def test_resume_with_an_unreadable_tracker_state_names_the_file(srste_checkpoint):
    state = srste_checkpoint / TRACKER_STATE_FILE
    good = state.read_bytes()
    for data in (b"", good[: len(good) // 2], b"\x80\x04 not a tracker state" * 4):
        state.write_bytes(data)
        _refused_resume(srste_checkpoint, SparsityConfig(), True, re.escape(str(state)))


def test_resume_with_an_unreadable_or_foreign_sparse_state_names_the_file(srste_checkpoint):
    path = srste_checkpoint / SPARSE_STATE_FILE
    good = path.read_bytes()
    for data in (b"", good[: len(good) // 2]):
        path.write_bytes(data)
        _refused_resume(srste_checkpoint, SparsityConfig(), True,
                        f"{re.escape(str(path))} is not a readable sparse training state")
    state = torch.load(io.BytesIO(good), weights_only=True)
    del state["layers"][next(iter(state["layers"]))]
    torch.save(state, path)
    _refused_resume(srste_checkpoint, SparsityConfig(), True, "not a sparse training state of this model's sparse layers")


# --------------------------------------------------------------------------- the public mixin


def test_mixin_gives_a_custom_trainer_everything_sparse_trainer_does(tmp_path):
    cfg = SparsityConfig(method="sr-ste", decay=0.5, decay_mode="decoupled")  # after-step hook in use
    runs = {}
    for name, trainer_class in (("plain", SparseTrainer), ("custom", CountingSparseTrainer)):
        model = gpt2()
        trainer = trainer_class(model=model, args=lm_args(tmp_path / name, max_steps=6, logging_steps=2),
                                train_dataset=lm_data(), sparsity_config=cfg)
        assert is_sparse(model)
        trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        runs[name] = trainer
    custom, plain = runs["custom"], runs["plain"]
    assert custom.loss_calls == 6  # the subclass's own override ran
    # same weights (decoupled decay applied), same mask history, same logged metrics
    for key, value in plain.model.state_dict().items():
        assert torch.equal(custom.model.state_dict()[key], value), key
    assert custom.sparsity_tracker.history == plain.sparsity_tracker.history
    logs = [log for log in custom.state.log_history if "loss" in log]
    assert [log["step"] for log in logs] == [2, 4, 6] and all(key in logs[0] for key in METRICS)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "custom" / "final")
    assert getattr(reloaded.config, CONFIG_KEY)["state"] == "finalized"
    for name, layer in iter_sparse_layers(custom.model):
        assert torch.equal(reloaded.get_submodule(name).weight, layer.effective_weight()), name
    assert (tmp_path / "custom" / HISTORY_FILE).is_file() and (tmp_path / "custom" / PLOT_FILE).is_file()


def is_sparse(model) -> bool:
    return any(True for _ in iter_sparse_layers(model))


def test_mixin_after_the_trainer_class_is_a_clear_error():
    with pytest.raises(TypeError, match=r"list SparseTrainerMixin before the Trainer class.*"
                                        r"class Wrong\(SparseTrainerMixin, CountingTrainer\)"):
        class Wrong(CountingTrainer, SparseTrainerMixin):
            pass


# --------------------------------------------------------------------------- saving


def test_save_model_killed_midway_leaves_the_previous_model_intact(tmp_path, monkeypatch):
    import transformers.modeling_utils

    model = gpt2()
    trainer = SparseTrainer(model=model, args=lm_args(tmp_path / "run", max_steps=2, logging_steps=1),
                            train_dataset=lm_data(), sparsity_config=SparsityConfig())
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"config.json", "model.safetensors"} <= set(before)
    with torch.no_grad():  # the next save has other weights
        for _, layer in iter_sparse_layers(model):
            layer.weight.mul_(1.5)

    real_save = transformers.modeling_utils.safe_save_file

    def killed_while_writing(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt("killed while writing the weights")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_model(str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # same files, same bytes, no leftovers
    AutoModelForCausalLM.from_pretrained(out)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_save)
    trainer.save_model(str(out))
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, layer in iter_sparse_layers(model):
        assert torch.equal(reloaded.get_submodule(name).weight, layer.effective_weight()), name


def test_save_model_into_the_run_directory_keeps_checkpoints_and_writes_0644_files(tmp_path):
    umask = os.umask(0o022)
    try:
        args = lm_args(tmp_path, max_steps=2, logging_steps=1, save_strategy="steps", save_steps=2)
        trainer = SparseTrainer(model=gpt2(), args=args, train_dataset=lm_data(), sparsity_config=SparsityConfig())
        trainer.train()
        checkpoint = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "checkpoint-2").rglob("*")}
        (tmp_path / "notes.txt").write_text("mine")
        (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"a previous sharded save")
        (tmp_path / "model.safetensors.index.json").write_text("{}")
        trainer.save_model()  # push_to_hub's call: into output_dir
    finally:
        os.umask(umask)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "checkpoint-2").rglob("*")} == checkpoint
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "model-00001-of-00002.safetensors").exists()  # stale weights of the old save
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    assert getattr(AutoModelForCausalLM.from_pretrained(tmp_path).config, CONFIG_KEY)["state"] == "finalized"
    written = [tmp_path / name for name in (HISTORY_FILE, PLOT_FILE, "model.safetensors", "config.json")]
    written += [tmp_path / "checkpoint-2" / name for name in (TRACKER_STATE_FILE, HISTORY_FILE, PLOT_FILE)]
    assert {str(p.relative_to(tmp_path)): mode(p) for p in written} == {
        str(p.relative_to(tmp_path)): 0o644 for p in written}


def test_deep_copied_sparse_model_trains_with_fused_adamw_and_saves_like_finalize(tmp_path):
    original = sparsify(gpt2(), SparsityConfig(method="sr-ste", decay=0.1))
    original_weights = weights(original)
    model = copy.deepcopy(original)
    args = lm_args(tmp_path / "run", max_steps=4, logging_steps=2, learning_rate=1e-2,
                   optim="adamw_torch_fused")  # the Trainer's default optimizer
    trainer = SparseTrainer(model=model, args=args, train_dataset=lm_data())
    trainer.train()
    assert sum(r["sad"] for r in trainer.sparsity_tracker.history) > 0
    for _, layer in iter_sparse_layers(model):
        assert torch.equal(layer.current_mask(), nm_mask(layer.weight.detach(), 2, 4, dim=layer.group_dim))
    trainer.save_model(str(tmp_path / "final"))
    expected = finalize(copy.deepcopy(model)).state_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    assert reloaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(reloaded[key], value), key
    assert all(torch.equal(v, original_weights[k]) for k, v in original.state_dict().items())


# --------------------------------------------------------------------------- integrations


def test_tensorboard_receives_sparsity_scalars(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    trainer = SparseTrainer(model=gpt2(), args=lm_args(tmp_path / "run", max_steps=4, logging_steps=2,
                                                       report_to=["tensorboard"]),
                            train_dataset=lm_data(), sparsity_config=SparsityConfig())
    trainer.train()
    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/sparsity/sad" in tags and "train/sparsity/flip_rate" in tags, tags
    steps = [e.step for e in events.Scalars("train/sparsity/sad")]
    values = [e.value for e in events.Scalars("train/sparsity/sad")]
    assert steps == [2, 4]
    assert values == [float(r["sad"]) for r in trainer.sparsity_tracker.history]


def test_seq2seq_trainer_predict_with_generate(tmp_path):
    model = tiny_model("bart", dropout=0.0)
    model.generation_config.max_length = 8
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, VOCAB, (8,), generator=g),
             "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.randint(3, VOCAB, (6,), generator=g)} for _ in range(16)]
    seen = {}

    def compute_metrics(pred):
        seen["shape"] = pred.predictions.shape
        return {"n": float(len(pred.predictions))}

    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                    per_device_eval_batch_size=4, logging_steps=2, eval_strategy="steps",
                                    eval_steps=4, predict_with_generate=True, generation_max_length=8,
                                    learning_rate=1e-3, report_to="none", use_cpu=True, disable_tqdm=True,
                                    save_strategy="no")
    trainer = SparseSeq2SeqTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8],
                                   compute_metrics=compute_metrics, sparsity_config=SparsityConfig(method="sr-ste"))
    trainer.train()
    eval_logs = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert eval_logs and eval_logs[-1]["eval_n"] == 8.0
    assert seen["shape"][0] == 8 and seen["shape"][1] <= 8  # generated token ids
    assert not any(k.startswith("sparsity/") for k in eval_logs[-1])
    assert [r["step"] for r in trainer.sparsity_tracker.history] == [2, 4]
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "final")
    for name in getattr(reloaded.config, CONFIG_KEY)["targeted_modules"]:
        counts = nm_group_counts(reloaded.get_submodule(name).weight, 4, dim=1)
        assert bool((counts == 2).all()), name


@pytest.mark.parametrize("method", ["sr-ste", "decaying-mask"])
def test_load_best_model_at_end_restores_the_best_checkpoints_sparse_state(tmp_path, method):
    """The best checkpoint is not the last: its weights come back with its masks in use (they lag the weights
    with mask_update_interval > 1) and its step count, so the saved model is the one evaluated there."""
    cfg = SparsityConfig(method=method, decay=0.05, mask_update_interval=4)
    data = lm_data(48)
    args = lm_args(tmp_path / "run", max_steps=12, save_strategy="steps", save_steps=6, eval_strategy="steps",
                   eval_steps=6, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                   greater_is_better=True)  # the training loss falls: "best" is the first checkpoint
    trainer = SparseTrainer(model=gpt2(), args=args, train_dataset=data, eval_dataset=data[:8], sparsity_config=cfg)
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-6"
    saved = torch.load(best / SPARSE_STATE_FILE, weights_only=True)
    best_weights = load_file(best / "model.safetensors")
    trainer.save_model(str(tmp_path / "final"))
    final = load_file(tmp_path / "final" / "model.safetensors")
    moved = 0
    for name, layer in iter_sparse_layers(trainer.model):
        mask = saved["layers"][name]["mask"]
        assert torch.equal(layer.current_mask(), mask) and layer.nm_step == 6, name
        moved += not torch.equal(mask, nm_mask(best_weights[f"{name}.weight"], 2, 4, dim=group_dim(layer)))
        assert torch.equal(final[f"{name}.weight"], best_weights[f"{name}.weight"] * mask), name
    assert moved  # the masks in use at step 6 lag that checkpoint's weights: the test can tell them apart


def test_a_model_sharded_at_load_time_is_refused_before_it_is_sparsified(tmp_path):
    """`from_pretrained(distributed_config=...)` shards the model at load time: training ran, but save_model then
    failed on the DTensor state dict (and transformers' save gathers the dense weights whatever it is given), so the
    trainer refuses it up front, leaving the model untouched."""
    model = gpt2()
    model._is_distributed_loading_by_transformers = True  # what from_pretrained(distributed_config=...) sets
    with pytest.raises(NotImplementedError, match="sharded at load time"):
        SparseTrainer(model=model, args=lm_args(tmp_path), train_dataset=lm_data(8), sparsity_config=SparsityConfig())
    assert not list(iter_sparse_layers(model))


def test_a_checkpoint_at_the_end_of_training_is_refused_not_trained_one_step_more(tmp_path):
    """transformers resumed mid-epoch from a checkpoint at max_steps trained one step past it (3 -> 4 here; the
    Multi30k results had two such runs): the resume is refused before anything is loaded; more steps are fine."""
    args = lm_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)  # 8 steps per epoch: ends mid-epoch
    SparseTrainer(model=gpt2(), args=args, train_dataset=lm_data(64), sparsity_config=SparsityConfig()).train()
    trainer = SparseTrainer(model=gpt2(), args=args, train_dataset=lm_data(64), sparsity_config=SparsityConfig())
    with pytest.raises(ResumeError, match="saved at step 3, the end of training"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0
    longer = lm_args(tmp_path, max_steps=5, save_strategy="steps", save_steps=3)
    trainer = SparseTrainer(model=gpt2(), args=longer, train_dataset=lm_data(64), sparsity_config=SparsityConfig())
    assert trainer.train(resume_from_checkpoint=True).global_step == 5


def test_training_refuses_a_model_whose_sparse_weights_are_all_frozen(tmp_path):
    """A PEFT model (LoRA froze the base) would move no mask and save the adapter, not the masked base."""
    trainer = SparseTrainer(model=gpt2(), args=lm_args(tmp_path, max_steps=2), train_dataset=lm_data(),
                            sparsity_config=SparsityConfig(method="sr-ste"))
    for _, layer in iter_sparse_layers(trainer.model):
        layer.weight.requires_grad_(False)
    before = weights(trainer.model)
    with pytest.raises(ValueError, match="every sparse layer's weight is frozen .*preserve_sparsity"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in weights(trainer.model).items())
    assert trainer.state.global_step == 0
    next(layer for _, layer in iter_sparse_layers(trainer.model)).weight.requires_grad_(True)
    trainer.train()  # one layer that trains is enough
    assert trainer.state.global_step == 2
