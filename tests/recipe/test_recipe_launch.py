"""nm_hf.recipe.launch: secrets never recorded, training-flag checks, run-length defaults, process run time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainingArguments

from nm_hf.recipe import (
    ArgumentsError,
    check_training_arguments,
    is_secret_flag,
    launch_command,
    one_line,
    redact_command,
    run_length_defaults,
    take_over_hub_push,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("flag", ["--hub_token", "--hf-token", "--api_key", "--password", "--client_secret",
                                  "--auth", "--HUB_TOKEN", "--wandb_api_key", "--credentials_file",
                                  "--access_tokens", "--access-tokens"])
def test_secret_flags(flag):
    assert is_secret_flag(flag)


@pytest.mark.parametrize("flag", ["--hub_model_id", "--include_tokens_per_second", "--include_num_input_tokens_seen",
                                  "--tokenizer_name", "--max_steps", "--output_dir", "--push_to_hub",
                                  "--num_key_value_heads", "--hub_model_author"])
def test_not_secret_flags(flag):
    assert not is_secret_flag(flag)


def test_redact_command_both_forms_and_token_shaped_values():
    argv = ["recipes/translation.py", "c.yaml", "--push_to_hub", "--hub_model_id", "a/b", "--hub_token", "hf_X",
            "--api-key=abc", "--password", "--max_steps", "-1", "--run_name", "hf_abcdefghijklmnopqrstuvwxyz",
            "--include_tokens_per_second", "true"]
    assert redact_command(argv) == [
        "recipes/translation.py", "c.yaml", "--push_to_hub", "--hub_model_id", "a/b", "--hub_token", "REDACTED",
        "--api-key=REDACTED", "--password", "--max_steps", "-1", "--run_name", "REDACTED",
        "--include_tokens_per_second", "true"]


def test_url_credentials_are_redacted_in_both_forms():
    from nm_hf.redact import redact_secrets

    argv = ["r.py", "--dataset_url", "https://alice:s3cret@data.example.org/x.tar?y=1", "--mirror=ftp://bob@host/d",
            "--homepage", "https://example.org/a@b", "--email", "a@b.org"]
    assert redact_command(argv) == ["r.py", "--dataset_url", "https://REDACTED@data.example.org/x.tar?y=1",
                                    "--mirror=ftp://REDACTED@host/d", "--homepage", "https://example.org/a@b",
                                    "--email", "a@b.org"]
    assert redact_secrets(" ".join(argv)) == " ".join(redact_command(argv))
    assert "s3cret" not in redact_secrets("git clone https://alice:s3cret@github.com/a/b.git")


def test_launch_command(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert launch_command(["recipes/translation.py", "c.yaml", "--x", "a b", "--hub_token=hf_X"]) == \
        "python recipes/translation.py c.yaml --x 'a b' --hub_token=REDACTED"
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_command(["recipes/translation.py", "--hub_token", "hf_X"]) == \
        "accelerate launch --num_processes 2 recipes/translation.py --hub_token REDACTED"


def test_hub_token_is_taken_out_of_the_training_arguments(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", push_to_hub=True,
                             hub_model_id="me/model", hub_token="hf_X")
    target = take_over_hub_push(args)
    assert (target.repo_id, target.token) == ("me/model", "hf_X") and "hf_X" not in repr(target)
    assert args.push_to_hub is False and args.hub_token is None  # not pickled into training_args.bin


@pytest.mark.parametrize(("kwargs", "explicit", "message"), [
    ({"max_steps": 0}, set(), "--max_steps 0: give a positive number of optimizer steps"),
    ({"max_steps": -5}, set(), "--max_steps -5"),
    ({"num_train_epochs": 0}, set(), "--num_train_epochs 0"),
    ({"do_train": False}, {"do_train"}, "--do_train false is not supported"),
    ({"do_predict": False}, {"do_predict"}, "--do_predict false is not supported"),
])
def test_training_flags_that_would_be_ignored_or_misread(tmp_path, kwargs, explicit, message):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)
    with pytest.raises(ArgumentsError, match=message):
        check_training_arguments(args, explicit)


def test_training_flags_that_pass(tmp_path):
    for kwargs, explicit in (({"max_steps": 5}, set()), ({}, set()), ({"do_train": False}, set()),
                             ({"do_train": True}, {"do_train"})):
        check_training_arguments(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                   **kwargs), explicit)


def test_run_length_defaults():
    assert run_length_defaults(20) == {"logging_steps": 2}
    assert run_length_defaults(5, warmup_fraction=0.1, warmup_cap=400) == {"logging_steps": 1, "warmup_steps": 1}
    assert run_length_defaults(100_000, warmup_fraction=0.1, warmup_cap=400) == {"logging_steps": 50,
                                                                                  "warmup_steps": 400}
    assert run_length_defaults(-1, warmup_fraction=0.1, warmup_cap=400) == {"logging_steps": 50, "warmup_steps": 0.1}


def test_one_line_joins_problem_lists():
    assert one_line("cannot sparsify X:\n  - 'a' is bad\n  - 'b' is worse") == \
        "cannot sparsify X: 'a' is bad; 'b' is worse"


def test_process_elapsed_seconds_counts_from_the_process_start():
    """What happened before nm_hf.recipe was imported (here a sleep; in a recipe, importing torch and
    transformers) counts too."""
    code = ("import time; time.sleep(0.5); from nm_hf.recipe import process_elapsed_seconds; "
            "print(process_elapsed_seconds())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert float(out.stdout) >= 0.5
