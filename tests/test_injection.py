"""sparsify / finalize / sparsity_report / SparsityConfig: target selection, records, refusals."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from nm_hf.config import SparsityConfig
from nm_hf.injection import (
    SparsifyError,
    finalize,
    find_target_modules,
    ignored_reasons,
    is_sparsified,
    iter_sparse_layers,
    sparsify,
)
from nm_hf.layers import SparseConv1D, SparseLinear
from nm_hf.masks import check_nm, nm_group_counts, nm_mask
from nm_hf.record import CONFIG_KEY, config_from_record
from nm_hf.report import sparsity_report
from tiny_models import output_tensor, tiny_inputs, tiny_model, train_steps

LLAMA_PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
LLAMA_TARGETS = [f"model.layers.{i}.{p}" for i in range(2) for p in LLAMA_PROJ]


def targeted(model) -> list[str]:
    return [name for name, _ in iter_sparse_layers(model)]


# ---------------------------------------------------------------------------------------------
# Snapshots: "the model is left exactly as it was"


def snapshot(model: nn.Module) -> dict:
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if value.is_meta:
            state[key] = (id(value), value.shape, value.dtype, "meta")
        else:
            state[key] = (id(value), value.detach().clone())
    config = getattr(model, "config", None)
    return {
        "repr": repr(model),
        "classes": {name: type(mod) for name, mod in model.named_modules()},
        "dicts": {name: sorted(mod.__dict__) for name, mod in model.named_modules()},
        "configs": {name: id(mod.__dict__["config"]) for name, mod in model.named_modules() if "config" in mod.__dict__},
        "state": state,
        "record": json.dumps(getattr(config, CONFIG_KEY, None)),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["repr"] == before["repr"]
    assert after["classes"] == before["classes"]
    assert after["dicts"] == before["dicts"]
    assert after["configs"] == before["configs"]  # no module was given another config object
    assert after["record"] == before["record"]
    assert after["state"].keys() == before["state"].keys()
    for key, old in before["state"].items():
        new = after["state"][key]
        assert new[0] == old[0], f"{key} was replaced by another tensor"
        if old[-1] == "meta":
            assert new == old
        else:
            assert new[1].dtype == old[1].dtype and torch.equal(new[1], old[1]), f"{key} changed"


def refuse(model: nn.Module, config: SparsityConfig, *fragments: str) -> str:
    """sparsify must raise SparsifyError mentioning every fragment, and leave the model untouched."""
    before = snapshot(model)
    with pytest.raises(SparsifyError) as info:
        sparsify(model, config)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message:\n{message}"
    assert_unchanged(model, before)
    assert not is_sparsified(model)
    return message


# ---------------------------------------------------------------------------------------------
# Small hand-made models for the refusals


class Toy(nn.Module):
    def __init__(self, hidden: int = 8, odd: int = 8, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(10, hidden)
        self.block = nn.ModuleDict({"up": nn.Linear(hidden, 16), "down": nn.Linear(16, odd)})
        self.tail = nn.Linear(odd, hidden)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.tail(self.block["down"](torch.relu(self.block["up"](h))))
        return self.classifier(h)


class ScaledLinear(nn.Linear):
    """A Linear subclass that is not a plain projection."""

    def forward(self, x):
        return 2 * super().forward(x)


# ---------------------------------------------------------------------------------------------
# Target selection


def test_all_linear_llama():
    model = tiny_model("llama")
    sparsify(model, SparsityConfig())
    assert targeted(model) == LLAMA_TARGETS
    assert type(model.lm_head) is nn.Linear
    assert find_target_modules(tiny_model("llama"), SparsityConfig()) == LLAMA_TARGETS


def test_all_linear_gpt2_uses_conv1d_and_skips_tied_head():
    model = tiny_model("gpt2")
    sparsify(model, SparsityConfig())
    names = targeted(model)
    assert names == [f"transformer.h.{i}.{p}" for i in range(2)
                     for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert all(isinstance(dict(model.named_modules())[n], SparseConv1D) for n in names)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight


def test_all_linear_bert_skips_mlm_head():
    model = tiny_model("bert")
    sparsify(model, SparsityConfig())
    assert not any(n.startswith("cls.") for n in targeted(model))
    assert type(model.cls.predictions.decoder) is nn.Linear


def test_all_linear_toy_skips_classifier_and_subclasses():
    model = Toy()
    model.block["scaled"] = ScaledLinear(8, 8)
    sparsify(model, SparsityConfig())
    assert targeted(model) == ["block.up", "block.down", "tail"]
    assert type(model.block["scaled"]) is ScaledLinear and type(model.classifier) is nn.Linear


@pytest.mark.parametrize("model_type", [
    "bert", "gpt2", "llama", "modernbert", "distilbert", "opt",
    "t5", "bart",
])
def test_all_linear_skips_sequence_classification_heads(model_type):
    model = tiny_model(model_type, AutoModelForSequenceClassification, num_labels=3)
    names = find_target_modules(model, SparsityConfig())
    modules = dict(model.named_modules())
    produces_labels = [n for n in names if getattr(modules[n], "out_features", getattr(modules[n], "nf", 0)) == 3]
    assert names and not produces_labels


def test_list_exact_and_suffix():
    model = tiny_model("llama")
    sparsify(model, SparsityConfig(target_modules=["model.layers.0.self_attn.q_proj"]))
    assert targeted(model) == ["model.layers.0.self_attn.q_proj"]

    model = tiny_model("llama")
    sparsify(model, SparsityConfig(target_modules=["q_proj", "mlp.down_proj", "layers.1.self_attn.q_proj"]))
    assert targeted(model) == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                               "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def test_suffix_match_is_on_whole_name_components():
    refuse(tiny_model("llama"), SparsityConfig(target_modules=["proj"]), "'proj'", "matched no module")
    refuse(tiny_model("llama"), SparsityConfig(target_modules=["_proj"]), "'_proj'", "matched no module")


def test_regex_is_full_match():
    model = tiny_model("llama")
    sparsify(model, SparsityConfig(target_modules=r"model\.layers\.1\..*_proj"))
    assert targeted(model) == LLAMA_TARGETS[7:]

    model = tiny_model("llama")
    sparsify(model, SparsityConfig(target_modules=r".*\.(q|v)_proj"))
    assert targeted(model) == [n for n in LLAMA_TARGETS if n.endswith(("q_proj", "v_proj"))]

    # a plain string is a regex, not a suffix: "q_proj" matches no full name
    refuse(tiny_model("llama"), SparsityConfig(target_modules="q_proj"), "'q_proj'", "full match", "matched no")


def test_exclude_modules():
    model = tiny_model("llama")
    sparsify(model, SparsityConfig(exclude_modules=["down_proj", "model.layers.0.self_attn.q_proj"]))
    assert targeted(model) == [n for n in LLAMA_TARGETS
                               if not n.endswith("down_proj") and n != "model.layers.0.self_attn.q_proj"]

    model = tiny_model("llama")
    sparsify(model, SparsityConfig(exclude_modules=r"model\.layers\.0\..*"))
    assert targeted(model) == LLAMA_TARGETS[7:]

    model = tiny_model("llama")
    sparsify(model, SparsityConfig(target_modules=["q_proj", "k_proj"], exclude_modules=["layers.1.self_attn.k_proj"]))
    assert targeted(model) == LLAMA_TARGETS[:2] + ["model.layers.1.self_attn.q_proj"]


# ---------------------------------------------------------------------------------------------
# Refusals: clear error naming the layer and the fix, model unchanged


def test_unknown_target_name():
    message = refuse(tiny_model("llama"), SparsityConfig(target_modules=["q_proj", "nope_proj"]),
                     "'nope_proj'", "matched no module", "the model was not modified")
    assert "q_proj" in message  # shows what the names look like


def test_unknown_exclude_name():
    refuse(tiny_model("llama"), SparsityConfig(exclude_modules=["nope"]), "exclude_modules", "'nope'")


def test_no_layer_matched():
    refuse(tiny_model("llama"), SparsityConfig(target_modules=r"encoder\..*"), "matched no linear layer")
    refuse(tiny_model("llama"), SparsityConfig(exclude_modules=".*"), "no layer left to sparsify")
    refuse(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), SparsityConfig(), "no layer left to sparsify")


def test_target_is_not_a_linear_layer():
    refuse(tiny_model("llama"), SparsityConfig(target_modules=["self_attn"]),
           "'model.layers.0.self_attn'", "LlamaAttention", "not a linear layer")


def test_input_size_not_divisible_by_m():
    model = Toy(odd=6)  # tail: Linear(6, 8)
    message = refuse(model, SparsityConfig(), "'tail'", "6 input features", "m=4", "exclude_modules")
    assert "'block.down'" not in message  # block.down has 16 inputs: fine
    # the earlier, valid layers were not converted either (checked by refuse), and a fix works:
    sparsify(model, SparsityConfig(exclude_modules=["tail"]))
    assert targeted(model) == ["block.up", "block.down"]



def test_no_targeted_input_size_divisible_by_m_is_one_line():
    """Every targeted layer fails for its input size: one line blaming m, not one per layer advising to
    exclude it (which would leave nothing to sparsify)."""
    message = refuse(tiny_model("llama"), SparsityConfig(n=1, m=3))  # input sizes 32 and 64
    assert message == ("cannot sparsify LlamaForCausalLM (the model was not modified):\n  - the input size of "
                       "every targeted layer (32, 64) is not divisible by m=3: choose an m that divides them")
    message = refuse(tiny_model("llama"), SparsityConfig(n=2, m=6, target_modules=["q_proj"]))  # two layers
    assert message.endswith("\n  - the input size of every targeted layer (32) is not divisible by m=6: "
                            "choose an m that divides them")
    # a single target keeps its own line, which names it
    message = refuse(tiny_model("llama"), SparsityConfig(n=2, m=6, target_modules=["model.layers.0.self_attn.q_proj"]),
                     "'model.layers.0.self_attn.q_proj' has 32 input features, not divisible by m=6")
    assert "every targeted layer" not in message
    # one layer that fits keeps the per-layer lines: excluding the others is a fix
    message = refuse(tiny_model("llama"), SparsityConfig(n=1, m=64), "'model.layers.0.self_attn.q_proj'",
                     "32 input features", "exclude_modules")
    assert "'model.layers.0.mlp.down_proj'" not in message and "every targeted layer" not in message


def test_non_floating_weight():
    model = Toy()
    model.block["up"].weight = nn.Parameter(torch.ones(16, 8, dtype=torch.int8), requires_grad=False)
    refuse(model, SparsityConfig(), "'block.up'", "torch.int8", "floating-point", "exclude_modules")


def test_meta_device_weights():
    with torch.device("meta"):
        toy = Toy()
        llama = tiny_model("llama")
    assert toy.tail.weight.is_meta and llama.lm_head.weight.is_meta
    refuse(toy, SparsityConfig(), "'block.up'", "meta device", "load real weights first")
    refuse(llama, SparsityConfig(), "'model.layers.0.self_attn.q_proj'", "meta device")


def test_already_sparsified():
    model = tiny_model("llama")
    sparsify(model, SparsityConfig(target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(SparsifyError, match=r"already has sparse layers.*model\.layers\.0\.self_attn\.q_proj.*finalize"):
        sparsify(model, SparsityConfig(target_modules=["k_proj"]))
    assert_unchanged(model, before)
    assert targeted(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_weight_tied_to_embedding_targeted_explicitly():
    message = refuse(tiny_model("gpt2"), SparsityConfig(target_modules=["lm_head"]), "'lm_head'", "tied",
                     "exclude_modules")
    assert "add 'lm_head' to exclude_modules" in message  # a top-level name is not offered twice ("'x' or 'x'")
    model = Toy()
    model.classifier = nn.Linear(8, 10, bias=False)
    model.classifier.weight = model.embed.weight  # [10, 8]: a tied output projection
    refuse(model, SparsityConfig(target_modules=["classifier"]), "'classifier'", "shares its weight with an embedding")


def test_linear_subclass_targeted_explicitly():
    model = Toy()
    model.block["scaled"] = ScaledLinear(8, 8)
    refuse(model, SparsityConfig(target_modules=["scaled"]), "'block.scaled'", "ScaledLinear", "subclass")


def test_instance_level_forward():
    model = Toy()
    original = model.tail.forward
    model.tail.forward = lambda x: original(x)  # what accelerate's hooks do
    refuse(model, SparsityConfig(), "'tail'", "instance-level forward")


def test_every_problem_reported_at_once():
    model = Toy(odd=6)
    model.block["up"].weight = nn.Parameter(torch.ones(16, 8, dtype=torch.int8), requires_grad=False)
    refuse(model, SparsityConfig(), "'block.up'", "torch.int8", "'tail'", "6 input features")


def test_unrecordable_config_leaves_model_unchanged():
    model = Toy()
    model.config = {"hidden_size": 8}
    before = snapshot(model)
    with pytest.raises(SparsifyError, match="model.config does not accept"):
        sparsify(model, SparsityConfig())
    assert_unchanged(model, before)


def test_models_built_from_one_config_keep_their_own_records(tmp_path):
    """transformers 5's from_config keeps the config object it is given: a dense baseline built from the same
    config must not get the sparse model's record (it would be saved with it and re-sparsified by the
    Trainer)."""
    from tiny_models import tiny_config

    config = tiny_config("llama")
    dense = AutoModelForCausalLM.from_config(config)
    sparse = AutoModelForCausalLM.from_config(config)
    assert dense.config is sparse.config  # what makes the copy necessary
    sparsify(sparse, SparsityConfig())
    finalize(sparse)
    assert not hasattr(config, CONFIG_KEY) and not hasattr(dense.config, CONFIG_KEY)
    assert sparse.config.nm_sparsity["state"] == "finalized"
    holders = [name for name, mod in sparse.named_modules() if "config" in mod.__dict__]
    assert len(holders) > 2 and all(sparse.get_submodule(name).config is sparse.config for name in holders)
    dense.save_pretrained(tmp_path)
    assert CONFIG_KEY not in json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="no sparse layers and no 'nm_sparsity' record"):
        sparsity_report(dense)
    # one model, its config also held by a variable (the README's quick start): the variable stays clean
    alone = AutoModelForCausalLM.from_config(config)
    sparsify(alone, SparsityConfig())
    assert alone.config is not config and not hasattr(config, CONFIG_KEY) and CONFIG_KEY in vars(alone.config)
    # held by nothing else: nothing to protect, the model keeps its object
    inline = AutoModelForCausalLM.from_config(tiny_config("llama"))
    before = id(inline.config)  # (an id: a reference held here would be one more holder)
    sparsify(inline, SparsityConfig())
    assert id(inline.config) == before and CONFIG_KEY in vars(inline.config)


def test_sparsifying_a_submodule_keeps_the_parent_on_the_same_config():
    """sparsify(model.model): the parent shares the submodule's config, so the record (and use_cache) reach both."""
    model = tiny_model("llama")
    sparsify(model.model, SparsityConfig())
    assert model.config is model.model.config and CONFIG_KEY in vars(model.config)
    assert all(mod.config is model.config for mod in model.modules() if "config" in mod.__dict__)


def test_bad_argument_types():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"SparsityConfig or a dict, got the string '2:4': for a pattern use "
                                        r"SparsityConfig.from_pattern\('2:4'\)"):
        sparsify(model, "2:4")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        sparsify(object(), SparsityConfig())
    with pytest.raises(ValueError, match="method must be one of"):
        sparsify(model, {"method": "magic"})
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# Config record, methods, finalize, reload


def test_config_recorded_and_saved(tmp_path):
    model = tiny_model("llama")
    config = SparsityConfig(n=1, m=4, method="ste", decay=0.5, target_modules=["q_proj", "up_proj"],
                            exclude_modules=["layers.1.mlp.up_proj"])
    with pytest.warns(UserWarning, match="decay=0.5 has no effect: method 'ste'"):  # recorded all the same
        sparsify(model, config)
    record = getattr(model.config, CONFIG_KEY)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    assert sorted(record.pop("targeted_modules")) == sorted(names)
    linear = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    assert sorted(record.pop("ignored_modules")) == sorted(set(linear) - set(names))  # includes lm_head
    assert set(record.pop("group_dims").values()) == {1}
    assert record == {**config.to_dict(), "state": "training"}
    record = getattr(model.config, CONFIG_KEY)

    model.save_pretrained(tmp_path / "training")
    saved = json.loads((tmp_path / "training" / "config.json").read_text())
    assert saved[CONFIG_KEY] == record

    finalize(model)
    record = getattr(model.config, CONFIG_KEY)
    assert record["state"] == "finalized" and sorted(record["targeted_modules"]) == sorted(names)
    numel = sum(dict(model.named_modules())[n].weight.numel() for n in names)
    zeros = sum(int((dict(model.named_modules())[n].weight == 0).sum()) for n in names)
    assert zeros == numel * 3 // 4 and record["sparsity"] == pytest.approx(0.75)
    model.save_pretrained(tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert getattr(reloaded.config, CONFIG_KEY) == record
    assert config_from_record(record).pattern == "1:4"


def test_sparse_methods_do_not_touch_weights_at_sparsify_time():
    for method in ("sr-ste", "ste", "dense"):
        model = tiny_model("llama")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        sparsify(model, SparsityConfig(method=method))
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fixed_method_prunes_once_and_freezes_the_mask():
    model = tiny_model("llama")
    original = {n: dict(model.named_modules())[n].weight.detach().clone() for n in LLAMA_TARGETS}
    sparsify(model, SparsityConfig(method="fixed"))
    layers = dict(iter_sparse_layers(model))
    masks = {}
    for name, layer in layers.items():
        masks[name] = nm_mask(original[name], 2, 4, dim=1)
        assert torch.equal(layer.weight.detach(), original[name] * masks[name])  # pruned weights zeroed now
        assert not torch.signbit(layer.weight.detach()[~masks[name]]).any()  # as +0.0
        assert (nm_group_counts(layer.weight.detach(), 4, dim=1) == 2).all()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    inputs = tiny_inputs(model)
    for _ in range(3):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        for name, layer in layers.items():
            assert (layer.weight.grad[~masks[name]] == 0).all()
        opt.step()
        opt.zero_grad()
    for name, layer in layers.items():
        w = layer.weight.detach()
        assert (w[~masks[name]] == 0).all(), f"{name}: pruned weights moved"
        assert not torch.equal(w[masks[name]], original[name][masks[name]]), f"{name}: kept weights did not train"
        assert torch.equal(layer.current_mask(), masks[name])


def test_dense_method_is_patched_but_unmasked():
    model = tiny_model("llama").eval()
    reference = tiny_model("llama").eval()
    inputs = tiny_inputs(model)
    sparsify(model, SparsityConfig(method="dense"))
    assert targeted(model) == LLAMA_TARGETS
    with torch.no_grad():
        assert torch.equal(output_tensor(model(**inputs)), output_tensor(reference(**inputs)))
    finalize(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                  strict=True))


def test_finalize_restores_plain_classes_and_keeps_ties(tmp_path):
    model = tiny_model("gpt2")
    classes = {name: type(mod) for name, mod in model.named_modules()}
    sparsify(model, SparsityConfig())
    assert model.lm_head.weight is model.transformer.wte.weight
    finalize(model)
    assert {name: type(mod) for name, mod in model.named_modules()} == classes
    assert not is_sparsified(model) and model.lm_head.weight is model.transformer.wte.weight
    for name in getattr(model.config, CONFIG_KEY)["targeted_modules"]:
        module = dict(model.named_modules())[name]
        assert type(module) is Conv1D and check_nm(module.weight, 2, 4, dim=0)
        assert not hasattr(module, "nm_n") and not hasattr(module, "_nm_mask_cache")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    # finalize -> sparsify again starts over
    sparsify(model, SparsityConfig(n=1, m=4, target_modules=["c_fc"]))
    assert targeted(model) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert getattr(model.config, CONFIG_KEY)["state"] == "training"


def test_finalize_unsparsified_model_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no sparse layers to finalize.*sparsify"):
        finalize(model)


# ---------------------------------------------------------------------------------------------
# sparsity_report


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_sparsity_report(model_type, tmp_path):
    model = tiny_model(model_type)
    sparsify(model, SparsityConfig(n=1, m=4))
    names = targeted(model)
    report = sparsity_report(model)
    assert [row.name for row in report.layers] == names
    modules = dict(model.named_modules())
    for row in report.layers:
        assert row.shape == tuple(modules[row.name].weight.shape) and row.pattern == "1:4"
        assert row.numel == modules[row.name].weight.numel() and row.zeros == row.numel * 3 // 4
        assert row.sparsity == pytest.approx(0.75) and row.nm_ok
    assert report.total_numel == sum(row.numel for row in report.layers)
    assert report.total_zeros == report.total_numel * 3 // 4 and report.sparsity == pytest.approx(0.75)
    assert report.nm_ok
    as_dict = report.to_dict()
    assert as_dict["total"] == {"numel": report.total_numel, "zeros": report.total_zeros,
                                "sparsity": report.sparsity, "nm_ok": True}
    text, markdown = str(report), report.to_markdown()
    assert all(name in text and name in markdown for name in names) and "total" in text

    finalize(model)
    assert sparsity_report(model).to_dict() == as_dict
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sparsity_report(reloaded).to_dict() == as_dict


def test_sparsity_report_on_dense_models():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=re.escape("names=[...]")):
        sparsity_report(model)
    with pytest.raises(ValueError, match="pass n= and m="):
        sparsity_report(model, names=["model.layers.0.mlp.up_proj"])
    report = sparsity_report(model, names=["model.layers.0.mlp.up_proj"], n=2, m=4)
    assert len(report.layers) == 1 and not report.nm_ok and report.sparsity == 0.0
    assert report.layers[0].pattern == "2:4" and report.layers[0].shape == (64, 32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(nm_mask(model.model.layers[0].mlp.up_proj.weight, 1, 2))
    assert sparsity_report(model, names=["model.layers.0.mlp.up_proj"], n=2, m=4).nm_ok
    assert not sparsity_report(model, names=["model.layers.0.mlp.up_proj"], n=1, m=4).nm_ok
    with pytest.raises(ValueError, match="'nope'"):
        sparsity_report(model, names=["nope"], n=2, m=4)


# ---------------------------------------------------------------------------------------------
# SparsityConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n=0), "SparsityConfig.n must be a positive integer, got 0"),
        (dict(m=-4), "SparsityConfig.m must be a positive integer"),
        (dict(n=2.0), "SparsityConfig.n must be a positive integer"),
        (dict(n=True), "SparsityConfig.n must be a positive integer"),
        (dict(n="2"), "SparsityConfig.n must be a positive integer"),
        (dict(n=5, m=4), "n <= m .*got 5:4"),
        (dict(method="srste"), "method must be one of sr-ste, ste, fixed, dense.*; got 'srste'"),
        (dict(decay_mode="adam"), "decay_mode must be one of gradient, decoupled"),
        (dict(decay=-1.0), "decay must be a finite number >= 0"),
        (dict(decay=float("nan")), "decay must be a finite number >= 0"),
        (dict(decay="0.1"), "decay must be a finite number >= 0"),
        (dict(target_modules=None), "target_modules must be 'all-linear', a list of names or a regex"),
        (dict(target_modules=["q_proj", ""]), "list of non-empty strings"),
        (dict(target_modules=3), "list of non-empty strings"),
        (dict(target_modules="(q_proj"), "not a valid regex"),
        (dict(exclude_modules="[bad"), "exclude_modules='\\[bad' is not a valid regex"),
    ],
)
def test_config_validation_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)


def test_config_round_trip():
    config = SparsityConfig(n=1, m=8, method="fixed", decay=0.0, decay_mode="decoupled",
                            target_modules=["q_proj"], exclude_modules=r".*\.0\..*")
    data = config.to_dict()
    assert SparsityConfig.from_dict(json.loads(json.dumps(data))) == config
    assert set(data) == {"n", "m", "method", "decay", "decay_mode", "target_modules", "exclude_modules",
                         "method_args", "transposable", "mask_update_interval"}
    recorded = {**data, "targeted_modules": ["a.q_proj"], "state": "finalized"}
    assert config_from_record(recorded) == config  # saved-model keys are the record's business
    with pytest.raises(ValueError, match="'methd' \\(did you mean 'method'\\?\\)"):
        SparsityConfig.from_dict({"n": 2, "m": 4, "methd": "ste"})  # a typo is refused, not kept
    assert SparsityConfig.from_pattern(" 4 : 8 ", method="ste") == SparsityConfig(n=4, m=8, method="ste")
    with pytest.raises(ValueError, match="'N:M'"):
        SparsityConfig.from_pattern("2-4")
    assert SparsityConfig(method="ste").effective_decay == 0.0 and SparsityConfig().effective_decay == 2e-4
    model = tiny_model("llama")
    sparsify(model, data)  # a dict works too; the exclude regex removes layer 0
    assert targeted(model) == ["model.layers.1.self_attn.q_proj"]


def test_layer_state_follows_config():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="decay=0.3 has no effect: method 'ste'"):
        sparsify(model, SparsityConfig(n=1, m=8, method="ste", decay=0.3, decay_mode="decoupled",
                                       target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SparseLinear)
    assert (layer.nm_n, layer.nm_m, layer.nm_method, layer.nm_decay_mode) == (1, 8, "ste", "decoupled")
    assert layer.nm_decay == 0.0  # only sr-ste decays


# ---------------------------------------------------------------------------------------------
# Regressions: copies, interrupts, wrappers


@pytest.mark.parametrize("how", ["deepcopy", "assign"])
def test_copied_or_reassigned_model_recomputes_masks_under_fused_adamw(how):
    import copy

    source = tiny_model("llama")
    sparsify(source, SparsityConfig(method="ste"))
    if how == "deepcopy":
        model = copy.deepcopy(source)
    else:
        model = source
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    layers = dict(iter_sparse_layers(model))
    initial = {name: layer.current_mask().clone() for name, layer in layers.items()}  # fills the caches
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    train_steps(model, 3, optimizer=optimizer, call_hook=False)
    for name, layer in layers.items():
        fresh = nm_mask(layer.weight.detach(), 2, 4, dim=layer.group_dim)
        assert torch.equal(layer.current_mask(), fresh), name
    # the masks did move during training, so a stale cache would have been caught
    assert sum(int((initial[name] != layer.current_mask()).sum()) for name, layer in layers.items()) > 0


def test_interrupt_during_fixed_pruning_leaves_model_unchanged(monkeypatch):
    from nm_hf.methods.fixed import FixedMethod

    model = tiny_model("llama")
    before = snapshot(model)
    calls = []
    real = FixedMethod.prepare

    def interrupted(self, layer):
        calls.append(layer)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(self, layer)

    monkeypatch.setattr(FixedMethod, "prepare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sparsify(model, SparsityConfig(method="fixed"))
    assert len(calls) == 3  # two layers were pruned before the interrupt
    assert_unchanged(model, before)


def test_compiled_and_wrapped_models_record_the_inner_names(tmp_path):
    model = tiny_model("llama")
    compiled = torch.compile(model)
    assert sparsify(compiled, SparsityConfig()) is compiled
    assert model.config.nm_sparsity["targeted_modules"] == LLAMA_TARGETS  # no "_orig_mod." prefix
    assert targeted(compiled) == LLAMA_TARGETS
    finalize(compiled)
    model.save_pretrained(tmp_path)
    import nm_hf

    reloaded = nm_hf.load_sparse(tmp_path)
    assert targeted(reloaded) == LLAMA_TARGETS

    wrapped = nn.DataParallel(tiny_model("llama"))
    sparsify(wrapped, SparsityConfig())
    assert wrapped.module.config.nm_sparsity["targeted_modules"] == LLAMA_TARGETS


def test_interrupt_restores_a_weight_shared_by_two_targets(monkeypatch):
    from nm_hf.methods.fixed import FixedMethod

    model = Toy()
    model.block["twin"] = nn.Linear(8, 8)
    model.block["twin"].weight = model.tail.weight  # one Parameter, two targets: pruned by the first, copied by the second
    before = snapshot(model)
    calls = []
    real = FixedMethod.prepare

    def interrupted(self, layer):
        calls.append(layer)
        if layer is model.tail:  # the last target, after its twin zeroed the shared weight
            raise KeyboardInterrupt
        real(self, layer)

    monkeypatch.setattr(FixedMethod, "prepare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sparsify(model, SparsityConfig(method="fixed"))
    assert len(calls) == 4
    assert_unchanged(model, before)


def test_failure_on_inference_tensor_weights_leaves_model_unchanged():
    with torch.inference_mode():
        model = Toy()
    before = snapshot(model)
    # "fixed" zeroes pruned weights in place, which torch refuses for inference tensors outside inference mode
    with pytest.raises(RuntimeError, match="inference tensor"):
        sparsify(model, SparsityConfig(method="fixed"))
    assert_unchanged(model, before)
    assert not is_sparsified(model)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_hook_computed_weight_is_refused_or_left_dense():
    model = Toy()
    nn.utils.weight_norm(model.tail)  # the hook-based form: `tail.weight` is recomputed from weight_g / weight_v
    refuse(model, SparsityConfig(target_modules=["tail"]), "'tail'", "not a Parameter", "weight_norm")
    sparsify(model, SparsityConfig(target_modules="all"))
    assert targeted(model) == ["block.up", "block.down"]
    assert "not a Parameter" in ignored_reasons(model, SparsityConfig(target_modules="all"), targeted(model))["tail"]
    finalize(model)
    model(torch.tensor([[1, 2]]))  # the hook recomputes tail.weight: it was never a target, nothing was lost
    assert type(model.tail) is nn.Linear


@pytest.mark.parametrize(("model_type", "auto", "head"), [
    ("gpt2", "GPT2DoubleHeadsModel", "multiple_choice_head.summary"),
    ("electra", "ElectraForPreTraining", "discriminator_predictions.dense"),
    ("distilbert", "DistilBertForMaskedLM", "vocab_transform"),
])
def test_all_linear_leaves_every_layer_outside_the_backbone_dense(model_type, auto, head):
    """Task heads whose names are not in the list (GPT-2's multiple-choice head, Electra's discriminator,
    DistilBERT's MLM transform) sit outside `model.base_model`: "all-linear" leaves them dense."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=64, **({"n_embd": 16, "n_layer": 1, "n_head": 2}
                                  if model_type == "gpt2" else {"hidden_size": 16, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "intermediate_size": 32, "embedding_size": 16}
                                  if model_type == "electra" else {"dim": 16, "n_layers": 1, "n_heads": 2,
                                  "hidden_dim": 32}))
    model = getattr(transformers, auto)(config)
    sparsify(model, SparsityConfig())
    names = targeted(model)
    prefix = model.base_model_prefix + "."
    assert names and all(name.startswith(prefix) for name in names), names
    assert type(model.get_submodule(head)) is nn.Linear
    assert head in model.config.nm_sparsity["ignored_modules"]


def test_all_linear_leaves_an_untied_head_declared_tieable_dense():
    """FSMT's vocabulary projection `decoder.output_projection` sits inside the backbone and is not what
    `get_output_embeddings` returns; its class declares it tie-able to the decoder embedding
    (`_tied_weights_keys`), which makes it a head even when this config unties it."""
    model = tiny_model("fsmt", AutoModelForSeq2SeqLM, src_vocab_size=96, tgt_vocab_size=96, tie_word_embeddings=False)
    head = "model.decoder.output_projection"
    assert model.get_submodule(head).weight is not model.get_input_embeddings().weight
    sparsify(model, SparsityConfig())
    names = targeted(model)
    assert names and head not in names and "model.decoder.layers.0.fc1" in names
    assert type(model.get_submodule(head)) is nn.Linear
    assert head in model.config.nm_sparsity["ignored_modules"]


@pytest.mark.parametrize("method", ["ste", "fixed", "dense"])
def test_decay_that_the_method_ignores_warns_once(method):
    """Only methods whose registry entry says `uses_decay` read `decay`: any other value is worth a word."""
    with pytest.warns(UserWarning, match=rf"^SparsityConfig.decay=0.1 has no effect: method '{method}' uses no "
                                         r"decay \(methods that do: sr-ste\)$") as caught:
        sparsify(tiny_model("llama"), SparsityConfig(method=method, decay=0.1))
    assert len([w for w in caught if "SparsityConfig.decay" in str(w.message)]) == 1
    assert caught[0].filename == __file__  # points at the caller's line


@pytest.mark.parametrize("config", [SparsityConfig(method="ste"), SparsityConfig(method="ste", decay=0),
                                    SparsityConfig(decay=0.1), SparsityConfig(decay=1.0, decay_mode="decoupled")])
def test_no_decay_warning_when_the_method_reads_it_or_it_is_not_set(config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(tiny_model("llama"), config)


def test_reloading_a_record_with_an_ignored_decay_does_not_warn_again(tmp_path):
    from nm_hf.checkpoint import load_sparse

    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="decay=0.5 has no effect"):
        finalize(sparsify(model, SparsityConfig(method="ste", decay=0.5)))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="SparsityConfig.decay=")
        reloaded = load_sparse(tmp_path)
    assert is_sparsified(reloaded) and reloaded.config.nm_sparsity["decay"] == 0.5
