"""nm_hf.arguments (SparsityArguments) and the recipes' data/model flags (nm_hf.recipe.args): flag parsing,
validation errors that name the flag, SparsityConfig conversion, and help texts argparse can print."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, TrainingArguments

from nm_hf.arguments import SparsityArguments, parse_method_args, parse_module_selector
from nm_hf.config import SparsityConfig
from nm_hf.injection import iter_sparse_layers, sparsify
from nm_hf.methods import available_methods
from nm_hf.recipe import parse_recipe_args
from nm_hf.recipe.args import (
    CausalLMModelArguments,
    TextDataArguments,
    TranslationDataArguments,
    TranslationModelArguments,
)
from tiny_models import tiny_model


def parse(*argv: str) -> SparsityArguments:
    (args,) = HfArgumentParser(SparsityArguments).parse_args_into_dataclasses(args=list(argv))
    return args


def test_defaults_are_the_papers_sr_ste_2_4():
    config = parse().to_config()
    assert isinstance(config, SparsityConfig)
    assert (config.n, config.m, config.method, config.decay, config.decay_mode) == (2, 4, "sr-ste", 2e-4, "gradient")
    assert config.target_modules == "all-linear" and config.exclude_modules is None


def test_flags_reach_the_config():
    config = parse("--sparsity", " 4 : 8 ", "--method", "ste", "--decay", "0", "--decay_mode", "decoupled",
                   "--target_modules", "q_proj, v_proj", "--exclude_modules", r".*\.0\..*").to_config()
    assert (config.n, config.m, config.method, config.decay, config.decay_mode) == (4, 8, "ste", 0.0, "decoupled")
    assert list(config.target_modules) == ["q_proj", "v_proj"]
    assert config.exclude_modules == r".*\.0\..*"


@pytest.mark.parametrize(("value", "expected"), [
    ("all-linear", "all-linear"),
    ("q_proj", ["q_proj"]),
    ("self_attn.q_proj,mlp.fc1", ["self_attn.q_proj", "mlp.fc1"]),
    (".*(q|v)_proj", ".*(q|v)_proj"),
    (r"model\.layers\.[0-9]+\.mlp\..*", r"model\.layers\.[0-9]+\.mlp\..*"),
])
def test_selector_forms(value, expected):
    assert parse_module_selector(value, "--target_modules") == expected


@pytest.mark.parametrize(("argv", "flag"), [
    (["--sparsity", "2-4"], "--sparsity must look like N:M"),
    (["--sparsity", "dense"], "--sparsity must look like N:M"),
    (["--sparsity", "4:2"], "--sparsity 4:2: N must be <= M"),
    (["--sparsity", "0:4"], "--sparsity 0:4: N and M must be positive"),
    (["--decay", "-1"], "--decay must be a number >= 0"),
    (["--target_modules", "q_proj("], "--target_modules 'q_proj(' is not a valid regex"),
    (["--target_modules", "q_proj,,v_proj"], "--target_modules 'q_proj,,v_proj' has an empty entry"),
    (["--exclude_modules", " "], "--exclude_modules is empty"),
])
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(ValueError) as info:
        parse(*argv)
    assert flag in str(info.value)


def test_bad_method_is_refused_by_argparse_and_by_the_dataclass():
    with pytest.raises(SystemExit):
        parse("--method", "magnitude")
    with pytest.raises(ValueError, match=f"--method must be one of {', '.join(available_methods())}"):
        SparsityArguments(method="magnitude")
    with pytest.raises(ValueError, match="--decay_mode must be one of gradient, decoupled"):
        SparsityArguments(decay_mode="adamw")


def test_target_list_selects_exactly_those_layers():
    model = tiny_model("llama")
    config = parse("--target_modules", "q_proj,v_proj", "--exclude_modules", "layers.0.self_attn.v_proj").to_config()
    sparsify(model, config)
    names = [name for name, _ in iter_sparse_layers(model)]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.self_attn.v_proj"]


def test_recipe_dataclasses_build_one_parser_without_conflicts():
    translation = HfArgumentParser((TranslationModelArguments, TranslationDataArguments, SparsityArguments,
                                    Seq2SeqTrainingArguments))
    lm = HfArgumentParser((CausalLMModelArguments, TextDataArguments, SparsityArguments, TrainingArguments))
    model, data, sparsity, training = translation.parse_args_into_dataclasses(
        args=["--d_model", "64", "--num_attention_heads", "4", "--source_lang", "de", "--target_lang", "en",
              "--output_dir", "x"])
    assert (model.d_model, data.source_lang, data.dataset, sparsity.sparsity) == (64, "de", "ding", "2:4")
    model, data, _, _ = lm.parse_args_into_dataclasses(args=["--model_type", "llama", "--block_size", "64"])
    assert (model.model_type, data.block_size, data.dataset) == ("llama", 64, "pydoc")


def test_split_sizes_are_rows_or_fractions():
    sizes = TextDataArguments(validation_split_size=500.0, test_split_size=0.05).split_sizes()
    assert sizes == {"validation_size": 500, "test_size": 0.05} and isinstance(sizes["validation_size"], int)
    assert TranslationDataArguments().split_sizes() == {"validation_size": None, "test_size": None}


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (TranslationDataArguments, {"validation_file": "v.jsonl"}, "--validation_file/--test_file need --train_file"),
    (TranslationDataArguments, {"dataset_name": "wmt14", "train_file": "t.jsonl"}, "either --dataset_name or"),
    (TranslationDataArguments, {"max_train_samples": 0}, "--max_train_samples must be a positive integer"),
    (TranslationDataArguments, {"source_lang": "de", "target_lang": "de"}, "--source_lang and --target_lang"),
    (TranslationDataArguments, {"max_source_length": 0}, "--max_source_length must be a positive integer"),
    (TranslationDataArguments, {"ding_max_words": 0}, "--ding_max_words must be a positive integer"),
    (TranslationDataArguments, {"ding_min_words": 0}, "--ding_min_words must be a positive integer"),
    (TranslationDataArguments, {"ding_min_words": 8, "ding_max_words": 6},
     "--ding_min_words 8 is larger than --ding_max_words 6"),
    (TranslationDataArguments, {"validation_split_size": 0.0}, "--validation_split_size must be > 0"),
    (TextDataArguments, {"test_split_size": 2.5}, "--test_split_size 2.5: a row count must be a whole number"),
    (TextDataArguments, {"block_size": 0}, "--block_size must be a positive integer"),
    (TranslationModelArguments, {"d_model": 100, "num_attention_heads": 8}, "--d_model 100 must be divisible"),
    (TranslationModelArguments, {"dropout": 1.0}, "--dropout must be in [0, 1)"),
    (TranslationModelArguments, {"encoder_layers": 0}, "--encoder_layers must be a positive integer"),
    (CausalLMModelArguments, {"model_type": "bert"}, "--model_type must be gpt2 or llama"),
    (CausalLMModelArguments, {"num_key_value_heads": 2}, "--num_key_value_heads only applies to"),
    (CausalLMModelArguments, {"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 3},
     "must be divisible by --num_key_value_heads 3"),
])
def test_data_and_model_arguments_are_checked(cls, kwargs, message):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    assert message in str(info.value)


def test_method_choices_come_from_the_method_registry():
    parser = HfArgumentParser(SparsityArguments)
    (action,) = [a for a in parser._actions if a.dest == "method"]
    assert list(action.choices) == list(available_methods())


def test_every_help_text_formats():
    """argparse %-formats help strings: a bare percent sign made `--help` crash (TypeError)."""
    for types in ((TranslationModelArguments, TranslationDataArguments, SparsityArguments, Seq2SeqTrainingArguments),
                  (CausalLMModelArguments, TextDataArguments, SparsityArguments, TrainingArguments)):
        text = HfArgumentParser(types).format_help()
        assert "--validation_split_size" in text and "--sparsity" in text


# --------------------------------------------------------------------------- method options


@pytest.mark.parametrize(("value", "expected"), [
    (None, {}),
    ("", {}),
    ("decay_steps=500", {"decay_steps": 500}),
    ("decay_steps=500, schedule=exponential,end_factor=0.05", {"decay_steps": 500, "schedule": "exponential",
                                                              "end_factor": 0.05}),
    ("switch_threshold=1e-7,window=none", {"switch_threshold": 1e-7, "window": None}),
    ("flag=True,other=false,neg=-3,text=1e-3x", {"flag": True, "other": False, "neg": -3, "text": "1e-3x"}),
    ('{"decay_steps": 500, "schedule": "linear"}', {"decay_steps": 500, "schedule": "linear"}),  # a YAML mapping
])
def test_method_args_are_parsed_with_types(value, expected):
    parsed = parse_method_args(value)
    assert parsed == expected
    assert [type(v) for v in parsed.values()] == [type(v) for v in expected.values()]


def test_method_options_reach_the_config():
    config = parse("--method", "decaying-mask", "--method_args", "decay_steps=500,schedule=exponential",
                   "--transposable", "--mask_update_interval", "40").to_config()
    assert config.method_args == {"decay_start": 0, "decay_steps": 500, "schedule": "exponential", "end_factor": 0.01}
    assert config.transposable is True and config.mask_update_interval == 40
    config = parse("--method", "step", "--method_args", "max_switch_fraction=0.3", "--transposable", "false")
    assert config.to_config().method_args["max_switch_fraction"] == 0.3 and not config.to_config().transposable
    default = parse().to_config()
    assert (default.transposable, default.mask_update_interval) == (False, 1)


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "decaying-mask", "--method_args", "decay_step=10"],
     "--method_args: method 'decaying-mask' has no argument(s) 'decay_step' (did you mean 'decay_steps'?)"),
    (["--method", "decaying-mask", "--method_args", "decay_steps=0"],
     "--method_args: method 'decaying-mask': decay_steps must be an integer >= 1, got 0"),
    (["--method", "sr-ste", "--method_args", "decay_steps=10"], "--method_args: method 'sr-ste' has no argument(s)"),
    (["--method_args", "decay_steps"], "--method_args: 'decay_steps' must look like key=value"),
    (["--method_args", "a=1,a=2"], "--method_args: 'a' is given twice"),
    (["--method_args", "{oops"], "--method_args '{oops' is not a valid JSON object"),
    (["--method", "fixed", "--transposable"], "--transposable=True needs a method that re-chooses its mask"),
    (["--sparsity", "2:8", "--transposable"], "--transposable: transposable masks support"),
    (["--mask_update_interval", "0"], "--mask_update_interval must be a positive integer"),
    (["--method", "dense", "--mask_update_interval", "3"], "--mask_update_interval=3 needs a method"),
])
def test_bad_method_options_name_the_flag_in_one_line(argv, message):
    with pytest.raises(ValueError) as info:
        parse(*argv)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "SparsityConfig" not in str(info.value)


def test_method_options_in_a_recipe_config_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("method: decaying-mask\nmethod_args:\n  decay_steps: 300\n  schedule: exponential\n"
                           "transposable: true\nmask_update_interval: 4\n")
    (sparsity,) = parse_recipe_args([SparsityArguments], [str(config_file)])
    config = sparsity.to_config()
    assert (config.method_args["decay_steps"], config.method_args["schedule"]) == (300, "exponential")
    assert config.transposable and config.mask_update_interval == 4
