"""Mixture-of-experts expert weights (fused 3-D Parameters) as a layer kind."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from test_injection import assert_unchanged, refuse, snapshot
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import nm_hf
from nm_hf.checkpoint import inspect_checkpoint
from nm_hf.config import SparsityConfig
from nm_hf.injection import SparsifyError, baked_weights
from nm_hf.layers import ExpertWeight
from nm_hf.masks import check_nm, nm_group_counts, nm_mask
from nm_hf.record import record_weight_keys
from tiny_models import train_steps

COMMON = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8,
          "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
MOE = {
    "qwen3_moe": {"num_key_value_heads": 2, "moe_intermediate_size": 16, "intermediate_size": 64, "num_experts": 4,
                  "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "mixtral": {"num_key_value_heads": 2, "intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_key_value_heads": 2, "intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
                "layer_types": None, "sliding_window": 8},
    "deepseek_v3": {"num_key_value_heads": 4, "intermediate_size": 64, "moe_intermediate_size": 16,
                    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
                    "n_group": 1, "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 8},
    "llama4_text": {"num_key_value_heads": 2, "intermediate_size": 16, "intermediate_size_mlp": 64,
                    "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
                    "layer_types": None, "attention_chunk_size": 8, "no_rope_layers": None},
}
#: experts stored [E, in, out]: the input is dim 1
TRANSPOSED = {"gpt_oss", "llama4_text"}
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def tiny_moe(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **COMMON, **MOE[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(seed))


def experts(model) -> dict[str, ExpertWeight]:
    return {name: layer for name, layer in nm_hf.iter_sparse_layers(model) if isinstance(layer, ExpertWeight)}


def finalized_then_reloaded_plain(model: nn.Module, ids: torch.Tensor, logits: torch.Tensor, directory) -> nn.Module:
    """`model` (sparse, eval) finalized computes `logits` exactly; saved to `directory`, plain transformers loads it
    back (no nm_hf) computing them too. Returns the plain model."""
    nm_hf.finalize(model)
    assert not nm_hf.is_sparsified(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)
    model.save_pretrained(directory)
    plain = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        # not bit-equal: the same weights in other memory (the loaded file) can take another summation order
        torch.testing.assert_close(plain(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-6)
    return plain


def assert_reloads_sparse(directory, names: list[str], ids: torch.Tensor, logits: torch.Tensor) -> None:
    """The saved checkpoint inspects as N:M with every expert weight in `names`, and `load_sparse` gives back a
    sparse model with those expert weights computing `logits`."""
    inspected, _ = inspect_checkpoint(directory)
    assert inspected.nm_ok and {row.name for row in inspected.layers} >= set(names)
    reloaded = nm_hf.load_sparse(directory).eval()
    assert sorted(experts(reloaded)) == sorted(names)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)



def expert_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.ndim == 3 and ".experts." in name]


@pytest.mark.parametrize("model_type", list(MOE))
def test_all_linear_targets_every_expert_weight_along_its_input(model_type):
    model = tiny_moe(model_type)
    keys = list(model.state_dict())
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4))
    layers = experts(model)
    assert sorted(layers) == sorted(expert_names(model)) and layers
    assert list(model.state_dict()) == keys  # same state-dict keys as the dense model
    dim = 1 if model_type in TRANSPOSED else 2
    record = model.config.nm_sparsity
    for name, layer in layers.items():
        assert layer.group_dim == dim and record["group_dims"][name] == dim
        assert check_nm(layer.effective_weight(), 2, 4, dim=dim), name
    assert set(record["parameter_targets"]) == set(layers)
    assert record_weight_keys(record)[next(iter(layers))] == next(iter(layers))
    targeted = set(record["targeted_modules"])
    assert not any(name.endswith((".gate", ".router")) for name in targeted)  # routers stay dense
    if model_type == "deepseek_v3":  # shared experts are plain linears; the first layer is dense
        assert "model.layers.1.mlp.shared_experts.gate_proj" in targeted
        assert "model.layers.0.mlp.gate_proj" in targeted and not any("layers.0" in n for n in layers)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "llama4_text"])
def test_group_dim_of_an_experts_module_and_an_expert_weight_is_their_input(model_type):
    from nm_hf.layers import group_dim_of

    model = tiny_moe(model_type)
    dim = 1 if model_type in TRANSPOSED else 2
    owner = next(module for name, module in model.named_modules() if name.endswith("experts"))
    assert group_dim_of(owner) == dim  # dense: the layout alone says it
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4))
    for name, layer in experts(model).items():
        assert group_dim_of(layer) == group_dim_of(layer.owner) == layer.group_dim == dim, name
        assert check_nm(layer.effective_weight(), 2, 4, dim=group_dim_of(layer)), name


def test_experts_named_or_excluded():
    model = tiny_moe("qwen3_moe")
    nm_hf.sparsify(model, SparsityConfig(target_modules=["experts"]))
    assert sorted(n for n, _ in nm_hf.iter_sparse_layers(model)) == sorted(expert_names(model))
    model = tiny_moe("qwen3_moe")
    nm_hf.sparsify(model, SparsityConfig(target_modules=["layers.0.mlp.experts.down_proj"]))
    assert [n for n, _ in nm_hf.iter_sparse_layers(model)] == ["model.layers.0.mlp.experts.down_proj"]
    model = tiny_moe("qwen3_moe")
    nm_hf.sparsify(model, SparsityConfig(exclude_modules=["experts"]))
    assert not experts(model) and nm_hf.is_sparsified(model)
    model = tiny_moe("qwen3_moe")
    nm_hf.sparsify(model, SparsityConfig(target_modules=r".*experts\.gate_up_proj"))
    assert sorted(experts(model)) == [n for n in sorted(expert_names(model)) if n.endswith("gate_up_proj")]


def test_refusals_leave_the_model_untouched():
    model = tiny_moe("qwen3_moe")
    refuse(model, SparsityConfig(n=2, m=32, target_modules=["experts"]), "not divisible by m=32")
    refuse(model, SparsityConfig(target_modules=["experts"], exclude_modules=["experts"]), "no layer left")
    nm_hf.sparsify(model, SparsityConfig(target_modules=["layers.0.mlp.experts"]))
    before = snapshot(model)
    with pytest.raises(SparsifyError, match="already has sparse layers"):
        nm_hf.sparsify(model, SparsityConfig(target_modules=["experts"]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("model_type", list(MOE))
def test_every_experts_implementation_sees_the_masked_weights(model_type):
    model = tiny_moe(model_type)
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4))
    ids = token_ids()
    reference = tiny_moe(model_type)
    reference.load_state_dict({**model.state_dict(), **baked_weights(model)})
    outputs = {}
    for implementation in IMPLEMENTATIONS:
        if model_type == "llama4_text" and implementation != "eager":
            continue  # Llama4TextExperts is not decorated: one implementation
        if implementation != "eager":
            model.set_experts_implementation(implementation)
            reference.set_experts_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = model(input_ids=ids).logits
            torch.testing.assert_close(outputs[implementation], reference(input_ids=ids).logits)
        model.train()  # the training path (autograd-aware masked weight) gives the same logits
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits.detach(), outputs[implementation])
        logits.float().pow(2).mean().backward()
        model.eval()
    for logits in outputs.values():
        torch.testing.assert_close(logits, outputs["eager"], rtol=1e-4, atol=1e-4)
    assert all(layer.weight.grad is not None for layer in experts(model).values())


@pytest.mark.parametrize("method", ["sr-ste", "ste", "fixed", "dense"])
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_gradient_formula_on_an_expert_tensor(method, model_type):
    model = tiny_moe(model_type)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    dense = model.get_parameter(name).detach().clone()
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4, method=method, decay=0.3))
    layer = experts(model)[name]
    dim = layer.group_dim
    weight = layer.weight.detach().clone()  # "fixed" zeroed its pruned weights
    mask = nm_mask(dense, 2, 4, dim=dim)
    assert torch.equal(layer.current_mask(), mask)
    model.train()
    ids = token_ids()
    model(input_ids=ids).logits.float().pow(2).mean().backward()

    # reference: the same model computing with plain tensors W' (the N:M weights) in place of the sparse ones
    reference = tiny_moe(model_type).train()
    reference.load_state_dict({**model.state_dict(), **baked_weights(model)})
    reference.get_parameter(name).grad = None
    reference(input_ids=ids).logits.float().pow(2).mean().backward()
    grad_w_prime = reference.get_parameter(name).grad
    expected = {"ste": grad_w_prime, "dense": grad_w_prime, "sr-ste": grad_w_prime + 0.3 * weight * ~mask,
                "fixed": grad_w_prime * mask}[method]
    torch.testing.assert_close(layer.weight.grad, expected)


def _expert_grads(model, ids, capture: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
    """Logits and gradients of one training step, and whether the memory of the `W * mask` tensor the
    experts forward computed with was still held between forward and backward."""
    module = model.model.layers[0].mlp.experts
    seen = []  # the tensor the experts implementation reads, taken mid-forward (its activation runs inside it)
    hook = module.act_fn.register_forward_pre_hook(lambda *_: seen.append(module.gate_up_proj))
    try:
        output = model(input_ids=ids, labels=ids)
    finally:
        hook.remove()
    assert seen and seen[0] is not module.gate_up_proj  # it computed with a masked tensor, not the Parameter
    storage = weakref.ref(seen[0].untyped_storage())
    seen.clear()
    alive = storage() is not None
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return output.logits.detach(), grads, alive


@pytest.mark.usefixtures("one_thread")  # batched_mm's index backward accumulates in a thread-dependent order
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", ["sr-ste", "fixed"])
def test_masked_expert_weights_are_recomputed_in_backward_not_saved(implementation, method):
    # grouped_mm / eager save the tensor they compute with (or per-expert views of it): a full W * mask copy of
    # every expert weight used to live from forward to backward; backward now recomputes it, bit for bit
    model = tiny_moe("mixtral").train()
    model.set_experts_implementation(implementation)
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4, method=method, decay=0.3))
    ids = token_ids()
    logits, grads, alive = _expert_grads(model, ids)
    assert not alive
    # under other saved-tensor hooks the sparse experts stand aside and the copy is saved as before:
    # the same logits and gradients, bit for bit
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t):
        saved_logits, saved_grads, alive = _expert_grads(model, ids)
    assert alive or implementation == "batched_mm"  # batched_mm gathers per-token copies: nothing to keep
    assert torch.equal(logits, saved_logits)
    assert grads.keys() == saved_grads.keys() and all(torch.equal(grads[n], saved_grads[n]) for n in grads)
    model.gradient_checkpointing_enable()  # non-reentrant checkpointing: hooks of its own around each layer
    checkpointed_logits, checkpointed, _ = _expert_grads(model, ids)
    assert torch.equal(logits, checkpointed_logits)
    assert all(torch.equal(grads[n], checkpointed[n]) for n in grads)


def test_writing_an_expert_weight_between_forward_and_backward_is_refused():
    model = tiny_moe("mixtral").train()
    model.set_experts_implementation("grouped_mm")
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4))
    ids = token_ids()
    loss = model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj.mul_(2)
    with pytest.raises(RuntimeError, match=r"MixtralExperts\.down_proj: the expert weight or its mask was modified"):
        loss.backward()


def test_mask_cache_follows_optimizer_steps_and_decoupled_decay():
    model = tiny_moe("mixtral")
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4, decay=0.5, decay_mode="decoupled"))
    layer = next(iter(experts(model).values()))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = layer.current_mask().clone()
    model(input_ids=token_ids()).logits.float().pow(2).mean().backward()
    optimizer.step()
    stepped = layer.weight.detach().clone()
    assert not torch.equal(stepped * before, stepped * ~before)
    assert torch.equal(layer.current_mask(), nm_mask(stepped, 2, 4, dim=layer.group_dim))  # recomputed
    nm_hf.after_optimizer_step(model, 1.0)
    mask = nm_mask(stepped, 2, 4, dim=layer.group_dim)
    torch.testing.assert_close(layer.weight.detach(), stepped - 0.5 * stepped * ~mask)


@pytest.mark.parametrize("model_type", list(MOE))
def test_finalize_save_plain_reload_compressed_and_inspect(model_type, tmp_path):
    model = tiny_moe(model_type)
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4))
    tracker = nm_hf.SparsityTracker(model)
    masks = {name: layer.current_mask().clone() for name, layer in nm_hf.iter_sparse_layers(model)}
    model.train()
    train_steps(model, 2, lr=0.05, tracker=tracker, call_hook=False,
                loss=lambda m: m(input_ids=token_ids()).logits.float().pow(2).mean())
    metrics = tracker.log_metrics(2)
    expected = sum(int((masks[name] != layer.current_mask()).sum()) for name, layer in nm_hf.iter_sparse_layers(model))
    assert metrics["sparsity/sad"] == expected
    model.eval()
    ids = token_ids(1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nm_hf.finalize(model)
    assert not nm_hf.is_sparsified(model)
    owners = {name.rsplit(".", 1)[0] for name in model.config.nm_sparsity["parameter_targets"]}
    assert owners and not any("Sparse" in type(model.get_submodule(owner)).__name__ for owner in owners)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)
    model.save_pretrained(tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        # not bit-equal: the same weights in other memory (the loaded file) can take another summation order
        torch.testing.assert_close(plain(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-6)
    assert nm_hf.sparsity_report(plain).nm_ok

    report, _ = inspect_checkpoint(tmp_path / "plain")  # the per-expert layout on disk
    assert report.nm_ok and report.total_numel == nm_hf.sparsity_report(plain).total_numel
    if model_type == "mixtral":  # saved as experts.{e}.w1/w2/w3 [out, in]: N:M along dim 1 of each
        rows = {row.name: row for row in report.layers}
        assert "model.layers.0.block_sparse_moe.experts.3.w1" in rows
        from safetensors.torch import load_file

        saved = load_file(tmp_path / "plain" / "model.safetensors")
        for e in range(4):
            for w in ("w1", "w2", "w3"):
                assert check_nm(saved[f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"], 2, 4, dim=1)

    reloaded = nm_hf.load_sparse(tmp_path / "plain").eval()
    assert sorted(experts(reloaded)) == sorted(expert_names(reloaded))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)

    nm_hf.save_compressed(model, tmp_path / "compressed")
    restored = nm_hf.load_compressed(tmp_path / "compressed").eval()
    for (key, value), (key2, value2) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        assert key == key2 and torch.equal(value, value2), key
    report, _ = inspect_checkpoint(tmp_path / "compressed")
    assert report.nm_ok and report.total_numel == nm_hf.sparsity_report(plain).total_numel


def test_semi_structured_leaves_experts_and_convs_dense_and_lists_them():
    from nm_hf.semi_structured import check_semi_structured, describe

    model = tiny_moe("qwen3_moe").half()
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4))
    problems = check_semi_structured(model, assume_cuda=True)
    assert not any(".experts." in problem for problem in problems)  # only 2-D linears are checked
    listed = describe(model)["left_dense"]
    assert sorted(listed) == sorted(expert_names(model)) and "3-D weight" in next(iter(listed.values()))
    nm_hf.finalize(model)
    assert sorted(describe(model)["left_dense"]) == sorted(expert_names(model))


class ToyExperts(nn.Module):
    """Experts in a layout nm_hf has none for: 3-D Parameters `w_in` `[E, ffn, hidden]` and `w_out`
    `[E, hidden, ffn]`, names no table lists, read by this forward (Mixtral's experts call signature)."""

    def __init__(self, num_experts: int = 4, hidden: int = 32, ffn: int = 16) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w_in = nn.Parameter(torch.randn(num_experts, ffn, hidden) * 0.1)
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, ffn) * 0.1)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            h = torch.nn.functional.silu(torch.nn.functional.linear(hidden_states[token], self.w_in[e]))
            out.index_add_(0, token, torch.nn.functional.linear(h, self.w_out[e]) * top_k_weights[token, slot, None])
        return out


#: the synthetic unsupported layout: (experts class, an experts module, its expert weights)
UNSUPPORTED = ("ToyExperts", "model.layers.0.mlp.experts", ["w_in", "w_out"])


def toy_experts_model(seed: int = 0):
    """A tiny Mixtral whose experts modules are `ToyExperts`, built before sparsify (nothing real triggers it)."""
    model = tiny_moe("mixtral", seed)
    for layer in model.model.layers:
        layer.mlp.experts = ToyExperts()
    return model


def expert_notices(caplog) -> list[str]:
    return [message for message in caplog.messages if "layout nm_hf" in message]


def test_toy_experts_compute_what_their_parameters_say():
    """The synthetic experts are a real part of the model: their weights change its output."""
    model, ids = toy_experts_model(), token_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.model.layers[0].mlp.experts.w_in.mul_(2)
        assert not torch.equal(model(input_ids=ids).logits, before)


def test_experts_in_an_unsupported_layout_stay_dense_with_one_notice(caplog, tmp_path):
    """3-D expert weights under names nm_hf has no layout for (`ToyExperts.w_in`): "all-linear" says so once per
    experts class (not once per tensor), records them as left dense, and the model card does not call the
    experts sparse."""
    import logging

    from nm_hf.card import write_model_card
    from nm_hf.layers.experts import unsupported_experts

    cls, module, params = UNSUPPORTED
    model = toy_experts_model()
    assert unsupported_experts(model) == {f"model.layers.{i}.mlp.experts": params for i in range(2)}
    with caplog.at_level(logging.WARNING, logger="nm_hf.injection"):
        nm_hf.sparsify(model, SparsityConfig(n=2, m=4))
    notices = expert_notices(caplog)
    assert len(notices) == 1, caplog.messages
    more = sum(1 for _, m in model.named_modules() if type(m).__name__ == cls) - 1
    assert more == 1
    assert f"{cls} experts {module!r} (+{more} more) left dense: Parameters {', '.join(params)} " in notices[0]
    record = model.config.nm_sparsity
    names = [f"{module}.{param}" for param in params]
    assert not set(names) & set(record["targeted_modules"]) and record["targeted_modules"]
    assert not experts(model) and "parameter_targets" not in record
    assert set(names) <= set(record["ignored_modules"])
    assert all(cls in record["ignored_reasons"][name] for name in names)
    nm_hf.finalize(model)
    assert type(model.get_submodule(module)) is ToyExperts
    model.save_pretrained(tmp_path)
    text = str(write_model_card(tmp_path, model=model))
    assert "(not its mixture-of-experts expert weights, which stay dense)" in text


def test_naming_experts_in_an_unsupported_layout_says_why():
    """Naming such an experts module explicitly: the error names the layout problem, not just 'not a linear'."""
    cls, module, params = UNSUPPORTED
    refuse(toy_experts_model(), SparsityConfig(target_modules=[module]), repr(module), f"{cls} experts",
           ", ".join(params), "layout nm_hf has none for")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_supported_experts_give_no_layout_notice(model_type, caplog):
    import logging

    if model_type == "qwen2_moe":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "qwen2_moe", **COMMON, num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
            mlp_only_layers=[]))
    else:
        model = tiny_moe(model_type)
    with caplog.at_level(logging.WARNING, logger="nm_hf.injection"):
        nm_hf.sparsify(model, SparsityConfig(n=2, m=4))
    assert not expert_notices(caplog) and "ignored_reasons" not in model.config.nm_sparsity
    assert experts(model)


@pytest.mark.parametrize("exclude", [None, ["experts"]])
def test_model_card_says_whether_the_expert_weights_are_sparse(tmp_path, exclude):
    from nm_hf.card import write_model_card

    model = tiny_moe("mixtral")
    nm_hf.finalize(nm_hf.sparsify(model, SparsityConfig(n=2, m=4, exclude_modules=exclude)))
    model.save_pretrained(tmp_path)
    text = str(write_model_card(tmp_path))  # read from the files: the per-expert layout on disk
    if exclude is None:
        assert "whose linear layers, mixture-of-experts expert weights included, are **2:4 sparse**" in text
        assert "| targeted layers | 8 layers and 4 MoE expert weight tensors (" in text
    else:
        assert "whose linear layers (not its mixture-of-experts expert weights, which stay dense) are" in text
        assert "`model.layers.1.mlp.experts.down_proj`" in text.split("| layers left dense |", 1)[1].split("\n")[0]


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_transposable_masks_per_expert_through_training_save_and_reload(model_type, tmp_path):
    from nm_hf.masks import nm_mask_transposable

    model = tiny_moe(model_type).train()
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4, transposable=True, target_modules=["experts"]))
    layers = experts(model)
    loss = lambda m: m(input_ids=token_ids()).logits.float().pow(2).mean()  # noqa: E731
    train_steps(model, 2, loss=loss)
    for name, layer in layers.items():  # every expert's m x m blocks: N:M along its rows and its columns
        weight = layer.weight.detach()
        assert torch.equal(layer.current_mask(), nm_mask_transposable(weight, 2, 4, dim=layer.group_dim)), name
        assert check_nm(layer.effective_weight(), 2, 4, dim=1) and check_nm(layer.effective_weight(), 2, 4, dim=2)
    nm_hf.finalize(model)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name in layers:
        weight = plain.get_parameter(name)
        assert check_nm(weight, 2, 4, dim=1) and check_nm(weight, 2, 4, dim=2), name


def test_transposable_refuses_an_output_size_not_divisible_by_m():
    """Refused by sparsify (model untouched), not by the first forward's mask computation."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("mixtral", **{**COMMON, **MOE["mixtral"], "intermediate_size": 17})
    model = AutoModelForCausalLM.from_config(config)  # gate_up_proj [4, 34, 32]: 34 output rows
    refuse(model, SparsityConfig(n=2, m=4, transposable=True, target_modules=r".*experts\.gate_up_proj"),
           r"'model.layers.0.mlp.experts.gate_up_proj' has 34 output features, not divisible by m=4")
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4, target_modules=r".*experts\.gate_up_proj"))  # fine without
    from tiny_models import tiny_model

    llama = tiny_model("llama", num_key_value_heads=1, head_dim=6)  # k_proj: 6 output features (same check)
    refuse(llama, SparsityConfig(transposable=True, target_modules=["k_proj"]), "k_proj' has 6 output features")


def test_mask_update_interval_on_expert_tensors():
    k = 3
    model = tiny_moe("mixtral").train()
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4, method="sr-ste", mask_update_interval=k, decay=0.5,
                                         target_modules=["experts"]))
    layers = experts(model)
    initial = {name: layer.current_mask().clone() for name, layer in layers.items()}
    used = []

    def record() -> None:
        used.append({name: (layer.current_mask().clone(), nm_mask(layer.weight.detach(), 2, 4, dim=layer.group_dim))
                     for name, layer in layers.items()})

    train_steps(model, 6, lr=0.5, loss=lambda m: m(input_ids=token_ids()).logits.float().pow(2).mean(),
                on_step=record)
    history = [initial, *({n: mask for n, (mask, _) in step.items()} for step in used)]
    for step in range(1, 7):
        for name in layers:
            mask, fresh = used[step - 1][name]
            if step % k:
                assert torch.equal(mask, history[step - 1][name]), f"{name} moved at step {step}"
            else:
                assert torch.equal(mask, fresh), f"{name}: no refresh at step {step}"
    assert any(not torch.equal(history[k][n], initial[n]) for n in layers)  # the masks did move, at step k
    assert any(not torch.equal(mask, fresh) for step in used[:k - 1] for mask, fresh in step.values())  # lagging


def test_loading_expert_weights_gives_a_periodic_mask_of_their_own():
    model = tiny_moe("mixtral").train()
    config = SparsityConfig(method="sr-ste", mask_update_interval=5, target_modules=["experts"])
    nm_hf.sparsify(model, config)
    layers = experts(model)
    stale = {name: layer.current_mask().clone() for name, layer in layers.items()}
    other = tiny_moe("mixtral", seed=1)
    nm_hf.sparsify(other, config)
    model.load_state_dict(other.state_dict())
    for name, layer in layers.items():
        assert torch.equal(layer.current_mask(), nm_mask(layer.weight.detach(), 2, 4, dim=layer.group_dim)), name
        assert not torch.equal(layer.current_mask(), stale[name]), name


#: DBRX: `DbrxExperts.forward` reads its child `mlp`'s w1, v1, w2 `[E * ffn, hidden]` as `.view(E, ffn, hidden)[e]`
DBRX = {"vocab_size": 96, "d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 64,
        "attn_config": {"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},  # clip_qkv=None fails in transformers
        "ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2}}
#: input dim of each DBRX expert weight: `x @ w1_e.T`, `x @ v1_e.T`, `h @ w2_e`
DBRX_DIMS = {"w1": 1, "v1": 1, "w2": 0}


def tiny_dbrx(seed: int = 0, **ffn):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("dbrx", **{**DBRX, "ffn_config": {**DBRX["ffn_config"], **ffn}})
    return AutoModelForCausalLM.from_config(config).eval()


def dbrx_expert_calls(model) -> list[dict[str, torch.Tensor]]:
    """Records the per-expert matrices every `DbrxExpertGLU` call computes with (its w1, v1, w2 arguments)."""
    calls: list[dict[str, torch.Tensor]] = []
    for module in model.modules():
        if type(module).__name__ == "DbrxExpertGLU":
            module.register_forward_pre_hook(
                lambda _, args: calls.append({"w1": args[1].detach(), "v1": args[2].detach(), "w2": args[3].detach()}))
    return calls


def test_dbrx_stacked_experts_train_n_m_per_expert_finalize_and_reload_plain(tmp_path):
    """DBRX's expert weights are N:M per expert along their input dims (w1/v1 dim 1, w2 dim 0 inside each expert's
    ffn rows), under the same Parameter names: what `DbrxExperts.forward` computes with in training, baked by
    finalize, loaded back by plain transformers."""
    from nm_hf.layers.experts import unsupported_experts

    model = tiny_dbrx()
    keys = list(model.state_dict())
    assert not unsupported_experts(model)
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4))
    layers = experts(model)
    names = [f"transformer.blocks.{b}.ffn.experts.mlp.{w}" for b in range(2) for w in DBRX_DIMS]
    record = model.config.nm_sparsity
    assert sorted(layers) == sorted(names) and set(record["parameter_targets"]) == set(names)
    assert list(model.state_dict()) == keys and "ignored_reasons" not in record
    for name, layer in layers.items():
        assert layer.group_dim == record["group_dims"][name] == DBRX_DIMS[name.rsplit(".", 1)[1]], name
        assert layer.weight is model.get_parameter(name)

    model.train()
    calls = dbrx_expert_calls(model)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    train_steps(model, 2, lr=0.05, loss=lambda m: m(input_ids=token_ids()).logits.float().pow(2).mean())
    assert calls  # every expert matrix the forward used: 2:4 along its input, N:M groups inside one expert
    for call in calls:
        for w, tensor in call.items():
            assert check_nm(tensor, 2, 4, dim=DBRX_DIMS[w]), w
    for name, layer in layers.items():
        weight = layer.weight.detach()
        assert not torch.equal(weight, before[name]), name
        assert torch.equal(layer.current_mask(), nm_mask(weight, 2, 4, dim=layer.group_dim)), name
        per_expert = layer.effective_weight().view(4, 16, 32)
        assert all(check_nm(matrix, 2, 4, dim=layer.group_dim) for matrix in per_expert), name

    model.eval()
    calls.clear()
    ids = token_ids(1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    effective = {name: layer.effective_weight().view(4, 16, 32) for name, layer in layers.items()}
    first = "transformer.blocks.0.ffn.experts.mlp."
    assert any(torch.equal(calls[0]["w1"], effective[first + "w1"][e]) for e in range(4))  # the masked weights
    plain = finalized_then_reloaded_plain(model, ids, logits, tmp_path / "plain")
    assert type(model.get_submodule(first[:-5])).__name__ == "DbrxExperts"
    for name in names:
        weight = plain.get_parameter(name).detach()
        assert torch.equal(weight, effective[name].reshape(64, 32)), name
        assert all(check_nm(matrix, 2, 4, dim=DBRX_DIMS[name.rsplit(".", 1)[1]]) for matrix in weight.view(4, 16, 32))
    report = nm_hf.sparsity_report(plain)
    assert report.nm_ok and {row.name for row in report.layers} >= set(names)
    assert_reloads_sparse(tmp_path / "plain", names, ids, logits)


def test_dbrx_groups_never_straddle_two_experts():
    """ffn 6 rows per expert: w2's 24 rows hold groups of 4, but some would span two experts, so it is refused."""
    model = tiny_dbrx(ffn_hidden_size=6)
    refuse(model, SparsityConfig(n=2, m=4, target_modules=["experts.mlp.w2"]),
           "the input size of every targeted layer (6) is not divisible by m=4")
    refuse(model, SparsityConfig(n=2, m=4, target_modules=["experts.mlp"]),  # the Parameters' owner selects them
           "'transformer.blocks.0.ffn.experts.mlp.w2' has 6 input features, not divisible by m=4")
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4, target_modules=r".*experts\.mlp\.[wv]1"))
    assert sorted(n.rsplit(".", 1)[1] for n in experts(model)) == ["v1", "v1", "w1", "w1"]


def test_loading_dbrx_expert_weights_gives_a_periodic_mask_of_their_own():
    """The state dict reaches the weights through their owner `mlp`, a child of the sparse experts module."""
    config = SparsityConfig(method="sr-ste", mask_update_interval=5, target_modules=["experts"])
    model = nm_hf.sparsify(tiny_dbrx().train(), config)
    layers = experts(model)
    stale = {name: layer.current_mask().clone() for name, layer in layers.items()}
    other = nm_hf.sparsify(tiny_dbrx(seed=1), config)
    model.load_state_dict(other.state_dict())
    for name, layer in layers.items():
        assert torch.equal(layer.current_mask(), nm_mask(layer.weight.detach(), 2, 4, dim=layer.group_dim)), name
        assert not torch.equal(layer.current_mask(), stale[name]), name


def test_semi_structured_leaves_the_dbrx_experts_dense():
    """DBRX's expert weights are 2-D but sliced by `DbrxExperts.forward`, not linear weights: listed as left dense."""
    from nm_hf.semi_structured import describe

    model = nm_hf.sparsify(tiny_dbrx().half(), SparsityConfig(n=2, m=4))
    listed = describe(model)["left_dense"]
    assert sorted(listed) == sorted(experts(model)) and "sliced per expert" in next(iter(listed.values()))
    names = sorted(listed)
    nm_hf.finalize(model)
    assert sorted(describe(model)["left_dense"]) == names


#: JetMoE: `JetMoeParallelExperts.weight` `[E, out, in]`, read by its own forward as `F.linear(x, self.weight[e])`,
#: in the MoE MLP (`mlp.input_linear` / `output_linear`) and the mixture-of-attention (`self_attention.experts`)
JETMOE = {**COMMON, "num_key_value_heads": 2, "kv_channels": 8, "intermediate_size": 16, "num_local_experts": 4,
          "num_experts_per_tok": 2}
JETMOE_EXPERTS = [f"model.layers.{i}.{block}.{linear}.weight" for i in range(2)
                  for block in ("mlp", "self_attention.experts") for linear in ("input_linear", "output_linear")]


def tiny_jetmoe(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("jetmoe", **JETMOE)).eval()


class _RecordingLinear:
    """Stands in for `torch.nn.functional` in modeling_jetmoe: records the weight of every `F.linear` call."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def linear(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        self.weights.append(weight.detach())
        return torch.nn.functional.linear(input, weight, bias)

    def __getattr__(self, name: str):
        return getattr(torch.nn.functional, name)


def test_jetmoe_expert_weights_are_targeted_under_their_own_names():
    """Both `JetMoeParallelExperts` of the MoE MLP and of the mixture-of-attention: parameter targets named by their
    state-dict keys, N:M along dim 2 (the input); the routers' gating linears (one output per expert) stay dense, the
    other linears (kv_proj) are targeted as before."""
    from nm_hf.layers.experts import unsupported_experts

    model = tiny_jetmoe()
    keys = list(model.state_dict())
    routers = [name for name, module in model.named_modules() if name.endswith(".router.layer")]
    linears = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module is not model.lm_head and name not in routers]
    assert not unsupported_experts(model) and len(routers) == 4
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4))
    layers = experts(model)
    record = model.config.nm_sparsity
    assert sorted(layers) == sorted(JETMOE_EXPERTS) and set(record["parameter_targets"]) == set(JETMOE_EXPERTS)
    assert sorted(set(record["targeted_modules"]) - set(layers)) == sorted(linears)  # as without the experts
    assert list(model.state_dict()) == keys and "ignored_reasons" not in record
    assert record["ignored_modules"] == [*routers, "lm_head"]
    assert record_weight_keys(record)[JETMOE_EXPERTS[0]] == JETMOE_EXPERTS[0]
    for name, layer in layers.items():
        assert layer.group_dim == record["group_dims"][name] == 2 and layer.weight is model.get_parameter(name)
        assert check_nm(layer.effective_weight(), 2, 4, dim=2), name
    assert all(type(m).__name__ == "JetMoeTopKGating" for n, m in model.named_modules() if n.endswith(".router"))


def test_jetmoe_experts_train_n_m_per_expert_finalize_and_reload_plain(tmp_path, monkeypatch):
    """What `JetMoeParallelExperts.forward` computes with is N:M per expert along its input, in training and eval;
    finalize bakes it (same outputs), and plain transformers loads it back."""
    from transformers.models.jetmoe import modeling_jetmoe

    model = tiny_jetmoe()
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4))
    layers = experts(model)
    recording = _RecordingLinear()
    monkeypatch.setattr(modeling_jetmoe, "F", recording)
    model.train()
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    train_steps(model, 2, lr=0.05, loss=lambda m: m(input_ids=token_ids()).logits.float().pow(2).mean())
    per_expert = {tuple(w.shape) for name in layers for w in model.get_parameter(name)}
    used = [w for w in recording.weights if tuple(w.shape) in per_expert]
    assert len(used) == 2 * len(layers) * 4  # two forwards, every expert of every experts module
    assert all(check_nm(w, 2, 4, dim=1) for w in used)  # one expert's [out, in]: 2:4 along its input
    for name, layer in layers.items():
        weight = layer.weight.detach()
        assert not torch.equal(weight, before[name]), name
        assert torch.equal(layer.current_mask(), nm_mask(weight, 2, 4, dim=2)), name
        assert check_nm(layer.effective_weight(), 2, 4, dim=2), name

    model.eval()
    recording.weights.clear()
    ids = token_ids(1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    effective = {name: layer.effective_weight() for name, layer in layers.items()}
    first = effective["model.layers.0.mlp.input_linear.weight"]
    assert any(torch.equal(w, first[0]) for w in recording.weights)  # eval computes with the masked weights
    monkeypatch.undo()
    plain = finalized_then_reloaded_plain(model, ids, logits, tmp_path / "plain")
    assert all(type(model.get_parameter(n)) is nn.Parameter for n in layers)
    assert {type(model.get_submodule(n.rsplit(".", 1)[0])).__name__ for n in layers} == {"JetMoeParallelExperts"}
    for name in layers:
        weight = plain.get_parameter(name).detach()
        assert torch.equal(weight, effective[name]) and (nm_group_counts(weight, 4, dim=2) == 2).all(), name
    assert nm_hf.sparsity_report(plain).nm_ok
    assert_reloads_sparse(tmp_path / "plain", list(layers), ids, logits)

    config = json.loads((tmp_path / "plain" / "config.json").read_text())  # a checkpoint without a record
    del config["nm_sparsity"]
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    unrecorded, _ = inspect_checkpoint(tmp_path / "plain", pattern="2:4")  # the expert keys, found on a skeleton
    assert unrecorded.nm_ok and {row.name for row in unrecorded.layers} >= set(layers)
    assert not any(row.name.endswith(".router.layer") for row in unrecorded.layers)  # dense, as "all-linear" left them
    unrecorded, _ = inspect_checkpoint(tmp_path / "plain", pattern="2:4", layers=["input_linear.weight"])
    assert unrecorded.nm_ok and len(unrecorded.layers) == 4


def test_qwen2_moe_shared_expert_gate_stays_dense():
    """Qwen2-MoE's `shared_expert_gate` is a plain `nn.Linear(hidden, 1)`, a scalar gate: routing, left dense like
    the router; the shared expert's projections are targeted."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen2_moe", **COMMON, num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[]))
    nm_hf.sparsify(model, SparsityConfig(n=2, m=4))
    record = model.config.nm_sparsity
    gates = [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)]
    assert set(gates) <= set(record["ignored_modules"]) and not set(gates) & set(record["targeted_modules"])
    assert "model.layers.0.mlp.shared_expert.up_proj" in record["targeted_modules"]
