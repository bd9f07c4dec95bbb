"""benchmarks/compare_pruning.py: refusals, the evaluation, a tiny end-to-end run without llm-compressor.

The llm-compressor row needs the benchmark's own venv (installed by the script, not here): only the
pieces of its worker that run without llm-compressor (the Conv1D <-> Linear swap) are tested.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import nm_hf
from tiny_models import save_pretrained_lm


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("compare_pruning")




@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[str, Path]:
    """A tiny dense GPT-2 (Conv1D layers), a tokenizer trained offline, train/validation/test files."""
    return save_pretrained_lm(tmp_path_factory.mktemp("compare_pruning"))


def data_flags(paths: dict[str, Path]) -> list[str]:
    return ["--train_file", str(paths["train"]), "--validation_file", str(paths["validation"]),
            "--test_file", str(paths["test"]), "--block_size", "32"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--criteria", "obs"],
     "--criteria: unknown obs; choose from magnitude, wanda, sparsegpt, llm-compressor"),
    (["--criteria", "wanda", "wanda"], "--criteria: a criterion is listed twice"),
    (["--finetune_methods", "nope"], "--finetune_methods: unknown method 'nope'"),
    (["--finetune_methods", "dense"], "'dense' does not mask the forward pass"),
    (["--sparsity", "2-4"], "--sparsity must look like 2:4, got '2-4'"),
    (["--sparsity", "1:4"], "the llm-compressor row runs SparseGPTModifier(sparsity=0.5)"),
    (["--finetune_steps", "0"], "--finetune_steps 0 with --finetune_methods"),
    (["--calibration_samples", "0"], "--calibration_samples must be positive, got 0"),
    (["--train_file", "t.txt"], "--train_file, --validation_file and --test_file go together"),
    (["--model", "MISSING"], "no config.json there"),
])
def test_refusals_before_anything_runs(bench, pretrained, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "missing") if arg == "MISSING" else arg for arg in argv]
    output = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exc:
        bench.main(["--model", str(pretrained["model"]), *argv, "--output", str(output),
                    "--work_dir", str(tmp_path / "work")])
    assert message in str(exc.value) and str(exc.value).startswith("compare_pruning.py: error: ")
    assert not output.exists() and not (tmp_path / "work").exists()


def test_perplexity_is_over_predicted_tokens(bench, one_thread):
    """exp of the mean cross-entropy over the tokens that have a next token (127 of a 128-token block),
    computed here from the logits."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    ids = torch.randint(0, 50, (5, 16))
    rows = [{"input_ids": row, "attention_mask": torch.ones(16, dtype=torch.long), "labels": row}
            for row in ids]
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    model.train()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    assert bench.perplexity(model, rows, batch_size=2) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert model.training  # its mode is given back


def test_tiny_end_to_end_without_llm_compressor(bench, pretrained, tmp_path, one_thread):
    output = tmp_path / "results" / "compare.json"
    results = bench.main(["--model", str(pretrained["model"]), "--criteria", "magnitude", "wanda",
                          "sparsegpt", "--finetune_methods", "sr-ste", "fixed", "--finetune_steps", "2",
                          "--batch_size", "2", "--eval_batch_size", "8", "--calibration_samples", "4",
                          *data_flags(pretrained), "--work_dir", str(tmp_path / "work"),
                          "--output", str(output)])
    written = json.loads(output.read_text())
    assert written["rows"] == results["rows"] and written["command"].startswith(
        ".venv/bin/python benchmarks/compare_pruning.py --model ")
    assert written["data"]["calibration_samples"] == 4 and written["data"]["calibration_batches"] == 2
    assert [row["criterion"] for row in written["rows"]] == ["magnitude", "wanda", "sparsegpt"]
    for row in written["rows"]:
        assert row["nm_ok"] and row["sparsity"] == 0.5 and row["other_weights_unchanged"], row
        assert math.isfinite(row["pruned"]["validation_perplexity"]) and row["prune_s"] >= 0
        assert set(row["finetuned"]) == {"sr-ste", "fixed"}
        for tuned in row["finetuned"].values():
            assert tuned["nm_ok"] and tuned["sparsity"] == 0.5 and math.isfinite(tuned["test_perplexity"])
    # the same data and evaluation for every row: magnitude's pruned model is the dense one pruned here
    model = bench.load_dense(pretrained["model"])
    nm_hf.prune(model, nm_hf.SparsityConfig(method="fixed"), criterion="magnitude", progress=False)
    nm_hf.finalize(model)
    args = bench.parse_args(["--model", str(pretrained["model"]), *data_flags(pretrained)])
    blocks = bench.load_blocks(args, AutoTokenizer.from_pretrained(pretrained["model"]))
    assert written["rows"][0]["pruned"]["validation_perplexity"] == pytest.approx(
        bench.perplexity(model, blocks["validation"], 8), abs=1e-4)
    assert written["dense"]["finetuned"]["dense"]["train_s"] >= 0  # the reference: dense, same fine-tune
    table = written["table"].splitlines()
    assert len(table) == 2 + 1 + 3 * 2 and table[0].startswith("| criterion | prune s | ppl after pruning")
    assert table[2].startswith("| dense (not pruned) | - | ") and "| dense, 2 steps | " in table[2]
    assert table[3].startswith("| magnitude | ") and "| sr-ste, 2 steps | " in table[3]
    assert table[4].startswith("| | | | fixed, 2 steps | ")


def test_peer_worker_swaps_conv1d_for_equal_linear_and_back(one_thread):
    """llm-compressor 0.14 prunes only modules named Linear/Conv1d/...: its worker hands it GPT-2's Conv1D
    layers as equivalent nn.Linear ones, then puts the Conv1D modules back with the new weights."""
    worker = load_benchmark("llmcompressor_oneshot")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"]
    originals = [model.get_submodule(name) for name in names]
    swapped = worker.conv1d_as_linear(model, names)
    assert all(isinstance(model.get_submodule(name), torch.nn.Linear) for name in names)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)
        model.get_submodule(names[0]).weight[:, 0] = 0  # what pruning does to the stand-in
    worker.linear_back_to_conv1d(swapped)
    assert [model.get_submodule(name) for name in names] == originals
    assert bool((originals[0].weight[0, :] == 0).all())  # Conv1D weight is [in, out]: row 0 is input 0


def test_a_failing_peer_is_recorded_and_the_other_rows_still_run(bench, pretrained, tmp_path, monkeypatch,
                                                                 one_thread):
    def no_venv(venv, log):
        raise RuntimeError("creating .venv-x failed: pip exited with 1")

    monkeypatch.setattr(bench, "ensure_peer_venv", no_venv)
    output = tmp_path / "out.json"
    bench.main(["--model", str(pretrained["model"]), "--criteria", "llm-compressor", "magnitude",
                "--finetune_methods", *data_flags(pretrained), "--eval_batch_size", "8",
                "--work_dir", str(tmp_path / "work"), "--output", str(output)])
    written = json.loads(output.read_text())
    peer, magnitude = written["rows"]
    assert peer == {"criterion": "llm-compressor", "error": "creating .venv-x failed: pip exited with 1"}
    assert magnitude["nm_ok"] and magnitude["finetuned"] == {} and "finetuned" not in written["dense"]
    assert written["table"].splitlines()[3:] == [
        "| llm-compressor | failed (see the JSON) | - | - | - | - |",
        f"| magnitude | {magnitude['prune_s']:.2f} | {magnitude['pruned']['validation_perplexity']:.2f} / "
        f"{magnitude['pruned']['test_perplexity']:.2f} | - | - | - |"]
