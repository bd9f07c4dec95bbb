"""`nm_hf.peft.preserve_sparsity`: LoRA on N:M layers that merges without breaking the pattern."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from nm_hf.checkpoint import load_sparse  # noqa: E402
from nm_hf.config import SparsityConfig  # noqa: E402
from nm_hf.injection import SparsifyError, finalize, iter_sparse_layers, sparsify  # noqa: E402
from nm_hf.layers import group_dim_of  # noqa: E402
from nm_hf.masks import check_nm  # noqa: E402
from nm_hf.peft import MaskedLoraVariant, is_sparsity_preserving, preserve_sparsity  # noqa: E402
from tiny_models import tiny_inputs, tiny_model  # noqa: E402

LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


@pytest.fixture
def finalized_llama(tmp_path):
    """A 2:4 tiny Llama saved by nm_hf (trained dense weights pruned by SR-STE's mask, then finalized)."""
    model = finalize(sparsify(tiny_model("llama"), SparsityConfig(method="sr-ste")))
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def lora(model, targets=LLAMA_TARGETS, **overrides):
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets)
    kwargs.update(overrides)
    return get_peft_model(model, LoraConfig(**kwargs))


def train_a_few_steps(model, steps: int = 4) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-2)
    for step in range(steps):
        batch = tiny_inputs(model, batch=4, length=8, seed=step)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def logits(model, seed: int = 99) -> torch.Tensor:
    model.eval()
    return model(**tiny_inputs(model, batch=2, length=8, seed=seed)).logits


def nm_layers_hold(model, n: int = 2, m: int = 4) -> bool:
    return all(check_nm(layer.weight, n, m, dim=group_dim_of(layer)) for _, layer in iter_sparse_layers(model))


def test_trained_adapter_merges_into_exact_nm_weights_computing_the_same_logits(finalized_llama):
    model = lora(load_sparse(finalized_llama))
    assert preserve_sparsity(model) is model and is_sparsity_preserving(model)
    train_a_few_steps(model)
    deltas = [m.lora_B["default"].weight.abs().sum() for m in model.modules() if hasattr(m, "lora_B")]
    assert deltas and all(d > 0 for d in deltas)  # the adapters really trained
    before = logits(model)
    merged = model.merge_and_unload()
    assert nm_layers_hold(merged)
    assert torch.allclose(logits(merged), before, atol=1e-5, rtol=0)


def test_without_preserve_sparsity_the_merge_breaks_the_pattern(finalized_llama):
    # the contrast that makes the test above meaningful
    model = lora(load_sparse(finalized_llama))
    train_a_few_steps(model)
    assert not nm_layers_hold(model.merge_and_unload())


def test_gpt2_conv1d_layers_and_a_fixed_mask(tmp_path):
    model = sparsify(tiny_model("gpt2"), SparsityConfig(method="fixed"))  # "fixed" zeroes the pruned weights
    model = lora(model, targets=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    preserve_sparsity(model)
    train_a_few_steps(model)
    before = logits(model)
    merged = model.merge_and_unload()
    assert nm_layers_hold(merged)
    assert torch.allclose(logits(merged), before, atol=1e-5, rtol=0)


def test_merge_adapter_then_unmerge_in_eval(finalized_llama):
    """merge_adapter() writes the base weights in place: the sparse layers' cached eval weights must follow."""
    model = lora(load_sparse(finalized_llama))
    preserve_sparsity(model)
    train_a_few_steps(model)
    base = {name: layer.weight.detach().clone() for name, layer in iter_sparse_layers(model)}
    before = logits(model)
    model.merge_adapter()
    assert nm_layers_hold(model)
    assert torch.allclose(logits(model), before, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    for name, layer in iter_sparse_layers(model):
        assert torch.allclose(layer.weight, base[name], atol=1e-6, rtol=0), name
        assert check_nm(layer.weight, 2, 4, dim=group_dim_of(layer))
    assert torch.allclose(logits(model), before, atol=1e-5, rtol=0)


def test_adapter_saves_and_reloads_onto_a_load_sparse_model(finalized_llama, tmp_path):
    model = lora(load_sparse(finalized_llama))
    preserve_sparsity(model)
    train_a_few_steps(model)
    before = logits(model)
    model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(load_sparse(finalized_llama), tmp_path / "adapter")
    assert not is_sparsity_preserving(reloaded)  # the adapter files are plain LoRA: call it again
    preserve_sparsity(reloaded)
    assert torch.allclose(logits(reloaded), before, atol=1e-6, rtol=0)
    merged = reloaded.merge_and_unload()
    assert nm_layers_hold(merged)
    assert torch.allclose(logits(merged), before, atol=1e-5, rtol=0)


def _variants(model) -> list:
    return [v for m in model.modules() for v in getattr(m, "lora_variant", {}).values()]


def test_dense_training_weights_are_refused_and_nothing_changes():
    model = lora(sparsify(tiny_model("llama"), SparsityConfig(method="sr-ste")))
    with pytest.raises(ValueError, match=r"(?s)nothing was changed.*non-zero pruned entries.*'sr-ste'.*nm_hf\.prune"
                                         r".*'base_model\.model\.model\.layers\.0\.self_attn\.q_proj', .* and 7 more"):
        preserve_sparsity(model)
    assert _variants(model) == []


def test_plainly_loaded_finalized_model_names_load_sparse(finalized_llama):
    model = lora(AutoModelForCausalLM.from_pretrained(finalized_llama))
    with pytest.raises(ValueError, match=r"no LoRA adapter .* sits on an N:M layer.*nm_hf\.load_sparse\(path\)"):
        preserve_sparsity(model)


def test_dora_is_refused_and_nothing_changes(finalized_llama):
    model = lora(load_sparse(finalized_llama), use_dora=True)
    with pytest.raises(ValueError, match=r"LoRA variant \(DoraLinearVariant, e\.g\. DoRA\)"):
        preserve_sparsity(model)
    assert not any(isinstance(v, MaskedLoraVariant) for v in _variants(model))


def test_merged_adapter_is_refused(finalized_llama):
    model = lora(load_sparse(finalized_llama))
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged adapters: call unmerge_adapter\(\) first: 'base_model"):
        preserve_sparsity(model)


# --------------------------------------------------------------------------- sparsify on a PEFT model


def test_sparsify_all_linear_skips_the_adapter_layers():
    model = lora(tiny_model("llama"), modules_to_save=["down_proj"])
    sparsify(model, SparsityConfig())
    sparse = [name for name, _ in iter_sparse_layers(model)]
    assert sparse and not [n for n in sparse if ".lora_" in n or ".modules_to_save." in n]
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in sparse  # the layer under the adapter
    assert "base_model.model.model.layers.0.self_attn.k_proj" in sparse  # a layer without adapter


def test_sparsify_never_converts_a_modules_to_save_original_whose_copy_would_train_dense():
    """PEFT's modules_to_save wrapper runs its trainable copy: a sparse original only ran with the adapters
    disabled, while the copy trained and merged dense (all-linear used to convert it, silently)."""
    model = lora(tiny_model("llama"), targets=["q_proj"], modules_to_save=["down_proj"])
    sparsify(model, SparsityConfig(method="fixed"))
    assert not [n for n, _ in iter_sparse_layers(model) if "down_proj" in n]
    model = lora(tiny_model("llama"), targets=["q_proj"], modules_to_save=["down_proj"])
    with pytest.raises(SparsifyError, match=r"(?s)not modified.*down_proj\.original_module' is in PEFT's "
                                            r"modules_to_save .*sparsify the base model before get_peft_model"):
        sparsify(model, SparsityConfig(method="fixed", target_modules=r".*down_proj\.original_module"))
    assert not list(iter_sparse_layers(model))


def test_naming_an_adapted_layer_on_a_peft_model_points_at_its_base_layer():
    model = lora(tiny_model("llama"), targets=["q_proj"])
    with pytest.raises(SparsifyError, match=r"matched 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj', a "
                                            r"PEFT Linear adapter layer: name the layer under it \('base_model.*"
                                            r"q_proj\.base_layer'\)"):
        sparsify(model, SparsityConfig(target_modules=["q_proj"]))
    sparsify(model, SparsityConfig(method="fixed", target_modules=["q_proj.base_layer"]))
    assert len(list(iter_sparse_layers(model))) == 2


def test_lora_beside_the_nm_layers_is_named_as_such(finalized_llama):
    base = load_sparse(finalized_llama)
    with pytest.raises(ValueError, match=r"has N:M layers but no LoRA layer: add the adapter first"):
        preserve_sparsity(base)
    with pytest.raises(ValueError, match=r"the LoRA layers \('base_model\.model\.lm_head'\) sit on none of them"):
        preserve_sparsity(lora(base, targets=["lm_head"]))


def test_lora_on_dense_method_layers_names_the_method_not_a_plain_load():
    model = lora(sparsify(tiny_model("llama"), SparsityConfig(method="dense")))
    with pytest.raises(ValueError, match=r"its sparse layers use method 'dense', whose forward is dense"):
        preserve_sparsity(model)
    assert not _variants(model)


@pytest.mark.parametrize("selector", [("q_proj.lora_A.default",), r".*\.lora_B\.default"])
def test_sparsify_refuses_adapter_layers_named_explicitly_and_leaves_the_model_alone(selector):
    model = lora(tiny_model("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SparsifyError, match=r"(?s)the model was not modified.*lora_[AB] of the PEFT Linear "
                                            r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj', a PEFT adapter "
                                            r"layer: sparsify the base model before adding adapters"):
        sparsify(model, SparsityConfig(target_modules=selector))
    assert not list(iter_sparse_layers(model))
    assert getattr(model.config, "nm_sparsity", None) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- LoRA on expert Parameters


def tiny_mixtral():
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model("mixtral", vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  head_dim=8, max_position_embeddings=64, num_key_value_heads=2, intermediate_size=16,
                                  num_local_experts=4, num_experts_per_tok=2)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("sparsify_first", [True, False])
def test_lora_on_nm_expert_parameters_is_refused_with_the_reason(sparsify_first):
    """PEFT's LoRA on a Parameter (target_parameters) parametrizes it, which would replace the masked weight:
    the forward says so (not a KeyError), and preserve_sparsity does not pass it as N:M-preserving."""
    config = SparsityConfig(method="fixed")
    lora_config = LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"],
                             init_lora_weights=False)
    model = tiny_mixtral()
    if sparsify_first:
        sparsify(model, config)
    model = get_peft_model(model, lora_config)
    if not sparsify_first:
        sparsify(model, config)
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r"'gate_up_proj' are reparametrized .*target_parameters"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"LoRA on N:M expert Parameters \(target_parameters\).*mlp\.experts'"):
        preserve_sparsity(model)
    assert not is_sparsity_preserving(model)
    assert not any(m.lora_variant for m in model.modules() if isinstance(m, peft.tuners.lora.Linear))
