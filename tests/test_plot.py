"""nm_hf.plot: the figure's panels, steps and rates, too-short runs, the CLI and the written file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nm_hf.config import SparsityConfig
from nm_hf.injection import iter_sparse_layers, sparsify
from nm_hf.plot import (
    NOT_ENOUGH_STEPS,
    PLOT_FILE,
    MatplotlibMissing,
    plot_histories,
    plot_runs,
    sparsity_figure,
)
from nm_hf.plot import main as plot_main
from nm_hf.tracker import HISTORY_FILE, SparsityTracker
from tiny_models import tiny_model

PNG = b"\x89PNG\r\n\x1a\n"
plt = pytest.importorskip("matplotlib.pyplot")


def _write_run(directory: Path, method: str, scale: float, steps: int = 4,
               targets: list[str] | None = None) -> Path:
    config = SparsityConfig(method=method, target_modules=targets or "all-linear")
    model = sparsify(tiny_model("gpt2"), config)
    tracker = SparsityTracker(model)
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for _, layer in iter_sparse_layers(model):
                layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * scale)
        tracker.step()
        tracker.log_metrics(step)
    return tracker.save(directory / HISTORY_FILE)


def _doc(path: Path) -> dict:
    return SparsityTracker.load_history(path)


def _texts(fig) -> str:
    return " ".join(t.get_text() for t in fig.findobj(match=lambda a: hasattr(a, "get_text")))


def test_figure_has_four_panels_with_integer_steps_and_the_recorded_values(tmp_path):
    ste = _doc(_write_run(tmp_path / "ste", "ste", 0.02, steps=3))
    srste = _doc(_write_run(tmp_path / "sr-ste", "sr-ste", 0.005, steps=3))
    fig = sparsity_figure([("ste", ste), ("sr-ste", srste)])
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert titles == ["SAD since previous log", "SAD from the initial mask", "Mask flip rate per optimizer step",
                          "Norm of the pruned weights"]
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        # same-size runs: raw counts, exactly the recorded values
        for ax, key in zip(fig.axes, ("sad", "sad_from_init", "flip_rate", "pruned_weight_norm"), strict=True):
            lines = {line.get_label(): line for line in ax.get_lines()}
            assert list(lines["ste"].get_xdata()) == [1, 2, 3]
            assert list(lines["ste"].get_ydata()) == [r[key] for r in ste["records"]]
            assert list(lines["sr-ste"].get_ydata()) == [r[key] for r in srste["records"]]
    finally:
        plt.close(fig)


def test_runs_of_different_sizes_are_compared_as_rates(tmp_path):
    big = _doc(_write_run(tmp_path / "big", "ste", 0.02))
    small = _doc(_write_run(tmp_path / "small", "ste", 0.02, targets=["c_fc"]))
    assert big["num_masked_weights"] != small["num_masked_weights"]
    fig = sparsity_figure([("big", big), ("small", small)])
    try:
        sad, sad_init, _, pruned = fig.axes
        assert "fraction" in sad.get_ylabel() and "RMS" in pruned.get_title()
        for label, doc in (("big", big), ("small", small)):
            lines = {line.get_label(): line for line in sad.get_lines()}
            assert list(lines[label].get_ydata()) == [r["sad"] / doc["num_masked_weights"] for r in doc["records"]]
            lines = {line.get_label(): line for line in sad_init.get_lines()}
            assert list(lines[label].get_ydata()) == pytest.approx(
                [r["sad_from_init"] / doc["num_masked_weights"] for r in doc["records"]])
            pruned_count = doc["num_masked_weights"] / 2  # 2:4 removes half
            lines = {line.get_label(): line for line in pruned.get_lines()}
            assert list(lines[label].get_ydata()) == pytest.approx(
                [r["pruned_weight_norm"] / pruned_count ** 0.5 for r in doc["records"]])
    finally:
        plt.close(fig)


def test_fewer_than_two_logged_steps_is_said_not_drawn(tmp_path, capsys):
    one = _write_run(tmp_path / "one", "ste", 0.02, steps=1)
    fig = sparsity_figure([("one", _doc(one))])
    try:
        assert all(not ax.get_lines() for ax in fig.axes)  # no lone dot
        assert _texts(fig).count(NOT_ENOUGH_STEPS) == 4
    finally:
        plt.close(fig)

    _write_run(tmp_path / "long", "sr-ste", 0.01, steps=3)
    fig = sparsity_figure([("long", _doc(tmp_path / "long")), ("one", _doc(one))])
    try:
        assert all([line.get_label() for line in ax.get_lines()] == ["long"] for ax in fig.axes)
        assert f"{NOT_ENOUGH_STEPS} (fewer than 2), not drawn: one" in _texts(fig)
    finally:
        plt.close(fig)

    assert plot_main([str(tmp_path / "one"), "-o", str(tmp_path / "one.png")]) == 0
    captured = capsys.readouterr()
    assert f"ste: {NOT_ENOUGH_STEPS}" in captured.err and "wrote" in captured.out
    assert (tmp_path / "one.png").read_bytes()[:8] == PNG


def test_plot_file_is_written_atomically_with_umask_permissions(tmp_path):
    _write_run(tmp_path / "run", "ste", 0.02)
    old = os.umask(0o022)
    try:
        out = plot_runs([tmp_path / "run"], tmp_path / "out" / PLOT_FILE)
    finally:
        os.umask(old)
    assert out.read_bytes()[:8] == PNG
    assert out.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in out.parent.iterdir()) == [PLOT_FILE]  # no temporary file left


def test_plot_runs_side_by_side_and_cli_without_runpy_warning(tmp_path):
    for name, method, scale in (("dense", "dense", 0.02), ("ste", "ste", 0.02), ("sr-ste", "sr-ste", 0.005)):
        _write_run(tmp_path / name, method, scale)
    out = plot_runs([tmp_path / "dense", tmp_path / "ste", tmp_path / "sr-ste" / HISTORY_FILE], tmp_path / "sad.png")
    assert out.read_bytes()[:8] == PNG

    result = subprocess.run([sys.executable, "-m", "nm_hf.plot", str(tmp_path / "ste"), str(tmp_path / "sr-ste"),
                             "-o", str(tmp_path / "cli.png")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and (tmp_path / "cli.png").read_bytes()[:8] == PNG
    assert "RuntimeWarning" not in result.stderr and "found in sys.modules" not in result.stderr, result.stderr


def test_plot_cli_errors(tmp_path, capsys):
    assert plot_main([str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no sparsity_history.json found" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    _write_run(tmp_path / "run", "ste", 0.02)
    assert plot_main([str(tmp_path / "run"), "-o", str(tmp_path / "run")]) == 2  # -o names a directory
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run'} is a directory" in err and ".tmp" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_plot_labels_fall_back_to_directory_names(tmp_path, monkeypatch):
    _write_run(tmp_path / "a", "ste", 0.01)
    _write_run(tmp_path / "b", "ste", 0.01)
    seen = {}
    monkeypatch.setattr("nm_hf.plot.plot_histories", lambda runs, output, title=None: seen.update(
        labels=[label for label, _ in runs]))
    plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "p.png")
    assert seen["labels"] == ["ste (a)", "ste (b)"]
    with pytest.raises(ValueError, match="got 1 labels for 2 runs"):
        plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "p.png", labels=["x"])


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(MatplotlibMissing, match="plotting needs matplotlib"):
        plot_histories([("x", {"records": []})], tmp_path / PLOT_FILE)
    assert not (tmp_path / PLOT_FILE).exists()
