"""`SparseTrainerMixin` on TRL's `SFTTrainer`: a tiny Llama and a tokenizer trained offline (no Hub)."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from nm_hf.config import SparsityConfig  # noqa: E402
from nm_hf.injection import iter_sparse_layers  # noqa: E402
from nm_hf.layers import group_dim_of  # noqa: E402
from nm_hf.masks import check_nm  # noqa: E402
from nm_hf.record import CONFIG_KEY  # noqa: E402
from nm_hf.tracker import HISTORY_FILE, TRACKER_STATE_FILE  # noqa: E402
from nm_hf.trainer import SparseTrainerMixin  # noqa: E402

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in old green trees".split()
METRICS = ("sparsity/sad", "sparsity/flip_rate", "sparsity/pruned_weight_norm", "sparsity/sparsity")


class SparseSFT(SparseTrainerMixin, trl.SFTTrainer):
    """What the docs tell TRL users to write."""


def texts(n: int = 32, length: int = 12, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (length,), generator=g).tolist())
            for _ in range(n)]


def trained_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on the corpus with `tokenizers` (offline)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts(), trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))


def sft_args(out, **overrides) -> trl.SFTConfig:
    # gradient checkpointing and bf16 stay at TRL's defaults (on): the sparse layers are recomputed in
    # backward and run under bf16 autocast
    kwargs = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=8, logging_steps=2,
                  save_strategy="no", learning_rate=1e-3, report_to="none", use_cpu=True, disable_tqdm=True,
                  max_length=32, seed=0, data_seed=0, optim="adamw_torch")
    kwargs.update(overrides)
    return trl.SFTConfig(**kwargs)


def sft_trainer(out, model=None, **overrides) -> SparseSFT:
    tokenizer = trained_tokenizer()
    model = model if model is not None else tiny_llama(len(tokenizer))
    return SparseSFT(model=model, args=sft_args(out, **overrides),
                     train_dataset=datasets.Dataset.from_dict({"text": texts()}), processing_class=tokenizer,
                     sparsity_config=SparsityConfig(n=2, m=4, method="sr-ste", decay=0.5, decay_mode="decoupled"))


def test_sft_trainer_trains_logs_metrics_and_saves_nm_weights(tmp_path):
    trainer = sft_trainer(tmp_path)
    assert sum(1 for _ in iter_sparse_layers(trainer.model)) == 14  # 2 x (q, k, v, o, gate, up, down)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in logs] == [2, 4]
    assert all(key in log for log in logs for key in METRICS)
    assert "mean_token_accuracy" in logs[0]  # TRL's own metrics are still there
    assert logs[-1]["sparsity/sparsity"] == pytest.approx(0.5)
    assert (tmp_path / HISTORY_FILE).is_file()

    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    record = getattr(reloaded.config, CONFIG_KEY)
    assert record["state"] == "finalized" and record["sparsity"] == pytest.approx(0.5)
    for name, layer in iter_sparse_layers(trainer.model):
        saved = reloaded.get_submodule(name)
        assert check_nm(saved.weight, 2, 4, dim=group_dim_of(saved)), name
        assert torch.equal(saved.weight, layer.effective_weight()), name
    assert (tmp_path / "final" / "tokenizer.json").is_file()


def test_sft_trainer_checkpoints_stay_dense_and_resume_exactly(tmp_path):
    full = sft_trainer(tmp_path / "full", save_strategy="steps", save_steps=2)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / TRACKER_STATE_FILE).is_file()
    dense = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert getattr(dense.config, CONFIG_KEY)["state"] == "training"
    assert not check_nm(dense.get_submodule("model.layers.0.mlp.up_proj").weight, 2, 4)  # pruned values kept

    resumed = sft_trainer(tmp_path / "full", save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert resumed.sparsity_tracker.history == full.sparsity_tracker.history


def test_sft_trainer_with_peft_config_and_preserve_sparsity_merges_into_nm_weights(tmp_path):
    peft = pytest.importorskip("peft")
    import nm_hf
    from nm_hf.peft import preserve_sparsity

    tokenizer = trained_tokenizer()
    base = tiny_llama(len(tokenizer))
    nm_hf.prune(base, SparsityConfig(method="fixed"), criterion="magnitude")
    # bf16=False: TRL's default bf16 wraps model.forward in autocast, and the logits are compared in float32
    trainer = trl.SFTTrainer(model=base, args=sft_args(tmp_path, learning_rate=5e-2, bf16=False),
                             train_dataset=datasets.Dataset.from_dict({"text": texts()}), processing_class=tokenizer,
                             peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    preserve_sparsity(trainer.model)
    trainer.train()
    model = trainer.model.eval()
    batch = tokenizer(texts(2, seed=1), return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
        merged = model.merge_and_unload()
        after = merged(**batch).logits
    assert torch.allclose(after, before, atol=1e-5, rtol=0)
    for name, layer in iter_sparse_layers(merged):
        assert check_nm(layer.weight, 2, 4, dim=group_dim_of(layer)), name


def test_sft_trainer_given_a_model_path_sparsifies_what_it_loads(tmp_path):
    tokenizer = trained_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "base")
    trainer = SparseSFT(model=str(tmp_path / "base"), args=sft_args(tmp_path / "out", max_steps=2),
                        train_dataset=datasets.Dataset.from_dict({"text": texts()}), processing_class=tokenizer,
                        sparsity_config=SparsityConfig(n=2, m=4, method="sr-ste", decay=0.5))
    assert sum(1 for _ in iter_sparse_layers(trainer.model)) == 14
    trainer.train()
    trainer.save_model(tmp_path / "final")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert saved.config.nm_sparsity["state"] == "finalized"
    for name in saved.config.nm_sparsity["targeted_modules"]:
        module = saved.get_submodule(name)
        assert check_nm(module.weight, 2, 4, dim=group_dim_of(module)), name


def test_the_mixin_refuses_a_peft_config_before_it_changes_the_model(tmp_path):
    peft = pytest.importorskip("peft")
    tokenizer = trained_tokenizer()
    model = tiny_llama(len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="peft_config is not supported .*nm_hf.peft.preserve_sparsity"):
        SparseSFT(model=model, args=sft_args(tmp_path), train_dataset=datasets.Dataset.from_dict({"text": texts()}),
                  processing_class=tokenizer, peft_config=peft.LoraConfig(r=4, target_modules="all-linear"),
                  sparsity_config=SparsityConfig(n=2, m=4, method="sr-ste"))
    assert not list(iter_sparse_layers(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
