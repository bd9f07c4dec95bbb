"""nm_hf.recipe.results: atomic result files with the umask's mode, NaN-safe JSON, samples, the table, the card."""

from __future__ import annotations

import json
import os
import stat

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from hub_server import HubServer
from transformers import TrainingArguments

from nm_hf.config import SparsityConfig
from nm_hf.injection import finalize, sparsify
from nm_hf.recipe import (
    HubTarget,
    finish_run,
    format_results_table,
    format_samples,
    json_safe,
    pick_samples,
    write_predictions,
    write_results_json,
)
from tiny_models import tiny_model


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_results_and_predictions_are_written_atomically_with_mode_0644(tmp_path, umask_022):
    path = tmp_path / "sub" / "results.json"
    write_results_json(path, {"bleu": 1.5, "tensor": torch.tensor([1, 2]), "np": np.float32(0.5),
                              "ppl": float("inf"), "nested": {"loss": float("nan")}})
    assert json.loads(path.read_text()) == {"bleu": 1.5, "tensor": [1, 2], "np": 0.5, "ppl": "inf",
                                            "nested": {"loss": "nan"}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    with pytest.raises(TypeError):
        write_results_json(path, {"bad": object()})
    assert json.loads(path.read_text())["bleu"] == 1.5  # the old file survives a failed write
    predictions = write_predictions(tmp_path / "generated_predictions.txt", ["ein Haus", "zwei\nZeilen"])
    assert predictions.read_text(encoding="utf-8") == "ein Haus\nzwei Zeilen\n"
    assert stat.S_IMODE(predictions.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["generated_predictions.txt", "results.json", "sub"]


def test_json_safe():
    assert json_safe({"a": [1.0, float("-inf")], "b": np.float64("nan"), "c": "x"}) == \
        {"a": [1.0, "-inf"], "b": "nan", "c": "x"}


def test_pick_samples_spreads_over_the_set():
    sources = [f"s{i}" for i in range(10)]
    samples = pick_samples(sources, [f"o{i}" for i in range(10)], [f"r{i}" for i in range(10)], count=5)
    assert [s["index"] for s in samples] == [0, 2, 4, 7, 9]
    assert samples[1] == {"index": 2, "source": "s2", "output": "o2", "reference": "r2"}
    assert [s["index"] for s in pick_samples(["a", "b"], ["x", "y"], ["r", "q"], count=5)] == [0, 1]
    assert pick_samples([], [], []) == []
    text = format_samples(samples[:1], title="samples")
    assert text.splitlines() == ["samples", "", "[0]", "  source:    s0", "  output:    o0", "  reference: r0"]
    empty = format_samples([{"index": 3, "source": "s", "output": "", "reference": "r"}])
    assert "  output:    (empty: the model ends the sentence at once)" in empty.splitlines()


def test_results_table_flattens_nested_results_and_leaves_records_out():
    table = format_results_table({"test_bleu": 12.3456, "train": {"steps": 1200, "ok": True}, "l": ["a", "b"],
                                  "samples": [{"index": 0, "source": "s"}]}, title="demo")
    lines = table.splitlines()
    assert lines[1] == "demo"
    assert any(line.split() == ["test_bleu", "12.3456"] for line in lines)
    assert any(line.split() == ["train/steps", "1,200"] for line in lines)
    assert any(line.split() == ["l", "a,", "b"] for line in lines)
    assert not any(line.startswith("samples") for line in lines)


def test_finish_run_card_and_pushed_card_list_the_runs_learning_rate(tmp_path, monkeypatch):
    """The card's "Training hyperparameters" come from the run's TrainingArguments, locally and on the Hub."""
    token = "hf_FinishRunSecret0123456789"
    out = tmp_path / "out"
    model = finalize(sparsify(tiny_model("llama"), SparsityConfig()))
    model.save_pretrained(out)
    args = TrainingArguments(output_dir=str(out), learning_rate=1.25e-3, seed=11, max_steps=7, use_cpu=True,
                             report_to=[])
    with HubServer(token=token) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        finish_run(args, {"test_loss": 1.5}, model=model, task="text-generation", dataset_name=None,
                   base_model=None, hub=HubTarget("tester/finish-run", token, False))
        pushed = hub.repos["tester/finish-run"].files["README.md"].decode()
    for card in ((out / "README.md").read_text(encoding="utf-8"), pushed):
        assert "## Training hyperparameters" in card
        for row in ("| learning_rate | 0.00125 |", "| seed | 11 |", "| max_steps | 7 |"):
            assert row in card, row
        assert token not in card


def test_finish_run_pushes_from_the_first_process_only(tmp_path, monkeypatch):
    """With --save_on_each_node every node's main process saves; only global process 0 pushes to the Hub."""
    out = tmp_path / "out"
    model = finalize(sparsify(tiny_model("llama"), SparsityConfig()))
    model.save_pretrained(out)
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], save_on_each_node=True)
    pushes = []
    monkeypatch.setattr("nm_hf.hub.push_to_hub", lambda *a, **k: pushes.append(a))
    for rank in (1, 0):  # the main process of a second node, then the first node's
        monkeypatch.setattr(type(args), "process_index", property(lambda self, rank=rank: rank))
        monkeypatch.setattr(type(args), "should_save", property(lambda self: True))
        finish_run(args, {"test_loss": 1.5}, model=model, task="text-generation", dataset_name=None,
                   base_model=None, hub=HubTarget("tester/x", "hf_secret", False))
        assert (out / "results.json").is_file()
        assert len(pushes) == (rank == 0)
