"""nm_hf.recipe.results: atomic result files with the umask's mode, NaN-safe JSON, samples, the table."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from nm_hf.recipe import (
    format_results_table,
    format_samples,
    json_safe,
    pick_samples,
    write_predictions,
    write_results_json,
)


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
