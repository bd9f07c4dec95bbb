"""The dense-save warning: saving live sparse layers with dense weights outside nm_hf's save paths warns, once."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from nm_hf import DenseSaveWarning
from nm_hf.config import SparsityConfig
from nm_hf.injection import finalize, iter_sparse_layers, sparsify
from nm_hf.layers import group_dim_of
from nm_hf.masks import check_nm
from nm_hf.record import CONFIG_KEY
from nm_hf.trainer import SparseTrainer
from tiny_models import lm_rows, tiny_model


def lm_data(n: int = 16, length: int = 8) -> list[dict[str, torch.Tensor]]:
    return lm_rows(n, length)


def args(out, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=8, save_strategy="no",
                  learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True, optim="adamw_torch")
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def dense_save_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DenseSaveWarning)]


@pytest.fixture
def caught():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record


def test_save_pretrained_of_a_sparsified_model_warns_once_saying_what_was_written(tmp_path, caught):
    model = sparsify(tiny_model("gpt2"), SparsityConfig())
    model.save_pretrained(tmp_path / "plain")
    (message,) = dense_save_warnings(caught)
    layers = sum(1 for _ in iter_sparse_layers(model))
    assert f"{layers} of {layers} sparse layers" in message and "2:4" in message
    assert str(tmp_path / "plain") in message and "'training'" in message
    assert "nm_hf.finalize(model)" in message and "SparseTrainer" in message
    # what the warning says is what was written
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert getattr(reloaded.config, CONFIG_KEY)["state"] == "training"
    assert not check_nm(reloaded.get_submodule("transformer.h.0.mlp.c_fc").weight, 2, 4, dim=0)


def test_plain_trainer_save_model_and_its_checkpoints_warn_once_each(tmp_path, caught):
    model = sparsify(tiny_model("gpt2"), SparsityConfig())
    trainer = Trainer(model=model, args=args(tmp_path, save_strategy="steps", save_steps=1), train_dataset=lm_data())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    messages = dense_save_warnings(caught)
    assert len(messages) == 3  # checkpoint-1, checkpoint-2, final
    assert [m for m in messages if str(tmp_path / "final") in m] and [m for m in messages if "checkpoint-2" in m]


def test_sparse_trainer_checkpoints_and_save_model_do_not_warn(tmp_path, caught):
    model = tiny_model("gpt2")
    trainer = SparseTrainer(model=model, args=args(tmp_path, save_strategy="steps", save_steps=1),
                            train_dataset=lm_data(), sparsity_config=SparsityConfig())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "checkpoint-2").is_dir()
    assert dense_save_warnings(caught) == []
    # the same live model saved by hand still warns: the exemption is the trainer's own saves only
    model.save_pretrained(tmp_path / "by-hand")
    assert len(dense_save_warnings(caught)) == 1


def test_finalized_model_does_not_warn(tmp_path, caught):
    model = finalize(sparsify(tiny_model("gpt2"), SparsityConfig()))
    model.save_pretrained(tmp_path)
    assert dense_save_warnings(caught) == []


@pytest.mark.parametrize("method", ["fixed", "dense"])
def test_no_warning_when_the_written_weights_are_what_the_method_trains(tmp_path, caught, method):
    # "fixed" zeroes its pruned weights (they obey the pattern); "dense" trains dense weights on purpose
    model = sparsify(tiny_model("gpt2"), SparsityConfig(method=method))
    model.save_pretrained(tmp_path)
    assert dense_save_warnings(caught) == []


def test_a_baked_state_dict_passed_to_save_pretrained_does_not_warn(tmp_path, caught):
    model = sparsify(tiny_model("llama"), SparsityConfig())
    state = model.state_dict()
    baked = {**state, **{f"{name}.weight": layer.effective_weight() for name, layer in iter_sparse_layers(model)}}
    model.save_pretrained(tmp_path / "baked", state_dict=baked)
    assert dense_save_warnings(caught) == []
    model.save_pretrained(tmp_path / "dense", state_dict=state)
    assert len(dense_save_warnings(caught)) == 1
    for name, layer in iter_sparse_layers(model):
        assert not check_nm(layer.weight, 2, 4, dim=group_dim_of(layer)), name  # the live model stays dense
