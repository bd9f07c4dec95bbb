"""Model cards: license, hyperparameters, framework versions, a usage snippet that runs, real dataset ids, no secrets."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import PreTrainedTokenizerFast, TrainingArguments
from transformers.pipelines import SUPPORTED_TASKS

import nm_hf
from nm_hf.card import is_dataset_id, pipeline_tag_for, redact_secrets, write_model_card
from nm_hf.checkpoint import inspect_checkpoint
from nm_hf.config import SparsityConfig
from nm_hf.hub import prepare_upload
from nm_hf.injection import finalize, sparsify
from tiny_models import tiny_model


def sparse_model(model_type: str):
    return finalize(sparsify(tiny_model(model_type), SparsityConfig()))


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


def python_blocks(text: str) -> list[str]:
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


@pytest.fixture
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 96)}}  # one token per id
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="w2")


def test_license_only_when_given(tmp_path):
    sparse_model("llama").save_pretrained(tmp_path)
    write_model_card(tmp_path)
    assert "license" not in front_matter((tmp_path / "README.md").read_text())
    write_model_card(tmp_path, license="apache-2.0")
    assert front_matter((tmp_path / "README.md").read_text())["license"] == "apache-2.0"


def test_training_hyperparameters_and_framework_versions(tmp_path):
    import transformers

    sparse_model("llama").save_pretrained(tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=3e-4, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, seed=7, max_steps=100, hub_token="hf_secretsecretsecret1",
                             report_to=[])
    text = str(write_model_card(tmp_path, training_args=args))
    assert "## Training hyperparameters" in text
    for row in ("| learning_rate | 0.0003 |", "| per_device_train_batch_size | 8 |", "| seed | 7 |",
                "| gradient_accumulation_steps | 2 |", "| max_steps | 100 |", "| total_train_batch_size | 16 |"):
        assert row in text, row
    assert "hf_secret" not in text
    assert f"- nm_hf {nm_hf.__version__}" in text and f"- transformers {transformers.__version__}" in text
    assert f"- torch {torch.__version__}" in text
    # without TrainingArguments: what trainer_state.json and the results say
    (tmp_path / "trainer_state.json").write_text(json.dumps({"train_batch_size": 16, "max_steps": 300,
                                                            "global_step": 300, "log_history": []}))
    text = str(write_model_card(tmp_path, results={"train": {"steps": 300, "tokens": 52000}}))
    assert "| train_batch_size | 16 |" in text and "| training_tokens | 52000 |" in text


def test_usage_snippets_run(tmp_path, tokenizer):
    """The card's Python blocks run as written (the repo id pointing at the local folder)."""
    for model_type, auto, generates in (("llama", "AutoModelForCausalLM", True),
                                        ("marian", "AutoModelForSeq2SeqLM", True)):
        out = prepare_upload(sparse_model(model_type), tmp_path / model_type, tokenizer=tokenizer)
        text = (out / "README.md").read_text()
        blocks = python_blocks(text)
        assert f"{auto}.from_pretrained" in blocks[0] and "AutoTokenizer.from_pretrained" in blocks[0]
        assert ("model.generate(" in blocks[0]) == generates
        for block in blocks:
            exec(block.replace(f"<user>/{model_type}", str(out)), {})  # the card's own code, run as a user would


def test_compressed_snippet_and_missing_tokenizer(tmp_path):
    out = prepare_upload(sparse_model("llama"), tmp_path / "c", compressed=True)
    block = python_blocks((out / "README.md").read_text())[0]
    assert "nm_hf.load_sparse(" in block and "AutoModelForCausalLM" not in block
    assert "no tokenizer was uploaded" in block
    out = prepare_upload(sparse_model("llama"), tmp_path / "d", base_model="some/base")
    assert 'AutoTokenizer.from_pretrained("some/base")' in (out / "README.md").read_text()


def test_pipeline_tag_only_for_tasks_the_installed_transformers_runs(tmp_path):
    assert pipeline_tag_for("text-generation") == "text-generation"
    assert pipeline_tag_for("translation") == ("translation" if "translation" in SUPPORTED_TASKS else None)
    sparse_model("marian").save_pretrained(tmp_path)
    meta = front_matter(str(write_model_card(tmp_path, task="translation", results={"test_bleu": 20.0})))
    assert meta.get("pipeline_tag") == pipeline_tag_for("translation")
    assert meta["model-index"][0]["results"][0]["task"]["type"] == "translation"
    assert "translation" in meta["tags"]


def test_dataset_ids_are_real_ids(tmp_path):
    assert is_dataset_id("wikitext") and is_dataset_id("wmt/wmt14")
    local = tmp_path / "data.txt"
    local.write_text("x")
    for label in (str(local), "./data/train.jsonl", "ding (Debian trans-de-en example sentences)", "a/b/c", ""):
        assert not is_dataset_id(label), label
    sparse_model("llama").save_pretrained(tmp_path / "m")
    meta = front_matter(str(write_model_card(tmp_path / "m", dataset_name=str(local),
                                             results={"eval_loss": 2.0})))
    assert "datasets" not in meta
    assert meta["model-index"][0]["results"][0]["dataset"]["type"] == "custom"
    meta = front_matter(str(write_model_card(tmp_path / "m", dataset_name="wikitext")))
    assert meta["datasets"] == ["wikitext"]


@pytest.mark.parametrize("command", [
    "python train.py --hub_token hf_abcdefghijklmnopqrstuv --lr 1",
    "python train.py --hub-token=hf_abcdefghijklmnopqrstuv --lr 1",
    "python train.py --token hf_abcdefghijklmnopqrstuv --lr 1",
    "HF_TOKEN=hf_abcdefghijklmnopqrstuv python train.py --lr 1",
    "python -c 'push(token=\"hf_abcdefghijklmnopqrstuv\")' --lr 1",
    "python train.py --password-free hf_abcdefghijklmnopqrstuv --lr 1",
    "python train.py --api-key=abcdefghijklmnopqrstuv --lr 1",
    "python train.py --client_secret abcdefghijklmnopqrstuv --lr 1",
    "HF_TOKEN=abcdefghijklmnopqrstuv python train.py --lr 1",
    "python -c 'push(token=\"abcdefghijklmnopqrstuv\")' --lr 1",
])
def test_card_never_holds_a_token(tmp_path, command):
    sparse_model("llama").save_pretrained(tmp_path)
    text = str(write_model_card(tmp_path, command=command))
    assert "abcdefghijklmnopqrstuv" not in text and "REDACTED" in text and "--lr 1" in text
    kept = "--max_new_tokens 5 --tokenizer_name t5 max_tokens=3 --num_key_value_heads 2 --push_to_hub --lr 1"
    assert redact_secrets(kept) == kept


@pytest.mark.parametrize("argv", [
    ["train.py", "--hub_token", "abc", "--lr", "1"],
    ["train.py", "--api-key=abc", "--wandb_api_key", "k1", "--credentials_file", "c.json"],
    ["train.py", "--password", "--max_steps", "-1", "--run_name", "hf_abcdefghijklmnopqrstuvwxyz"],
    ["HF_TOKEN=abc", "train.py", "--env", "MY_SECRET=x", "--num_key_value_heads", "2"],
    ["train.py", "--include_tokens_per_second", "true", "--tokenizer_name", "t5", "--auth", "a"],
])
def test_card_redacts_with_the_recipes_rules_and_marker(argv):
    """The card's redaction of a command string hides what the recipes' `redact_command` hides, as `REDACTED`."""
    from nm_hf.recipe import REDACTED, redact_command

    assert redact_secrets(" ".join(argv)) == " ".join(redact_command(argv))
    assert REDACTED == "REDACTED"



def test_measured_sparsity_is_the_weights_not_the_record(tmp_path):
    # a finalized model trained on as a plain model: the record still says 50%, the weights are dense
    model = sparse_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(1.0)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["nm_sparsity"]["sparsity"] == pytest.approx(0.5)
    text = str(write_model_card(tmp_path))
    report, _ = inspect_checkpoint(tmp_path)
    assert report.sparsity < 0.5
    assert f"| measured sparsity of the targeted layers | {report.sparsity:.2%} |" in text
    assert "| N:M pattern holds | NO |" in text
