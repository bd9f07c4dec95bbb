"""`--prune_criterion` / `--calibration_samples`: one-shot prune of a pretrained model, then fine-tuning.

A tiny GPT-2 and a tokenizer trained offline are saved to a temporary directory as the "pretrained"
model; the recipe prunes it with Wanda on the first training blocks and fine-tunes it with the frozen
mask (`--method fixed`). The saved weights must keep exactly the mask `nm_hf.prune` gives on those
blocks, computed here independently of the recipe.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    MBartConfig,
    MBartForConditionalGeneration,
    default_data_collator,
)

import nm_hf
from nm_hf.arguments import SparsityArguments
from nm_hf.data.text import load_text_data, tokenize_and_group
from nm_hf.masks import check_nm
from nm_hf.recipe import CausalLMModelArguments
from nm_hf.tokenization import train_translation_tokenizer
from tiny_models import code_lines, save_pretrained_lm

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 32
# --learning_rate: the pretrained default (5e-5) would barely move a tiny model in 3 steps
TINY_RUN = ["--block_size", str(BLOCK), "--max_steps", "3", "--per_device_train_batch_size", "2",
            "--per_device_eval_batch_size", "8", "--learning_rate", "1e-3", "--disable_tqdm", "true", "--seed", "0"]


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"prune_recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module




@pytest.fixture(scope="module")
def pretrained_lm(tmp_path_factory) -> dict[str, Path]:
    """A tiny dense GPT-2 with its tokenizer saved as a pretrained model, and train/validation/test text files."""
    return save_pretrained_lm(tmp_path_factory.mktemp("pretrained_lm"))


def data_flags(paths: dict[str, Path]) -> list[str]:
    return ["--train_file", str(paths["train"]), "--validation_file", str(paths["validation"]),
            "--test_file", str(paths["test"])]


def expected_wanda_model(paths: dict[str, Path], samples: int, batch_size: int) -> torch.nn.Module:
    """The pretrained model pruned by `nm_hf.prune(criterion="wanda")` on the first `samples` training blocks."""
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    raw = load_text_data(train_file=paths["train"], validation_file=paths["validation"], test_file=paths["test"])
    train = tokenize_and_group(raw, tokenizer, BLOCK)["train"]
    calibration = [default_data_collator([train[i] for i in range(start, min(start + batch_size, samples))])
                   for start in range(0, samples, batch_size)]
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    return nm_hf.prune(model, SparsityArguments(method="fixed").to_config(), criterion="wanda",
                       calibration=calibration, progress=False)


def test_language_modeling_recipe_prunes_with_wanda_then_fine_tunes(pretrained_lm, tmp_path):
    out = tmp_path / "out"
    results = load_recipe("language_modeling").main([
        *TINY_RUN, *data_flags(pretrained_lm), "--model_name_or_path", str(pretrained_lm["model"]),
        "--method", "fixed", "--prune_criterion", "wanda", "--calibration_samples", "4", "--output_dir", str(out)])

    written = json.loads((out / "results.json").read_text())
    prune_record = written["sparsity_config"]["prune"]
    assert prune_record["criterion"] == "wanda"
    assert prune_record["calibration_samples"] == 4 and prune_record["calibration_batches"] == 2
    assert results["nm_ok"] is True and written["train"]["steps"] == 3

    saved = AutoModelForCausalLM.from_pretrained(out)
    record = saved.config.nm_sparsity
    assert record["method"] == "fixed" and record["targeted_modules"]
    expected = dict(expected_wanda_model(pretrained_lm, samples=4, batch_size=2).named_modules())
    dense = dict(AutoModelForCausalLM.from_pretrained(pretrained_lm["model"]).named_modules())
    saved_modules = dict(saved.named_modules())
    differs_from_magnitude = False
    for name in record["targeted_modules"]:
        weight, layer = saved_modules[name].weight, expected[name]
        assert check_nm(weight, 2, 4, dim=0), name  # GPT-2 Conv1D: groups along dim 0
        mask = layer.current_mask()
        assert torch.equal(weight != 0, mask), name  # the Wanda mask of the first 4 blocks, kept while training
        assert not torch.equal(weight, layer.weight.detach()), name  # and the kept weights were fine-tuned
        magnitude = nm_hf.masks.nm_mask(dense[name].weight.detach().abs(), 2, 4, dim=0)
        differs_from_magnitude |= not torch.equal(mask, magnitude)
    assert differs_from_magnitude  # the recipe really used the calibration data


@pytest.mark.parametrize(("recipe", "argv", "message"), [
    ("language_modeling", ["--prune_criterion", "wanda"],
     "--prune_criterion wanda needs --model_name_or_path: a model built from scratch has nothing to prune"),
    ("translation", ["--prune_criterion", "magnitude"],
     "--prune_criterion magnitude needs --model_name_or_path"),
    ("language_modeling", ["--model_name_or_path", "MODEL", "--prune_criterion", "wanda", "--calibration_samples",
                           "0"], "--calibration_samples must be a positive integer, got 0"),
    ("language_modeling", ["--calibration_samples", "8"], "--calibration_samples needs --prune_criterion wanda or "
                                                          "sparsegpt"),
    ("language_modeling", ["--model_name_or_path", "MODEL", "--prune_criterion", "magnitude",
                           "--calibration_samples", "8"], "magnitude uses no calibration data"),
    ("language_modeling", ["--model_name_or_path", "MODEL", "--prune_criterion", "wanda", "--method", "dense"],
     "--prune_criterion wanda needs a --method that masks (e.g. fixed or sr-ste), not 'dense'"),
    ("language_modeling", ["--model_name_or_path", "MODEL", "--prune_criterion", "magnitude", "--method", "fixed",
                           "--dense_warmup_fraction", "0.5"], "--dense_warmup_fraction both choose the first mask"),
    ("language_modeling", ["--model_name_or_path", "MODEL", "--prune_criterion", "obs"],
     "invalid choice: 'obs' (choose from 'magnitude', 'wanda', 'sparsegpt')"),
])
def test_prune_flags_refused_before_anything_is_written(pretrained_lm, tmp_path, capsys, recipe, argv, message):
    out = tmp_path / "never"
    argv = [str(pretrained_lm["model"]) if arg == "MODEL" else arg for arg in argv]
    with pytest.raises(SystemExit) as info:
        load_recipe(recipe).main([*argv, "--output_dir", str(out)])
    assert info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"recipes/{recipe}.py: error: ") and message in line, line
    assert not out.exists()


def test_prune_flags_are_checked_by_the_model_arguments():
    args = CausalLMModelArguments(model_name_or_path="m", prune_criterion="sparsegpt", calibration_samples=16)
    assert (args.prune_criterion, args.calibration_samples) == ("sparsegpt", 16)
    with pytest.raises(ValueError, match="--calibration_samples must be a positive integer, got -3"):
        CausalLMModelArguments(model_name_or_path="m", prune_criterion="wanda", calibration_samples=-3)


# --------------------------------------------------------------------------------------------- translation


@pytest.fixture(scope="module")
def pretrained_mbart(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained_mbart")
    pairs = {split: (code_lines(n, seed), code_lines(n, seed + 10)) for split, (n, seed)
             in {"train": (40, 0), "validation": (8, 1), "test": (8, 2)}.items()}
    for split, (en, de) in pairs.items():
        (root / f"{split}.en").write_text("\n".join(en) + "\n", encoding="utf-8")
        (root / f"{split}.de").write_text("\n".join(de) + "\n", encoding="utf-8")
    tokenizer = train_translation_tokenizer(pairs["train"][0] + pairs["train"][1], vocab_size=120, min_frequency=1)
    torch.manual_seed(0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = MBartForConditionalGeneration(MBartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=pad, eos_token_id=eos, bos_token_id=eos, decoder_start_token_id=eos, forced_eos_token_id=eos))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return {"model": root / "model", "train": root / "train", "validation": root / "validation",
            "test": root / "test"}


TINY_TRANSLATION_RUN = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
                        "--max_source_length", "32", "--max_target_length", "32", "--generation_max_length", "8",
                        "--disable_tqdm", "true", "--seed", "0"]


def test_translation_recipe_prunes_by_magnitude_and_refuses_wanda_on_two_stacks(pretrained_mbart, tmp_path, capsys):
    """Magnitude prunes every targeted layer of the encoder-decoder; Wanda, which goes block by block through
    one stack, is refused with the reason before anything is written."""
    flags = [*TINY_TRANSLATION_RUN, *data_flags(pretrained_mbart), "--model_name_or_path", str(pretrained_mbart["model"])]
    never = tmp_path / "never"
    with pytest.raises(SystemExit) as info:
        load_recipe("translation").main([*flags, "--prune_criterion", "wanda", "--output_dir", str(never)])
    assert info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("recipes/translation.py: error: --prune_criterion wanda: criterion 'wanda' prunes "
                           "block by block"), line
    assert not never.exists()

    out = tmp_path / "out"
    results = load_recipe("translation").main([*flags, "--method", "fixed", "--prune_criterion", "magnitude",
                                               "--output_dir", str(out)])
    assert results["nm_ok"] is True
    written = json.loads((out / "results.json").read_text())
    assert written["sparsity_config"]["prune"] == {**written["sparsity_config"]["prune"], "criterion": "magnitude",
                                                   "calibration_samples": None, "calibration_batches": None}
    saved = dict(MBartForConditionalGeneration.from_pretrained(out).named_modules())
    dense = dict(MBartForConditionalGeneration.from_pretrained(pretrained_mbart["model"]).named_modules())
    targeted = json.loads((out / "config.json").read_text())["nm_sparsity"]["targeted_modules"]
    assert targeted
    for name in targeted:
        weight = saved[name].weight
        assert check_nm(weight, 2, 4, dim=1), name
        magnitude = nm_hf.masks.nm_mask(dense[name].weight.detach().abs(), 2, 4, dim=1)
        assert torch.equal(weight != 0, magnitude), name  # the magnitude mask of the pretrained weights, frozen


def test_sparsegpt_then_sr_ste_with_more_calibration_samples_than_training_blocks(pretrained_lm, tmp_path):
    """The default method (sr-ste) continues from the SparseGPT-pruned model (the trainer accepts the model
    sparsified with the run's config); asking for more calibration examples than there are uses them all."""
    out = tmp_path / "out"
    results = load_recipe("language_modeling").main([
        *TINY_RUN, *data_flags(pretrained_lm), "--model_name_or_path", str(pretrained_lm["model"]),
        "--prune_criterion", "sparsegpt", "--calibration_samples", "100000", "--output_dir", str(out)])
    tokenizer = AutoTokenizer.from_pretrained(pretrained_lm["model"])
    raw = load_text_data(train_file=pretrained_lm["train"], validation_file=pretrained_lm["validation"],
                         test_file=pretrained_lm["test"])
    blocks = len(tokenize_and_group(raw, tokenizer, BLOCK)["train"])
    prune_record = json.loads((out / "results.json").read_text())["sparsity_config"]["prune"]
    assert prune_record["criterion"] == "sparsegpt" and prune_record["calibration_samples"] == blocks
    assert prune_record["calibration_batches"] == (blocks + 1) // 2
    assert results["sparsity_config"]["method"] == "sr-ste" and results["nm_ok"] is True
    saved = AutoModelForCausalLM.from_pretrained(out)
    modules = dict(saved.named_modules())
    for name in saved.config.nm_sparsity["targeted_modules"]:
        assert check_nm(modules[name].weight, 2, 4, dim=0), name
