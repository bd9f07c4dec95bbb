"""nm_hf.recipe.config_files: config files are read strictly (encoding, duplicate keys, YAML 1.1 traps)."""

from __future__ import annotations

import json

import pytest
from transformers import Seq2SeqTrainingArguments

from nm_hf.arguments import SparsityArguments
from nm_hf.recipe import (
    ArgumentsError,
    TranslationDataArguments,
    TranslationModelArguments,
    load_config_file,
    parse_recipe_args,
    parse_recipe_args_full,
)

TYPES = (TranslationModelArguments, TranslationDataArguments, SparsityArguments, Seq2SeqTrainingArguments)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("value", "number"), [("2:4", 124), ("4:8", 248), ("1:30:00", 5400)])
def test_unquoted_colon_numbers_are_refused_naming_file_line_and_fix(tmp_path, value, number):
    """PyYAML follows YAML 1.1, where an unquoted 2:4 is the base-60 integer 124."""
    config = write(tmp_path / "run.yaml", f"max_steps: 10\nsparsity: {value}\n")
    with pytest.raises(ArgumentsError) as info:
        load_config_file(config)
    assert str(info.value) == (f"{config}, line 2: sparsity: {value} is not quoted, and YAML 1.1 reads an unquoted "
                               f"{value} as the base-60 number {number}; quote it: sparsity: \"{value}\"")


def test_quoted_patterns_and_ordinary_values_still_parse(tmp_path):
    config = write(tmp_path / "run.yaml", "sparsity: '2:4'\nlearning_rate: 2.0e-3\nmax_steps: 1_000\n"
                   "run_name: 'a:b'\nseed: 7\nsave_strategy: \"no\"\n")
    assert load_config_file(config) == {"sparsity": "2:4", "learning_rate": 2e-3, "max_steps": 1000,
                                        "run_name": "a:b", "seed": 7, "save_strategy": "no"}
    *_, sparsity, _ = parse_recipe_args(TYPES, [str(config)])
    assert sparsity.to_config().pattern == "2:4"


def test_duplicate_keys_are_refused_naming_the_key_and_file(tmp_path):
    config = write(tmp_path / "dup.yaml", "learning_rate: 1.0e-3\nmax_steps: 10\nlearning_rate: 3.0e-3\n")
    with pytest.raises(ArgumentsError) as info:
        load_config_file(config)
    assert str(info.value) == f"{config}, line 3: key 'learning_rate' appears more than once; keep one"
    nested = write(tmp_path / "nested.yaml", "lr_scheduler_kwargs:\n  min_lr_rate: 0.1\n  min_lr_rate: 0.2\n")
    with pytest.raises(ArgumentsError, match="nested.yaml, line 3: key 'min_lr_rate' appears more than once"):
        load_config_file(nested)
    as_json = write(tmp_path / "dup.json", '{"max_steps": 3, "max_steps": 4}')
    with pytest.raises(ArgumentsError, match=r"dup.json: key 'max_steps' appears more than once"):
        load_config_file(as_json)
    merged = write(tmp_path / "merge.yaml", "base: &b {a: 1}\nother:\n  <<: *b\n  a: 2\n")
    assert load_config_file(merged)["other"] == {"a": 2}  # a merge key overridden is not a duplicate


def test_non_utf8_config_names_file_and_line(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("max_steps: 10\nrun_name: Größe\n".encode("latin-1"))
    with pytest.raises(ArgumentsError) as info:
        load_config_file(config)
    assert str(info.value) == f"{config}: not UTF-8 text (byte 0xf6 on line 2); save the config file as UTF-8"
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"max_steps": 3}).encode())
    assert load_config_file(bom) == {"max_steps": 3}


def test_explicit_fields_come_from_the_file_and_the_flags(tmp_path):
    config = write(tmp_path / "run.yaml", "max_steps: 10\nd_model: 64\n")
    parsed = parse_recipe_args_full(TYPES, [str(config), "--learning_rate=1e-3", "--predict_with_generate"],
                                    defaults={"logging_steps": 3})
    assert parsed.explicit == {"max_steps", "d_model", "learning_rate", "predict_with_generate"}
    assert parsed.config_path == str(config) and parsed.values[-1].logging_steps == 3


def test_an_unquoted_no_is_the_choice_no(tmp_path):
    """YAML reads `eval_strategy: no` as false; where "no" is one of the choices it means "no" (it was
    `invalid choice: 'false'`). Booleans elsewhere stay booleans."""
    config = write(tmp_path / "run.yaml", "eval_strategy: no\nsave_strategy: no\npredict_with_generate: no\n"
                                          "output_dir: out\n")
    *_, training = parse_recipe_args(TYPES, [str(config)])
    assert training.eval_strategy == "no" and training.save_strategy == "no"
    assert training.predict_with_generate is False
