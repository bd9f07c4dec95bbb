"""benchmarks/recipe_steps.py: a real (tiny) recipe run with per-step usage counts, ended after training."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--max_train_samples", "256", "--vocab_size", "500", "--d_model", "32", "--ffn_dim", "64",
        "--num_attention_heads", "2", "--encoder_layers", "1", "--decoder_layers", "1", "--max_eval_samples", "8",
        "--max_test_samples", "8", "--warmup_steps", "2", "--per_device_train_batch_size", "16",
        "--report_to", "none"]


def test_a_tiny_translation_run_reports_every_step_and_stops_after_training(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "benchmarks/recipe_steps.py", "translation", "recipes/configs/translation_demo.yaml",
         "--method", "sr-ste", "--max_steps", "12", "--output_dir", str(out), *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        # stdout a pipe and block-buffered, as when redirected to a file: the report must survive os._exit
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "12 steps in" in result.stdout and "over steps 11-12" in result.stdout
    rows = dict(re.findall(r"^\s+(process CPU|minor faults|  in the forward)\s+([0-9.]+)", result.stdout, re.M))
    assert float(rows["process CPU"]) > 0 and float(rows["minor faults"]) >= float(rows["  in the forward"]) >= 0
    assert not (out / "results.json").exists()  # ended after training: no evaluation, nothing saved


def test_an_unknown_recipe_is_refused():
    result = subprocess.run([sys.executable, "benchmarks/recipe_steps.py", "vision", "c.yaml"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "usage: recipe_steps.py {translation,language_modeling}" in result.stderr
