"""The training recipes: config-file parsing, shared helpers, and real end-to-end runs through `accelerate launch`.

The end-to-end tests train tiny models for a few steps on tiny data in a subprocess and check what a user
gets: an output directory plain transformers loads, exact 2:4 sparsity in every targeted layer (checked on
the saved weights), finite metrics, and the results/history/plot/card files.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    Seq2SeqTrainingArguments,
    TrainingArguments,
)
from transformers.pytorch_utils import Conv1D

from nm_hf.arguments import SparsityArguments
from nm_hf.recipe import (
    ArgumentsError,
    TranslationDataArguments,
    TranslationModelArguments,
    apply_config_overrides,
    batch_token_count,
    format_results_table,
    load_config_file,
    parse_recipe_args,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ACCELERATE = Path(sys.executable).with_name("accelerate")
TRANSLATION_TYPES = (TranslationModelArguments, TranslationDataArguments, SparsityArguments,
                     Seq2SeqTrainingArguments)


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------- config files


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_then_flags_override(tmp_path):
    config = write(tmp_path / "run.yaml", "learning_rate: 3e-3\nmax_steps: 10\nd_model: 64\n"
                   "sparsity: '4:8'\npredict_with_generate: false\nreport_to: [tensorboard]\n"
                   "generation_max_length: null\nlr_scheduler_type: inverse_sqrt\n")
    model, data, sparsity, training = parse_recipe_args(
        TRANSLATION_TYPES, [str(config), "--max_steps", "20", "--predict_with_generate"],
        defaults={"output_dir": "from-defaults", "max_steps": 5, "logging_steps": 7})
    assert training.learning_rate == pytest.approx(3e-3)  # YAML reads 3e-3 as a string; argparse converts it
    assert training.max_steps == 20  # flag beats file beats recipe default
    assert training.logging_steps == 7  # recipe default beats dataclass default
    assert training.output_dir == "from-defaults"
    assert training.predict_with_generate is True
    assert training.report_to == ["tensorboard"]  # a list for a field argparse takes one value for
    assert training.generation_max_length is None
    assert str(training.lr_scheduler_type.value) == "inverse_sqrt"
    assert (model.d_model, sparsity.to_config().pattern, data.dataset) == (64, "4:8", "ding")


def test_json_config_and_no_config(tmp_path):
    config = write(tmp_path / "run.json", json.dumps({"max_steps": 3, "method": "ste"}))
    *_, sparsity, training = parse_recipe_args(TRANSLATION_TYPES, [str(config)])
    assert (training.max_steps, sparsity.method) == (3, "ste")
    *_, training = parse_recipe_args(TRANSLATION_TYPES, ["--max_steps", "4"])
    assert training.max_steps == 4


def test_unknown_config_key_names_key_file_and_suggestion(tmp_path):
    config = write(tmp_path / "typo.yaml", "max_steps: 10\nlearning_rat: 0.1\n")
    with pytest.raises(ArgumentsError) as info:
        parse_recipe_args(TRANSLATION_TYPES, [str(config)])
    message = str(info.value)
    assert str(config) in message and "'learning_rat'" in message and "did you mean 'learning_rate'" in message


def test_bad_config_value_names_the_file(tmp_path):
    config = write(tmp_path / "bad.yaml", "method: magnitude\n")
    with pytest.raises(ArgumentsError) as info:
        parse_recipe_args(TRANSLATION_TYPES, [str(config)])
    assert str(config) in str(info.value) and "--method" in str(info.value) and "magnitude" in str(info.value)
    config = write(tmp_path / "bad2.yaml", "max_steps: ten\n")
    with pytest.raises(ArgumentsError, match="bad2.yaml.*--max_steps.*invalid int value"):
        parse_recipe_args(TRANSLATION_TYPES, [str(config)])
    config = write(tmp_path / "bad3.yaml", "d_model: [1, 2]\n")
    with pytest.raises(ArgumentsError, match="bad3.yaml: key 'd_model' takes a single value"):
        parse_recipe_args(TRANSLATION_TYPES, [str(config)])


def test_sparsity_errors_from_the_config_name_the_flag(tmp_path):
    config = write(tmp_path / "s.yaml", "sparsity: '2-4'\n")
    with pytest.raises(ValueError, match="--sparsity must look like N:M"):
        parse_recipe_args(TRANSLATION_TYPES, [str(config)])


@pytest.mark.parametrize(("argv", "message"), [
    (["--max_stepz", "3"], "'--max_stepz' (did you mean '--max_steps'?)"),
    (["--max_step", "3"], "'--max_step'"),  # no prefix abbreviations
    (["run.txt"], "the first argument must be a config file"),
])
def test_bad_command_lines(argv, message):
    with pytest.raises(ArgumentsError) as info:
        parse_recipe_args(TRANSLATION_TYPES, argv)
    assert message in str(info.value)


def test_config_file_problems(tmp_path):
    with pytest.raises(ArgumentsError, match="config file not found"):
        load_config_file(tmp_path / "missing.yaml")
    with pytest.raises(ArgumentsError, match="expected a mapping"):
        load_config_file(write(tmp_path / "list.yaml", "- a\n- b\n"))
    with pytest.raises(ArgumentsError, match="cannot parse it"):
        load_config_file(write(tmp_path / "broken.yaml", "a: [1, 2\n"))
    assert load_config_file(write(tmp_path / "empty.yaml", "")) == {}


@pytest.mark.parametrize("config", sorted(p.name for p in (RECIPES / "configs").glob("*.yaml")))
def test_shipped_configs_parse(config):
    recipe = load_recipe("translation" if config.startswith("translation") else "language_modeling")
    *_, sparsity, training = parse_recipe_args(recipe.ARGUMENT_TYPES, [str(RECIPES / "configs" / config)],
                                               defaults=recipe.RECIPE_DEFAULTS)
    assert sparsity.to_config().pattern == "2:4" and sparsity.method == "sr-ste"
    assert training.max_steps > 0 and training.output_dir.startswith("runs/")


# --------------------------------------------------------------------------------------------- helpers


def test_config_overrides_are_checked_before_any_is_applied():
    from transformers import GPT2Config

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4)
    assert apply_config_overrides(config, "n_layer=3, resid_pdrop=0.25,scale_attn_weights=false") == {
        "n_layer": 3, "resid_pdrop": 0.25, "scale_attn_weights": False}
    assert (config.n_layer, config.resid_pdrop, config.scale_attn_weights) == (3, 0.25, False)
    with pytest.raises(ValueError, match="--config_overrides: GPT2Config has no attribute 'n_layers'"):
        apply_config_overrides(config, "n_head=8,n_layers=4")
    with pytest.raises(ValueError, match="--config_overrides: n_head='eight' is not a valid int"):
        apply_config_overrides(config, "n_layer=5,n_head=eight")
    with pytest.raises(ValueError, match="is not key=value"):
        apply_config_overrides(config, "n_layer")
    assert (config.n_head, config.n_layer) == (4, 3)  # nothing applied by the failed calls


def test_results_table_flattens_nested_results():
    table = format_results_table({"test_bleu": 12.3456, "train": {"steps": 1200, "ok": True}, "l": ["a", "b"]},
                                 title="demo")
    lines = table.splitlines()
    assert lines[1] == "demo"
    assert any(line.split() == ["test_bleu", "12.3456"] for line in lines)
    assert any(line.split() == ["train/steps", "1,200"] for line in lines)
    assert any(line.split() == ["train/ok", "True"] for line in lines)
    assert any(line.split() == ["l", "a,", "b"] for line in lines)


def test_batch_token_count_counts_non_pad_source_and_target_tokens():
    inputs = {"input_ids": torch.ones(2, 5, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
              "labels": torch.tensor([[4, 5, -100], [4, 5, 6]])}
    assert batch_token_count(inputs, count_label_tokens=True) == 8 + 5
    assert batch_token_count(inputs, count_label_tokens=False) == 8


def test_shared_tokenizer_trains_once_writes_nothing_and_reuses_on_resume(tmp_path):
    from nm_hf.recipe import resume_dirs, shared_tokenizer
    from nm_hf.tokenization import train_translation_tokenizer

    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none")
    calls = []

    def train():
        calls.append(1)
        return train_translation_tokenizer(["ein kleiner Test", "a small test"] * 5, vocab_size=120, min_frequency=1)

    first = shared_tokenizer(args, train, reuse_from=resume_dirs(args))
    assert calls == [1] and not out.exists()  # nothing written: the tokenizer is saved with the trained model
    first.save_pretrained(out)
    resumed = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none",
                                resume_from_checkpoint=str(out / "checkpoint-5"))
    again = shared_tokenizer(resumed, train, reuse_from=resume_dirs(resumed))
    assert calls == [1] and again.get_vocab() == first.get_vocab()
    shared_tokenizer(args, train, reuse_from=resume_dirs(args))  # a fresh run trains again
    assert calls == [1, 1]


def test_recipe_trainer_evaluates_in_dataset_order_with_length_grouping(tmp_path):
    """`--train_sampling_strategy group_by_length` must not reorder evaluation (BLEU pairs by position)."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer

    from nm_hf.recipe import with_token_throughput
    from nm_hf.tokenization import train_translation_tokenizer
    from tiny_models import tiny_model

    tokenizer = train_translation_tokenizer(["a b c d e f g h"] * 10, vocab_size=80, min_frequency=1)
    rows = [{"input_ids": [5] * n + [1], "labels": [6, 1]} for n in (1, 9, 3, 12, 2, 7, 5, 11, 4, 8, 6, 10)]
    dataset = Dataset.from_list(rows)
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                    per_device_eval_batch_size=2, train_sampling_strategy="group_by_length")
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

    def order(trainer_cls):
        trainer = trainer_cls(model=tiny_model("bart"), args=args, data_collator=collator, eval_dataset=dataset)
        lengths = []
        for batch in trainer.get_eval_dataloader():
            lengths += batch["attention_mask"].sum(-1).tolist()
        return lengths

    expected = [len(r["input_ids"]) for r in rows]
    assert order(with_token_throughput(Seq2SeqTrainer, count_label_tokens=True)) == expected
    assert order(Seq2SeqTrainer) != expected  # what the stock Trainer does: length-grouped evaluation


def test_bleu_metric_scores_against_raw_references():
    from nm_hf.tokenization import train_translation_tokenizer

    sentences = ["das ist ein kleiner Test .", "ein Haus am See ."] * 20
    tokenizer = train_translation_tokenizer(sentences, vocab_size=200, min_frequency=1)
    ids = tokenizer(sentences[:2])["input_ids"]
    width = max(len(x) for x in ids)
    preds = np.array([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
    labels = np.where(preds == tokenizer.pad_token_id, -100, preds)
    metric = load_recipe("translation").BleuMetric(tokenizer, references=sentences[:2])
    scores = metric(SimpleNamespace(predictions=preds, label_ids=labels))
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    # the control scores the same output against the references rotated by one sentence
    assert scores["bleu_control"] < 20 and scores["chrf_control"] < 50
    content = [len(x) - 1 for x in ids]  # without the eos the tokenizer appends
    assert scores["gen_len"] == pytest.approx(sum(content) / 2)
    eos_padded = np.where(preds == tokenizer.pad_token_id, tokenizer.eos_token_id, preds)  # as beam search pads
    assert metric(SimpleNamespace(predictions=eos_padded, label_ids=labels))["gen_len"] == scores["gen_len"]
    assert metric.last_hypotheses == sentences[:2]
    metric.references = ["völlig andere Wörter hier", "und hier auch nichts"]
    assert metric(SimpleNamespace(predictions=preds, label_ids=labels))["bleu"] < 5
    metric.references = ["only one reference"]  # wrong length: falls back to the decoded labels
    assert metric(SimpleNamespace(predictions=preds, label_ids=labels))["bleu"] == pytest.approx(100.0)
    # one sentence: nothing to rotate, so no control (it would equal the score)
    metric.references = None
    one = metric(SimpleNamespace(predictions=preds[:1], label_ids=labels[:1]))
    assert one["bleu"] == pytest.approx(100.0) and "bleu_control" not in one and "chrf_control" not in one


# --------------------------------------------------------------------------------------------- end to end

WORDS_EN = ["one", "two", "three", "four", "five", "red", "green", "house", "cat", "dog"]
WORDS_DE = ["eins", "zwei", "drei", "vier", "fünf", "rot", "grün", "Haus", "Katze", "Hund"]
SECRET = "hf_RecipeTestSecret0123456789"  # a Hub-token-shaped secret that must never be recorded


def write_parallel(prefix: Path, n: int, seed: int) -> None:
    """A toy word-by-word en->de corpus as <prefix>.en / <prefix>.de (line-aligned)."""
    rng = np.random.default_rng(seed)
    en, de = [], []
    for _ in range(n):
        idx = rng.integers(0, len(WORDS_EN), size=rng.integers(3, 8))
        en.append(" ".join(WORDS_EN[i] for i in idx) + " .")
        de.append(" ".join(WORDS_DE[i] for i in idx) + " .")
    prefix.with_suffix(".en").write_text("\n".join(en) + "\n", encoding="utf-8")
    prefix.with_suffix(".de").write_text("\n".join(de) + "\n", encoding="utf-8")


TINY_TRANSLATION = ["--d_model", "32", "--ffn_dim", "64", "--encoder_layers", "1", "--decoder_layers", "1",
                    "--num_attention_heads", "4", "--vocab_size", "120", "--min_frequency", "1",
                    "--max_position_embeddings", "64", "--max_source_length", "32", "--max_target_length", "32",
                    "--max_steps", "6", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
                    "--learning_rate", "3e-3", "--warmup_steps", "2", "--label_smoothing_factor", "0.1",
                    "--generation_max_length", "16", "--logging_steps", "2", "--eval_strategy", "steps",
                    "--eval_steps", "6", "--disable_tqdm", "true", "--seed", "0",
                    "--train_sampling_strategy", "group_by_length"]

# no --learning_rate/--warmup_steps/--logging_steps: the LM runs use the recipe's from-scratch defaults
TINY_LM = ["--d_model", "32", "--ffn_dim", "64", "--num_layers", "2", "--num_attention_heads", "4",
           "--vocab_size", "300", "--block_size", "32", "--max_position_embeddings", "64",
           "--max_train_samples", "300", "--max_eval_samples", "60", "--max_steps", "6",
           "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
           "--disable_tqdm", "true", "--seed", "0"]


def launch(script: str, args: list[str], processes: int = 1, timeout: int = 300,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), **(env or {})}
    multi = ["--multi_gpu"] if processes > 1 else []
    cmd = [str(ACCELERATE), "launch", *multi, "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPES / script), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                            preexec_fn=lambda: os.umask(0o022))
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def group_nonzeros(weight: torch.Tensor, m: int, group_dim: int) -> torch.Tensor:
    """Non-zeros per group of m consecutive weights along `group_dim` (written independently of nm_hf)."""
    w = weight if group_dim == -1 or group_dim == weight.dim() - 1 else weight.transpose(0, 1)
    assert w.shape[-1] % m == 0
    return (w.reshape(*w.shape[:-1], w.shape[-1] // m, m) != 0).sum(-1)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def check_common_outputs(out: Path) -> dict:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "results.json", "sparsity_history.json",
                 "sparsity.png", "README.md", "train_results.json", "eval_results.json", "test_results.json",
                 "all_results.json"):
        assert (out / name).is_file(), f"{name} missing in {out}: {sorted(p.name for p in out.iterdir())}"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert mode(out / "results.json") == 0o644  # the umask's mode (launched under umask 022), not mkstemp's 0600
    assert (out / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "sparsity_history.json").read_text())
    assert history["records"] and history["records"][-1]["step"] == 6
    results = json.loads((out / "results.json").read_text())
    assert results["nm_ok"] is True and results["sparsity"] >= 0.5
    assert results["train"]["steps"] == 6 and results["train"]["tokens"] > 0 and results["tokens_per_second"] > 0
    # CPU runs keep freed memory by default where the C library is glibc (nm_hf.keep_freed_memory); the
    # recipes train on CUDA where it is available, and then leave the allocator alone
    on_cpu = not torch.cuda.is_available()
    assert results["train"]["keep_freed_memory"] is (on_cpu and platform.libc_ver()[0] == "glibc")
    assert isinstance(results["sad_from_init"], int)
    # the Trainer's per-split metric files, as transformers' examples write them
    everything = json.loads((out / "all_results.json").read_text())
    assert {"train_loss", "eval_loss", "test_loss"} <= set(everything)
    assert json.loads((out / "test_results.json").read_text())["test_loss"] == pytest.approx(results["test_loss"])
    assert results["run"]["total_time_s"] >= results["train_runtime_s"]
    environment = results["run"]["environment"]  # what the last digits of a run depend on
    assert environment["versions"]["torch"] == torch.__version__ and environment["torch_threads"] >= 1
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and environment["cpu"]
    assert environment["device"] == ("cpu" if on_cpu else torch.cuda.get_device_name())
    card = (out / "README.md").read_text()
    assert "2:4" in card and "nm-sparsity" in card
    state = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("sparsity/sad" in entry for entry in state)  # sparsity metrics reached the logs
    return results


def check_translation_run(out: Path, processes: int, n_test: int) -> dict:
    results = check_common_outputs(out)
    assert results["run"]["environment"]["world_size"] == processes
    for key in ("test_bleu", "test_chrf", "eval_bleu", "eval_chrf", "test_loss", "test_bleu_control"):
        assert isinstance(results[key], float) and math.isfinite(results[key]), (key, results[key])
    assert 0.0 <= results["test_bleu"] <= 100.0
    assert results["train"]["processes"] == processes
    assert results["evaluation"]["test_samples"] == n_test
    predictions = (out / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    assert len(predictions) == n_test  # each test sentence exactly once, also with 2 processes
    assert mode(out / "generated_predictions.txt") == 0o644
    samples = results["samples"]
    assert len(samples) == 5 and [s["index"] for s in samples] == sorted({s["index"] for s in samples})
    assert all(predictions[s["index"]] == s["output"] for s in samples)

    model = AutoModelForSeq2SeqLM.from_pretrained(out)  # plain transformers, no nm_hf
    tokenizer = AutoTokenizer.from_pretrained(out)
    record = model.config.nm_sparsity
    assert record["state"] == "finalized" and (record["n"], record["m"]) == (2, 4)
    linear_names = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    targeted = set(record["targeted_modules"])
    assert targeted == linear_names - {"lm_head"}  # every projection of encoder and decoder, not the tied head
    modules = dict(model.named_modules())
    for name in targeted:
        counts = group_nonzeros(modules[name].weight, 4, group_dim=-1)  # nn.Linear: [out, in], groups along in
        assert (counts <= 2).all() and (counts == 2).float().mean() > 0.99, name
    # the saved model generates with plain transformers, and generated_predictions.txt is in test-set order
    batch = tokenizer(["one two three ."], return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=5)
    assert generated.shape[0] == 1 and generated[0, 0].item() == model.config.decoder_start_token_id
    return results


def regenerate(out: Path, sources: list[str]) -> list[str]:
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    hypotheses = []
    for source in sources:  # one at a time: no padding effects
        ids = model.generate(**tokenizer([source], return_tensors="pt"))
        hypotheses += [h.strip() for h in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return hypotheses


def test_translation_recipe_end_to_end(tmp_path):
    """The fast suite's real training run: accelerate launch, 1 process, local parallel files, pushed to a
    loopback Hub with a token on the command line (which must not be recorded anywhere)."""
    from hub_server import HubServer

    write_parallel(tmp_path / "train", 400, seed=0)
    write_parallel(tmp_path / "valid", 12, seed=1)
    write_parallel(tmp_path / "test", 10, seed=2)
    out = tmp_path / "out"
    with HubServer(token=SECRET) as hub:
        result = launch("translation.py", ["--train_file", str(tmp_path / "train.en"),
                                           "--validation_file", str(tmp_path / "valid.en"),
                                           "--test_file", str(tmp_path / "test.de"),
                                           "--output_dir", str(out), *TINY_TRANSLATION,
                                           "--push_to_hub", "--hub_model_id", "tester/tiny-mt",
                                           "--hub_token", SECRET],
                        env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
        uploaded = dict(hub.repos["tester/tiny-mt"].files)
    results = check_translation_run(out, processes=1, n_test=10)
    sources = (tmp_path / "test.en").read_text(encoding="utf-8").splitlines()
    references = (tmp_path / "test.de").read_text(encoding="utf-8").splitlines()
    predictions = (out / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    assert regenerate(out, sources) == predictions
    assert "test_bleu" in result.stdout and "outputs in" in result.stdout  # the results table
    assert results["dataset"] == "local files (train.en)" and results["model"]["from_scratch"] is True
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("eval_bleu" in entry for entry in history)  # BLEU during training (eval_steps)
    # a few test sentences printed at the end: source, output, reference
    for sample in results["samples"]:
        assert sample["source"] == sources[sample["index"]] and sample["reference"] == references[sample["index"]]
        assert f"source:    {sample['source']}" in result.stdout
        assert f"reference: {sample['reference']}" in result.stdout

    # the token reached the Hub (the push worked) but no file, card, table or log line
    assert "--hub_token REDACTED" in results["run"]["command"]
    assert SECRET not in result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert {"config.json", "model.safetensors", "results.json", "README.md", "generated_predictions.txt"} <= set(uploaded)
    assert "training_args.bin" not in uploaded and "trainer_state.json" not in uploaded
    for name, data in uploaded.items():
        assert SECRET.encode() not in data, name
    assert re.search(r"--hub_token \S*redacted", uploaded["README.md"].decode(), re.IGNORECASE)


def test_translation_recipe_resumed_at_an_epoch_boundary_equals_an_uninterrupted_run(tmp_path):
    """The results lanes' `--resume` (benchmarks/results_table.py) relies on this: with the translation
    configs' length-grouped sampler, a run continued from a checkpoint at an epoch boundary (here after
    the second epoch) trains on the same batches with the same dropout as the run that went on."""
    from safetensors.torch import load_file

    write_parallel(tmp_path / "train", 120, seed=0)  # 15 steps per epoch at batch 8
    write_parallel(tmp_path / "valid", 8, seed=1)
    write_parallel(tmp_path / "test", 8, seed=2)
    data = ["--train_file", str(tmp_path / "train.en"), "--validation_file", str(tmp_path / "valid.en"),
            "--test_file", str(tmp_path / "test.de")]
    common = [*data, *TINY_TRANSLATION, "--method", "sr-ste", "--max_steps", "40", "--eval_strategy", "no",
              "--save_strategy", "steps", "--save_steps", "15"]
    launch("translation.py", [*common, "--output_dir", str(tmp_path / "straight")])
    launch("translation.py", [*common, "--output_dir", str(tmp_path / "resumed"),
                              "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-30")])
    straight, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("straight", "resumed")]
    assert results[0]["test_loss"] == results[1]["test_loss"] and results[1]["train"]["steps"] == 40
    # it did resume: a run that ignored the checkpoint would train the same 40 steps from the same seed and
    # end equal too; the resumed process trained steps 31-40 only (tokens counted in this process)
    assert 0 < results[1]["train"]["tokens"] < results[0]["train"]["tokens"] / 3


def test_translation_recipe_two_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: two gloo ranks, one set of outputs."""
    write_parallel(tmp_path / "train", 400, seed=0)
    write_parallel(tmp_path / "test", 11, seed=2)  # odd: the distributed sampler pads the last batch
    out = tmp_path / "out"
    result = launch("translation.py", ["--train_file", str(tmp_path / "train.en"), "--test_file",
                                       str(tmp_path / "test.en"), "--output_dir", str(out), *TINY_TRANSLATION],
                    processes=2)
    check_translation_run(out, processes=2, n_test=11)
    assert result.stdout.count("outputs in") == 1  # only the main process prints the table


def check_lm_run(out: Path, processes: int, model_type: str) -> dict:
    results = check_common_outputs(out)
    assert results["run"]["environment"]["world_size"] == processes
    for key in ("test_loss", "eval_loss", "test_perplexity", "eval_perplexity"):
        assert math.isfinite(results[key]) and results[key] > 0, (key, results[key])
    assert results["test_perplexity"] == pytest.approx(math.exp(results["test_loss"]), rel=1e-3)
    assert results["train"]["processes"] == processes and results["model"]["type"] == model_type
    # the from-scratch defaults (no --learning_rate/--logging_steps given): a log every step, and it learns
    losses = [entry["loss"] for entry in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses  # at the stock lr 5e-5 it barely moves
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    record = model.config.nm_sparsity
    assert record["state"] == "finalized" and record["targeted_modules"]
    modules = dict(model.named_modules())
    for name in record["targeted_modules"]:
        module = modules[name]
        if model_type == "gpt2":
            assert isinstance(module, Conv1D)  # GPT-2 keeps its [in, out] Conv1D layout
            counts = group_nonzeros(module.weight, 4, group_dim=0)  # groups along the input dim 0
        else:
            counts = group_nonzeros(module.weight, 4, group_dim=-1)
        assert (counts <= 2).all() and (counts == 2).float().mean() > 0.99, name
    expected = {"gpt2": {"c_attn", "c_proj", "c_fc"},
                "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}[model_type]
    assert {name.rsplit(".", 1)[-1] for name in record["targeted_modules"]} == expected
    ids = tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    return results


def test_language_modeling_recipe_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = launch("language_modeling.py", ["--output_dir", str(out), *TINY_LM])
    results = check_lm_run(out, processes=1, model_type="gpt2")
    assert results["dataset"].startswith("pydoc") and "test_perplexity" in result.stdout


def test_language_modeling_recipe_two_processes(tmp_path):
    """Two gloo ranks through `accelerate launch --multi_gpu`: one set of outputs, GPT-2 Conv1D still 2:4."""
    out = tmp_path / "out"
    result = launch("language_modeling.py", ["--output_dir", str(out), *TINY_LM], processes=2)
    check_lm_run(out, processes=2, model_type="gpt2")
    assert result.stdout.count("outputs in") == 1  # only the main process prints the table


@pytest.mark.slow
def test_language_modeling_recipe_llama_two_processes(tmp_path):
    out = tmp_path / "out"
    launch("language_modeling.py", ["--output_dir", str(out), "--model_type", "llama", *TINY_LM], processes=2)
    check_lm_run(out, processes=2, model_type="llama")


# --------------------------------------------------------------------------------------------- refusals


def run_main(recipe: str, argv: list[str], capsys) -> str:
    """`main(argv)` in this process; it must exit with status 2 and a last line `prog: error: ...`."""
    with pytest.raises(SystemExit) as info:
        load_recipe(recipe).main(argv)
    assert info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after any log lines of the stages that ran
    assert line.startswith(f"recipes/{recipe}.py: error: "), line
    return line


def test_recipe_refuses_bad_flags_before_loading_anything(tmp_path, capsys):
    never = str(tmp_path / "never")
    assert run_main("translation", ["--sparsity", "2:5:1", "--output_dir", never], capsys) == \
        "recipes/translation.py: error: --sparsity must look like N:M (e.g. 2:4), got '2:5:1'"
    assert "--push_to_hub needs --hub_model_id" in run_main("language_modeling",
                                                            ["--push_to_hub", "--output_dir", never], capsys)
    config = write(tmp_path / "c.yaml", "block_sise: 64\n")
    assert re.search(r"c.yaml: unknown key.*'block_sise' .did you mean 'block_size'",
                     run_main("language_modeling", [str(config)], capsys))
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--max_steps", "0"], "--max_steps 0: give a positive number of optimizer steps, or -1"),
    (["--max_steps", "-5"], "--max_steps -5: give a positive number"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs 0.0: must be > 0"),
    (["--do_train", "false"], "--do_train false is not supported: the recipes always train"),
    (["--do_eval", "false"], "--do_eval false is not supported"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-5"],
     "--resume_from_checkpoint /nonexistent/checkpoint-5: no such directory"),
])
def test_training_flags_that_would_run_differently_are_refused(tmp_path, capsys, argv, message):
    for recipe in ("translation", "language_modeling"):
        assert message in run_main(recipe, [*argv, "--output_dir", str(tmp_path / "never")], capsys)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(("recipe", "argv", "flags"), [
    ("translation", ["--dropout", "0.3", "--encoder_layers", "2"], "--dropout, --encoder_layers"),
    ("language_modeling", ["--d_model", "64"], "--d_model"),
])
def test_model_size_flags_with_a_pretrained_model_are_refused(tmp_path, capsys, recipe, argv, flags):
    """They only shape a model built from scratch: with --model_name_or_path they were ignored without a word
    (a config file's sizes too)."""
    config = write(tmp_path / "c.yaml", "vocab_size: 500\n")
    line = run_main(recipe, [str(config), "--model_name_or_path", str(tmp_path / "pretrained"), *argv,
                             "--output_dir", str(tmp_path / "never")], capsys)
    assert f"--vocab_size, {flags}: only for a model built from scratch" in line
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(("recipe", "argv", "message"), [
    ("translation", ["--train_file", "x.en", "--ding_min_words", "2"],
     "--ding_min_words: only for the built-in data; --dataset_name/--train_file replace it"),
    ("language_modeling", ["--train_file", "x.txt", "--dataset", "python_docs"],
     "--dataset: only for the built-in data"),
    ("language_modeling", ["--text_column", "body"], "--text_column: only for --dataset_name/--train_file data"),
])
def test_data_flags_the_data_source_would_ignore_are_refused(tmp_path, capsys, recipe, argv, message):
    module = load_recipe(recipe)
    with pytest.raises(SystemExit) as info:  # refused while parsing: nothing loaded, nothing trained
        module.parse_recipe_args_or_exit(module.ARGUMENT_TYPES, [*argv, "--output_dir", str(tmp_path / "never")],
                                         module.RECIPE_DEFAULTS, prog=module.PROG)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_translation_refuses_predict_with_generate_false_before_training(tmp_path, capsys):
    """Without generation the BLEU metric gets logits: a TypeError traceback after the whole training run."""
    write_parallel(tmp_path / "train", 40, seed=0)
    flags = [*TINY_TRANSLATION, "--max_steps", "1", "--eval_strategy", "no", "--train_file", str(tmp_path / "train")]
    line = run_main("translation", [*flags, "--predict_with_generate", "false", "--output_dir",
                                    str(tmp_path / "never")], capsys)
    assert "--predict_with_generate false is not supported" in line
    assert not (tmp_path / "never").exists()


def test_help_prints_every_flag_and_exits_0(capsys):
    for recipe in ("translation", "language_modeling"):
        with pytest.raises(SystemExit) as info:
            load_recipe(recipe).main(["--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert "--sparsity" in text and "--validation_split_size" in text and "from scratch" in text


def saved_model(out: Path) -> dict[str, bytes]:
    """A previous run's outputs (stand-ins) in `out`."""
    out.mkdir(parents=True)
    files = {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": b"weights",
             "tokenizer.json": b'{"original": true}', "results.json": b"{}"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize(("recipe", "argv", "message"), [
    ("language_modeling", ["--block_size", "64", "--max_position_embeddings", "32"],
     "--block_size 64 is longer than --max_position_embeddings 32"),
    ("language_modeling", ["--sparsity", "2:3"], "not divisible by m=3"),
    ("language_modeling", ["--target_modules", "nothing"], "--target_modules/--exclude_modules on GPT2LMHeadModel"),
    ("language_modeling", ["--exclude_modules", ".*"], "no layer left to sparsify"),
    ("translation", ["--sparsity", "2:3"], "not divisible by m=3"),
    ("translation", ["--max_position_embeddings", "16"], "--max_position_embeddings 16 is shorter than"),
    ("translation", ["--config_overrides", "d_modle=3"], "--config_overrides: MBartConfig has no attribute 'd_modle'"),
])
def test_a_failed_rerun_leaves_the_saved_model_untouched(tmp_path, capsys, recipe, argv, message):
    """Model and layer-selection problems are found before the data is loaded or anything written: a
    re-run into a directory holding a model must not replace its tokenizer.json and then fail."""
    write_parallel(tmp_path / "train", 40, seed=0)
    out = tmp_path / "out"
    before = saved_model(out)
    tiny = TINY_LM if recipe == "language_modeling" else [*TINY_TRANSLATION, "--train_file", str(tmp_path / "train")]
    line = run_main(recipe, [*tiny, *argv, "--output_dir", str(out)], capsys)
    assert message in line
    assert contents(out) == before


def test_data_problems_found_after_the_tokenizer_leave_the_output_directory_untouched(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("print('hello')\n" * 3, encoding="utf-8")
    out = tmp_path / "out"
    before = saved_model(out)
    line = run_main("language_modeling", [*TINY_LM, "--train_file", str(tmp_path / "short.txt"),
                                          "--validation_split_size", "1", "--test_split_size", "1",
                                          "--output_dir", str(out)], capsys)
    assert "has fewer than --block_size 32 tokens" in line
    assert contents(out) == before


def test_data_file_errors_are_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("def f():\n    return 'Größe'\n".encode("latin-1"))
    line = run_main("language_modeling", [*TINY_LM, "--train_file", str(bad), "--output_dir", str(tmp_path / "o")],
                    capsys)
    assert line.endswith(f"--train_file {bad}: not UTF-8 text (byte 0xf6 on line 2); convert it to UTF-8, "
                         "e.g. iconv -f latin1 -t utf-8")
    write_parallel(tmp_path / "train", 40, seed=0)
    (tmp_path / "valid.en").write_text("", encoding="utf-8")
    (tmp_path / "valid.de").write_text("", encoding="utf-8")
    line = run_main("translation", [*TINY_TRANSLATION, "--train_file", str(tmp_path / "train"),
                                    "--validation_file", str(tmp_path / "valid.en"),
                                    "--output_dir", str(tmp_path / "o")], capsys)
    assert line.endswith(f"--validation_file {tmp_path / 'valid.en'}: the file is empty (no text)")
    assert not (tmp_path / "o").exists()


def test_training_arguments_from_recipe_defaults_use_cpu_without_accelerator():
    recipe = load_recipe("language_modeling")
    *_, training = parse_recipe_args(recipe.ARGUMENT_TYPES, [], defaults=recipe.RECIPE_DEFAULTS)
    assert isinstance(training, TrainingArguments)
    assert training.use_cpu is (not torch.cuda.is_available())
    assert training.save_strategy == "no" and training.output_dir == "runs/language_modeling"


def parse_cli(recipe: str, argv: list[str]):
    module = load_recipe(recipe)
    from nm_hf.recipe import parse_recipe_args_or_exit

    parsed, _ = parse_recipe_args_or_exit(module.ARGUMENT_TYPES, argv, module.RECIPE_DEFAULTS, module.PROG,
                                          adaptive_defaults=module.adaptive_defaults)
    return parsed


def test_from_scratch_defaults_that_learn_unless_the_user_set_them(tmp_path):
    """Without a config file the stock TrainingArguments (lr 5e-5, no warm-up, a log every 50 steps) left a
    20-step from-scratch run with empty translations and no sparsity metric in the logs."""
    model, *_, training = parse_cli("translation", ["--max_steps", "20"])
    assert (training.learning_rate, training.warmup_steps, training.logging_steps) == (2e-3, 3, 2)
    assert (training.adam_beta2, training.label_smoothing_factor) == (0.98, 0.1)
    assert str(training.lr_scheduler_type.value) == "inverse_sqrt"
    *_, training = parse_cli("language_modeling", ["--max_steps", "20"])
    assert (training.learning_rate, training.warmup_steps, training.logging_steps) == (2e-3, 2, 2)
    assert (training.adam_beta2, training.weight_decay) == (0.95, 0.1)
    *_, training = parse_cli("language_modeling", ["--max_steps", "4000"])
    assert (training.warmup_steps, training.logging_steps) == (400, 50)
    *_, training = parse_cli("language_modeling", [])  # epochs: a warm-up ratio
    assert (training.warmup_steps, training.logging_steps) == (0.1, 50)
    # whatever the user sets, in a flag or the config file, wins
    config = write(tmp_path / "c.yaml", "learning_rate: 1.0e-4\nlogging_steps: 7\n")
    *_, training = parse_cli("translation", [str(config), "--max_steps", "20", "--warmup_steps", "0"])
    assert (training.learning_rate, training.warmup_steps, training.logging_steps) == (1e-4, 0, 7)
    # fine-tuning a pretrained model keeps the stock optimisation, with a log interval sized to the run
    *_, training = parse_cli("language_modeling", ["--model_name_or_path", "some/model", "--max_steps", "20"])
    assert (training.learning_rate, training.warmup_steps, training.logging_steps) == (5e-5, 0, 2)
