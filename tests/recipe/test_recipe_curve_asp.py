"""The run's curve in results.json (training loss and validation metrics by step)."""

from __future__ import annotations

from nm_hf.recipe.results import training_curve


def test_training_curve_keeps_losses_and_eval_metrics_by_step():
    history = [
        {"loss": 6.0, "grad_norm": 1.5, "learning_rate": 1e-3, "epoch": 0.1, "step": 50, "sad": 12},
        {"eval_loss": 5.5, "eval_runtime": 2.0, "eval_samples_per_second": 100.0, "epoch": 0.2, "step": 100},
        {"train_runtime": 10.0, "train_loss": 5.8, "total_flos": 1.0, "epoch": 0.2, "step": 100},
    ]
    assert training_curve(history) == [
        {"loss": 6.0, "grad_norm": 1.5, "learning_rate": 1e-3, "epoch": 0.1, "step": 50, "sad": 12},
        {"eval_loss": 5.5, "epoch": 0.2, "step": 100},
    ]
