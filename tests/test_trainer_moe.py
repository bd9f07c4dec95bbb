"""SparseTrainer on a mixture-of-experts model: metrics, tracker per expert tensor, save, plain reload, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_layers_experts import tiny_moe
from transformers import AutoModelForCausalLM, TrainingArguments

from nm_hf.config import SparsityConfig
from nm_hf.injection import iter_sparse_layers
from nm_hf.layers import ExpertWeight
from nm_hf.masks import check_nm
from nm_hf.record import CONFIG_KEY
from nm_hf.tracker import HISTORY_FILE, SparsityTracker
from nm_hf.trainer import SPARSE_STATE_FILE, ResumeError, SparseTrainer
from tiny_models import lm_rows

METRICS = ("sparsity/sad", "sparsity/sad_from_init", "sparsity/flip_rate", "sparsity/pruned_weight_norm",
           "sparsity/sparsity")


pytestmark = pytest.mark.usefixtures("one_thread")


def moe_args(out: Path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, logging_steps=2,
                  save_strategy="no", learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True,
                  seed=0, data_seed=0, optim="adamw_torch")
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def expert_layers(model) -> dict[str, ExpertWeight]:
    return {name: layer for name, layer in iter_sparse_layers(model) if isinstance(layer, ExpertWeight)}


def test_mixtral_trains_logs_tracks_each_expert_tensor_and_saves_a_plain_nm_model(tmp_path):
    model = tiny_moe("mixtral").train()
    trainer = SparseTrainer(model=model, args=moe_args(tmp_path / "run"), train_dataset=lm_rows(24),
                            sparsity_config=SparsityConfig(n=2, m=4, method="sr-ste", decay=0.1))
    layers = expert_layers(model)
    assert len(layers) == 4  # gate_up_proj and down_proj of both layers
    initial = {name: layer.current_mask().clone() for name, layer in iter_sparse_layers(model)}
    trainer.train()

    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in logs] == [2, 4, 6]
    assert all(key in log for log in logs for key in METRICS)
    tracker = trainer.sparsity_tracker
    last = tracker.history[-1]
    assert set(last["layers"]) == {name for name, _ in iter_sparse_layers(model)} and set(layers) <= set(last["layers"])
    for name, layer in layers.items():  # per expert tensor: SAD from init, element counts
        row = last["layers"][name]
        assert row["sad_from_init"] == int((layer.current_mask() != initial[name]).sum()), name
    assert sum(row["sad_from_init"] for row in last["layers"].values()) == last["sad_from_init"] > 0
    assert tracker.num_masked_weights == sum(layer.weight.numel() for _, layer in iter_sparse_layers(model))
    assert last["sparsity"] == pytest.approx(0.5)

    model.eval()
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    trainer.save_model(str(tmp_path / "final"))
    assert all(isinstance(layer, ExpertWeight) for layer in expert_layers(model).values())  # live model untouched
    record = json.loads((tmp_path / "final" / "config.json").read_text())[CONFIG_KEY]
    assert record["state"] == "finalized" and set(layers) <= set(record["targeted_modules"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)
    saved = load_file(tmp_path / "final" / "model.safetensors")  # per-expert layout: w1/w2/w3 [out, in]
    expert_keys = [key for key in saved if ".experts." in key]
    assert len(expert_keys) == 2 * 4 * 3
    for key in expert_keys:
        assert saved[key].ndim == 2 and check_nm(saved[key], 2, 4, dim=1), key
    assert SparsityTracker.load_history(tmp_path / "final")["records"] == tracker.history


@pytest.mark.parametrize("model_type,options", [("mixtral", {}), ("qwen3_moe", {}),
                                                ("mixtral", {"mask_update_interval": 4}),
                                                ("mixtral", {"transposable": True})])
def test_resume_from_checkpoint_is_exact(tmp_path, model_type, options):
    cfg = SparsityConfig(n=2, m=4, method="sr-ste", decay=0.05, **options)
    overrides = dict(max_steps=6, save_strategy="steps", save_steps=3)
    full = SparseTrainer(model=tiny_moe(model_type).train(), args=moe_args(tmp_path / "full", **overrides),
                         train_dataset=lm_rows(24), sparsity_config=cfg)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / SPARSE_STATE_FILE).is_file()
    # the checkpoint keeps the model's fused layout (the Trainer loads it unconverted on resume), and
    # plain from_pretrained still reads it
    saved = load_file(checkpoint / "model.safetensors")
    plain = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    assert any(key.endswith("experts.down_proj") for key in saved)
    assert all(torch.equal(plain[key], value) for key, value in saved.items())

    resumed_model = tiny_moe(model_type, seed=1).train()  # everything must come from the checkpoint
    resumed = SparseTrainer(model=resumed_model, args=moe_args(tmp_path / "resumed", **overrides),
                            train_dataset=lm_rows(24), sparsity_config=cfg)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    for (name, a), (_, b) in zip(iter_sparse_layers(full.model), iter_sparse_layers(resumed_model), strict=True):
        assert torch.equal(a.current_mask(), b.current_mask()) and a.nm_step == b.nm_step == 6, name
    assert expert_layers(resumed_model)
    assert resumed.sparsity_tracker.history == full.sparsity_tracker.history
    doc = SparsityTracker.load_history(tmp_path / "resumed" / HISTORY_FILE)
    assert [r["step"] for r in doc["records"]] == [2, 4, 6]


def test_resume_from_a_checkpoint_with_per_expert_weights_is_refused(tmp_path):
    """A checkpoint saved in transformers' original layout (experts.{e}.w1.weight ...), as a plain Trainer or an
    older SparseTrainer writes it: the Trainer would load it unconverted, leaving the initial experts."""
    cfg = SparsityConfig(n=2, m=4, method="sr-ste")
    args = moe_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
    SparseTrainer(model=tiny_moe("mixtral").train(), args=args, train_dataset=lm_rows(8), sparsity_config=cfg).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    config = json.loads((checkpoint / "config.json").read_text())
    rewritten = tiny_moe("mixtral")
    rewritten.load_state_dict(AutoModelForCausalLM.from_pretrained(checkpoint).state_dict())
    rewritten.save_pretrained(checkpoint)  # per expert, as save_pretrained writes a model made from its config
    (checkpoint / "config.json").write_text(json.dumps(config))  # the training record as it was
    assert any(".experts.0.w1." in key for key in load_file(checkpoint / "model.safetensors"))

    model = tiny_moe("mixtral", seed=1).train()
    trainer = SparseTrainer(model=model, args=moe_args(tmp_path / "resumed", max_steps=4), train_dataset=lm_rows(8),
                            sparsity_config=cfg)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ResumeError, match=r"checkpoint-2: it stores the expert weights in another layout"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
