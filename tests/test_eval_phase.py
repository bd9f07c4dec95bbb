"""benchmarks/eval_phase.py: where each evaluation fell in the length-grouped sampler's megabatches."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_benchmark

eval_phase = load_benchmark("eval_phase")

EPOCH_STEPS = 454  # Multi30k's 29,000 pairs at batch 64


def _run(bleu: list[float], gen_len: list[float], every: int = 275) -> dict:
    curve = [{"step": 100, "loss": 5.0, "epoch": 100 / EPOCH_STEPS}]  # a training-loss point: not an evaluation
    for i, (b, g) in enumerate(zip(bleu, gen_len, strict=True), start=1):
        step = i * every
        curve.append({"step": step, "epoch": step / EPOCH_STEPS, "eval_bleu": b, "eval_gen_len": g})
    return {"validation": {"bleu": bleu[-1]}, "curve": curve}


def test_phase_table_places_evaluations_and_averages_over_runs():
    runs = [_run([10.0, 20.0, 18.0, 26.0], [12.0, 11.0, 14.0, 12.0]),
            _run([12.0, 22.0, 20.0, 30.0], [13.0, 10.0, 13.0, 11.0]),
            _run([1.0, 2.0, 3.0, 4.0], [50.0, 50.0, 50.0, 50.0])]  # broken down: below min_bleu, left out
    table = eval_phase.phase_table(runs, min_bleu=25.0)
    assert table["runs"] == 2
    assert table["steps_per_epoch"] == EPOCH_STEPS and table["batches_per_megabatch"] == 50
    rows = {row["step"]: row for row in table["evaluations"]}
    assert [rows[s]["steps_into_epoch"] for s in (275, 550, 825, 1100)] == [275, 96, 371, 192]
    assert [rows[s]["batch_in_megabatch"] for s in (275, 550, 825, 1100)] == [25, 46, 21, 42]
    assert rows[550]["mean_gen_len"] == pytest.approx(10.5)
    # step 550: run 1 20 - (10 + 18) / 2 = 6, run 2 22 - (12 + 20) / 2 = 6; step 825: -5 and -6
    assert rows[550]["mean_bleu_minus_neighbours"] == pytest.approx(6.0)
    assert rows[825]["mean_bleu_minus_neighbours"] == pytest.approx(-5.5)
    assert rows[275]["mean_bleu_minus_neighbours"] is None and rows[1100]["mean_bleu_minus_neighbours"] is None
    gain = table["last_minus_previous"]
    assert (gain["mean"], gain["min"], gain["max"], gain["positive"], gain["runs"]) == (9.0, 8.0, 10.0, 2, 2)


def test_small_training_sets_get_smaller_megabatches():
    # the sampler's min(examples // (4 * batch), 50): 40 steps -> 10 batches per megabatch
    assert eval_phase.megabatch_batches(40) == 10
    assert eval_phase.megabatch_batches(3) == 1
    assert eval_phase.megabatch_batches(454) == 50


def test_cli_writes_the_table_and_refuses_a_bad_file(tmp_path, capsys):
    results = tmp_path / "translation.json"
    results.write_text(json.dumps({"runs": [_run([10.0, 20.0, 18.0, 26.0], [12.0, 11.0, 14.0, 12.0])]}))
    out = tmp_path / "phase.json"
    eval_phase.main([str(results), "--output", str(out)])
    written = json.loads(out.read_text())
    assert written["runs"] == 1 and written["command"].startswith("python benchmarks/eval_phase.py ")
    assert "| 550 | 96 | 46 | 11.00 | 6.00 |" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        eval_phase.main([str(tmp_path / "bad.json")])
    assert "not a results file" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no run with a validation BLEU"):
        eval_phase.main([str(results), "--min_bleu", "90"])


def test_runs_of_different_epoch_lengths_are_refused():
    other = _run([10.0, 20.0, 18.0, 26.0], [12.0, 11.0, 14.0, 12.0])
    for point in other["curve"]:
        point["epoch"] = point["step"] / 300
    with pytest.raises(SystemExit, match="different epoch lengths"):
        eval_phase.phase_table([_run([10.0, 20.0, 18.0, 26.0], [12.0, 11.0, 14.0, 12.0]), other], 25.0)
