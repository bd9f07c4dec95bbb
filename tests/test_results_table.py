"""benchmarks/results_table.py: run entries with their own flags, seeds, and the aggregated table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark
from transformers import HfArgumentParser

from nm_hf.arguments import SparsityArguments

rt = load_benchmark("results_table")


def test_run_spec_with_its_own_flags():
    spec = rt.parse_run_spec("sr-ste:2:4,decay=1,decay_mode=decoupled")
    assert (spec.method, spec.pattern) == ("sr-ste", "2:4")
    assert spec.argv() == ["--decay", "1", "--decay_mode", "decoupled"]
    assert spec.name == "sr-ste-2x4_decay1_decay_modedecoupled"
    assert spec.label == "sr-ste (decay=1, decay_mode=decoupled)"
    plain = rt.parse_run_spec("dense:2:4")
    assert plain.argv() == [] and plain.name == "dense-2x4" and plain.label == "dense"
    assert rt.run_dir(Path("r"), plain, None) == Path("r/dense-2x4")
    assert rt.run_dir(Path("r"), plain, 3) == Path("r/dense-2x4-seed3")


@pytest.mark.parametrize("entry, message", [
    ("sr-ste", "must look like METHOD:N:M"),
    ("sr-ste:2-4", "must look like METHOD:N:M"),
    ("sr-ste:2:4,decay", "'decay' must look like flag=value"),
    ("sr-ste:2:4,decay=", "'decay=' must look like flag=value"),
    ("sr-ste:2:4,--decay=1", "must look like flag=value"),
    ("sr-ste:2:4,seed=3", "--seed is set by results_table.py"),
])
def test_bad_run_specs_name_the_entry(entry, message):
    with pytest.raises(ValueError, match=message) as info:
        rt.parse_run_spec(entry)
    assert repr(entry) in str(info.value)


def write_run(path: Path, ppl: float, tps: float, sparsity: float = 0.5) -> None:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({
        "test_perplexity": ppl, "eval_perplexity": ppl + 1, "test_loss": 4.0, "sparsity": sparsity,
        "sad_from_init": 10, "tokens_per_second": tps, "train_runtime_s": 100.0,
        "mask_stats": {"sad_from_init_rate": 0.25, "mean_flip_rate": 0.001}}))


def rows(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = dict(zip(header, cells, strict=True))
    return out


def test_table_aggregates_seeds_as_mean_and_sd(tmp_path):
    dense, srste = rt.parse_run_spec("dense:2:4"), rt.parse_run_spec("sr-ste:2:4,decay=1")
    for seed, (d_ppl, s_ppl) in zip((1, 2), ((100.0, 90.0), (110.0, 94.0)), strict=True):
        write_run(rt.run_dir(tmp_path, dense, seed), d_ppl, 1000.0, sparsity=0.0)
        write_run(rt.run_dir(tmp_path, srste, seed), s_ppl, 900.0)
    runs = [(spec, [rt.run_dir(tmp_path, spec, s) for s in (1, 2)]) for spec in (dense, srste)]
    table = rows(rt.table("language_modeling", runs))
    assert table["dense"]["test ppl"] == f"105.00 ± {statistics.stdev([100.0, 110.0]):.2f}"
    assert table["sr-ste (decay=1)"]["test ppl"] == f"92.00 ± {statistics.stdev([90.0, 94.0]):.2f}"
    assert table["sr-ste (decay=1)"]["test ppl per seed"] == "90.00 / 94.00"
    assert table["sr-ste (decay=1)"]["seeds"] == "2"
    assert table["sr-ste (decay=1)"]["n:m"] == "2:4" and table["dense"]["n:m"] == "-"
    assert table["sr-ste (decay=1)"]["sparsity"] == "50.00%"  # a non-task column: the mean, no sd
    assert table["sr-ste (decay=1)"]["tokens/s vs dense"] == "0.900"


def test_table_with_one_seed_and_a_missing_run(tmp_path):
    dense, ste = rt.parse_run_spec("dense:2:4"), rt.parse_run_spec("ste:2:4")
    write_run(rt.run_dir(tmp_path, dense, None), 120.0, 1000.0)
    table = rows(rt.table("language_modeling", [(dense, [tmp_path / "dense-2x4"]), (ste, [tmp_path / "ste-2x4"])]))
    assert table["dense"]["test ppl"] == "120.00" and "seeds" not in table["dense"]
    assert table["ste"]["test ppl"] == "-" and table["ste"]["tokens/s vs dense"] == "-"


def test_main_table_only_and_flag_errors(tmp_path, capsys):
    write_run(tmp_path / "fixed-2x4-seed5", 80.0, 500.0)
    rt.main(["language_modeling", "c.yaml", "--runs", "fixed:2:4", "--seeds", "5", "--table_only",
             "--output_root", str(tmp_path)])
    assert "| fixed | 2:4 | 80.00 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        rt.main(["language_modeling", "c.yaml", "--runs", "ste:2:4", "ste:2:4", "--table_only"])
    assert "the same entry twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rt.main(["language_modeling", "c.yaml", "--seeds", "1", "--table_only", "--", "--seed", "2"])
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rt.main(["language_modeling", "c.yaml", "--runs", "ste:2:4,decay", "--table_only"])
    assert "must look like flag=value" in capsys.readouterr().err


def test_unknown_method_is_refused_before_any_run():
    with pytest.raises(ValueError, match=r"'sr_ste:2:4': unknown method 'sr_ste'; the methods are sr-ste"):
        rt.parse_run_spec("sr_ste:2:4")


def test_printed_commands_hide_secrets(tmp_path, capsys, monkeypatch):
    started = []

    class FakeRun:
        def __init__(self, cmd, **kwargs):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(rt.subprocess, "Popen", FakeRun)
    spec = rt.parse_run_spec("ste:2:4")
    rt.run_all("translation", "c.yaml", [(spec, None, tmp_path / "ste-2x4")],
               ["--push_to_hub", "--hub_model_id", "me/m", "--hub_token", "hf_SECRETsecret0123456789"], 1, 1)
    printed = capsys.readouterr().out
    assert "--hub_token REDACTED" in printed and "hf_SECRET" not in printed
    assert "hf_SECRETsecret0123456789" in started[0]  # the run itself still gets the token


def test_run_specs_with_the_method_options():
    spec = rt.parse_run_spec("sr-ste:2:4,transposable=true")
    assert spec.argv() == ["--transposable", "true"] and spec.label == "sr-ste (transposable=true)"
    spec = rt.parse_run_spec("sr-ste:2:4,mask_update_interval=40")
    assert spec.argv() == ["--mask_update_interval", "40"] and spec.name == "sr-ste-2x4_mask_update_interval40"
    spec = rt.parse_run_spec("decaying-mask:2:4,method_args=decay_steps=500,learning_rate=1e-3,"
                             "method_args=schedule=exponential")
    assert spec.argv() == ["--method_args", "decay_steps=500,schedule=exponential", "--learning_rate", "1e-3"]
    # what the recipe gets: the same flags parse into the config the entry describes
    for entry, check in (
        ("sr-ste:2:4,transposable=true", lambda c: c.transposable and c.method == "sr-ste"),
        ("sr-ste:2:4,mask_update_interval=40", lambda c: c.mask_update_interval == 40),
        ("decaying-mask:2:4,method_args=decay_steps=500,method_args=schedule=exponential",
         lambda c: (c.method_args["decay_steps"], c.method_args["schedule"]) == (500, "exponential")),
        ("step:2:4,method_args=max_switch_fraction=0.3", lambda c: c.method_args["max_switch_fraction"] == 0.3),
    ):
        spec = rt.parse_run_spec(entry)
        argv = ["--method", spec.method, "--sparsity", spec.pattern, *spec.argv()]
        (args, _) = HfArgumentParser(SparsityArguments).parse_args_into_dataclasses(args=argv,
                                                                                   return_remaining_strings=True)
        assert check(args.to_config()), entry


@pytest.mark.parametrize("entry, message", [
    ("decaying-mask:2:4,method_args=decay_step=5", "--method_args: method 'decaying-mask' has no argument(s) "
                                                   "'decay_step' (did you mean 'decay_steps'?)"),
    ("fixed:2:4,transposable=true", "--transposable=True needs a method that re-chooses its mask"),
    ("sr-ste:2:4,transposable=maybe", "argument --transposable"),
    ("sr-ste:2:4,mask_update_interval=0", "--mask_update_interval must be a positive integer"),
    ("sr-ste:2:4,decay=1,decay=2", "decay is given twice"),
])
def test_bad_sparsity_flags_of_an_entry_fail_before_any_run(entry, message):
    with pytest.raises(ValueError) as info:
        rt.parse_run_spec(entry)
    assert str(info.value).startswith(f"--runs entry {entry!r}: ") and message in str(info.value)


# --------------------------------------------------------------------------------------------- results files


def fake_results(ppl: float, lr: float = 4e-3, seed: int = 42, command: str = "python recipes/lm.py") -> dict:
    return {"test_perplexity": ppl, "test_loss": 4.0, "eval_perplexity": ppl + 1, "eval_loss": 4.1,
            "sparsity": 0.5, "nm_ok": True, "sad": 5, "sad_from_init": 10, "tokens_per_second": 900.0,
            "train_runtime_s": 100.0, "mask_stats": {"sad_from_init_rate": 0.25, "mean_flip_rate": 0.001},
            "curve": [{"step": 50, "epoch": 0.2, "loss": 6.0}, {"step": 100, "epoch": 0.4, "eval_loss": 5.0}],
            "train": {"steps": 100, "learning_rate": lr, "seed": seed}, "run": {"command": command}}


def write_results(out_dir: Path, results: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results))
    return out_dir


def test_run_record_from_results_json(tmp_path):
    spec = rt.parse_run_spec("sr-ste:2:4,decay=1")
    out = write_results(tmp_path / "sr-ste-2x4_decay1", fake_results(90.0, lr=2e-3, seed=3))
    record = rt.run_record(spec, out, json.loads((out / "results.json").read_text()),
                           ["--hub_token", "hf_SECRETsecret0123456789"])
    assert (record["method"], record["pattern"], record["learning_rate"], record["seed"]) == ("sr-ste", "2:4", 2e-3, 3)
    assert record["validation"] == {"perplexity": 91.0, "loss": 4.1}
    assert record["test"] == {"perplexity": 90.0, "loss": 4.0}
    assert record["curve"][1] == {"step": 100, "epoch": 0.4, "eval_loss": 5.0}
    assert record["flags"] == {"decay": "1"} and record["command"] == "python recipes/lm.py"
    assert "hf_SECRET" not in json.dumps(record)
    assert record["throughput"]["tokens_per_second"] == 900.0 and record["flip_rate"] == 0.001
    assert record["sad"]["sad_from_init"] == 10 and record["finished_at"]
    assert record["environment"] is None  # results.json of a recipe older than run/environment
    dense = rt.run_record(rt.parse_run_spec("dense:2:4"), out, fake_results(95.0))
    assert dense["pattern"] is None  # dense runs are patched but unmasked
    environment = {"versions": {"torch": "2.13.0+cpu"}, "cpu": "Some CPU", "cpu_capability": "AVX2"}
    results = fake_results(95.0) | {"run": {"command": "c", "environment": environment}}
    assert rt.run_record(spec, out, results)["environment"] == environment


def test_append_run_adds_replaces_and_does_not_duplicate(tmp_path):
    path = tmp_path / "results" / "language_modeling.json"
    first = {"output_dir": "runs/a", "command": "c1", "test": {"perplexity": 1.0}}
    assert rt.append_run(path, first) is True
    assert rt.append_run(path, dict(first)) is False  # the same run again: nothing added
    assert rt.append_run(path, {"output_dir": "runs/b", "command": "c1"}) is True
    rerun = {**first, "test": {"perplexity": 2.0}}  # --force reran runs/a: its entry is replaced
    assert rt.append_run(path, rerun) is True
    runs = json.loads(path.read_text())["runs"]
    assert [r["output_dir"] for r in runs] == ["runs/a", "runs/b"] and runs[0]["test"]["perplexity"] == 2.0
    path.write_text('{"not runs": 1}')
    with pytest.raises(ValueError, match=r"language_modeling.json: a results file must be a JSON object"):
        rt.append_run(path, first)


def _append_many(path: str, worker: int) -> None:
    for i in range(15):
        rt.append_run(Path(path), {"output_dir": f"w{worker}-{i}", "command": "c"})


def test_parallel_appends_lose_no_entry(tmp_path):
    import multiprocessing

    path = tmp_path / "r.json"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    assert len(json.loads(path.read_text())["runs"]) == 45


def test_finished_runs_are_appended_as_they_finish(tmp_path, monkeypatch):
    """run_all records each successful run in the results file; a skipped run (results.json already
    there) is recorded once by main, not twice."""
    specs = [rt.parse_run_spec("dense:2:4"), rt.parse_run_spec("sr-ste:2:4")]
    dirs = [tmp_path / "runs" / s.name for s in specs]

    class FakeRun:
        def __init__(self, cmd, **kwargs):
            out = Path(cmd[cmd.index("--output_dir") + 1])
            write_results(out, fake_results(80.0 if "dense" in out.name else 85.0, command=" ".join(cmd)))

        def wait(self):
            return 0

    monkeypatch.setattr(rt.subprocess, "Popen", FakeRun)
    results_file = tmp_path / "lm.json"
    argv = ["language_modeling", "c.yaml", "--runs", "dense:2:4", "sr-ste:2:4", "--jobs", "2", "--threads", "1",
            "--output_root", str(tmp_path / "runs"), "--results_file", str(results_file)]
    rt.main(argv)
    runs = json.loads(results_file.read_text())["runs"]
    assert [r["method"] for r in runs] == ["dense", "sr-ste"]
    assert [r["output_dir"] for r in runs] == [str(d.resolve()) for d in dirs]
    assert runs[0]["test"]["perplexity"] == 80.0 and runs[1]["learning_rate"] == 4e-3
    rt.main(argv)  # both skipped: already recorded
    assert len(json.loads(results_file.read_text())["runs"]) == 2


def test_asp_entry_is_the_fixed_method_after_a_dense_warmup():
    spec = rt.parse_run_spec("asp:2:4")
    assert (spec.method, spec.recipe_method, spec.name, spec.label) == ("asp", "fixed", "asp-2x4", "asp")
    assert spec.argv() == ["--dense_warmup_fraction", "0.5"]
    shorter = rt.parse_run_spec("asp:2:4,dense_warmup_fraction=0.25")
    assert shorter.argv() == ["--dense_warmup_fraction", "0.25"]
    with pytest.raises(ValueError, match=r"unknown method 'aspx'.*schedule asp"):
        rt.parse_run_spec("aspx:2:4")


# --------------------------------------------------------------------------------------------- rendering


def lm_run(method: str, lr: float, seed: int, val: float, test: float, **flags) -> dict:
    return {"method": method, "pattern": None if method == "dense" else "2:4", "learning_rate": lr, "seed": seed,
            "validation": {"perplexity": val}, "test": {"perplexity": test, "loss": 4.0},
            "flags": {"learning_rate": str(lr), **flags}, "sparsity": 0.5, "sad": {"sad_from_init": 10},
            "flip_rate": 0.001, "throughput": {"tokens_per_second": 1000.0}}


def test_the_rate_is_chosen_on_the_seeds_every_rate_ran_not_on_later_seeds():
    # the grid (seed 42) picks 4e-3; two unlucky extra seeds there must not hand the choice to 8e-3,
    # whose one seed-42 value is worse than 4e-3's
    runs = [lm_run("dense", 4e-3, 42, 54.96, 53.6), lm_run("dense", 8e-3, 42, 55.20, 53.7),
            lm_run("dense", 2e-3, 42, 58.72, 57.0), lm_run("dense", 4e-3, 1, 55.32, 54.0),
            lm_run("dense", 4e-3, 2, 55.65, 54.4)]
    assert rt.chosen_learning_rates("language_modeling", runs) == {"dense": 4e-3}
    grid = rows(rt.grid_table("language_modeling", runs))["dense"]
    assert grid["lr 0.004"] == "**54.96 (3 seeds: 55.31)**" and grid["lr 0.008"] == "55.20"
    # rates that share no seed are compared on their means
    apart = [lm_run("ste", 4e-3, 1, 60.0, 60.0), lm_run("ste", 4e-3, 2, 62.0, 60.0), lm_run("ste", 8e-3, 42, 60.5, 60.0)]
    assert rt.chosen_learning_rates("language_modeling", apart) == {"ste 2:4": 8e-3}


def test_render_chooses_the_lr_on_validation_and_reports_seeds_at_it(tmp_path):
    runs = [lm_run("dense", 1e-3, 42, 80.0, 81.0), lm_run("dense", 4e-3, 42, 75.0, 76.0),
            lm_run("sr-ste", 1e-3, 42, 70.0, 71.0), lm_run("sr-ste", 4e-3, 42, 72.0, 73.0),
            lm_run("sr-ste", 1e-3, 1, 70.0, 72.0), lm_run("sr-ste", 1e-3, 2, 70.0, 74.0),
            lm_run("sr-ste", 1e-3, 1, 60.0, 60.0, decay="2e-4"),
            {**lm_run("asp", 1e-3, 42, 65.0, 66.0, dense_warmup_fraction="0.5"), "pattern": "2:4"}]
    assert rt.chosen_learning_rates("language_modeling", runs) == {
        "dense": 4e-3, "sr-ste 2:4": 1e-3, "sr-ste 2:4 (decay=2e-4)": 1e-3, "asp 2:4": 1e-3}
    grid = rows(rt.grid_table("language_modeling", runs))
    assert grid["dense"] == {"validation perplexity": "dense", "lr 0.001": "80.00", "lr 0.004": "**75.00** (edge)"}  # two rates: the best is at an edge
    assert grid["sr-ste 2:4"]["lr 0.001"] == "**70.00 (3 seeds: 70.00)** (edge)" and grid["sr-ste 2:4"]["lr 0.004"] == "72.00"
    table = rows(rt.seeds_table("language_modeling", runs))
    assert table["sr-ste 2:4"]["test ppl"] == f"72.33 ± {statistics.stdev([71.0, 72.0, 74.0]):.2f}"
    assert table["sr-ste 2:4"]["seeds"] == "3 (1, 2, 42)" and table["sr-ste 2:4"]["lr"] == "0.001 (edge)"
    assert table["dense"]["test ppl"] == "76.00" and table["dense"]["lr"] == "0.004 (edge)"
    assert table["asp 2:4"]["test ppl"] == "66.00"  # the schedule's own flag is not part of the label

    path = tmp_path / "lm.json"
    for run in runs:
        rt.append_run(path, {**run, "output_dir": f"{run['method']}-{run['learning_rate']}-{run['seed']}-"
                             f"{run['flags'].get('decay')}", "command": "c"})
    doc = tmp_path / "results.md"
    begin, end = rt.MARKER.format("begin", "language_modeling"), rt.MARKER.format("end", "language_modeling")
    doc.write_text(f"# Results\n\nhand-written text\n\n{begin}\nold table\n{end}\n\nmore text\n")
    rt.main(["language_modeling", "--render", str(doc), "--results_file", str(path)])
    text = doc.read_text()
    assert text.startswith("# Results\n\nhand-written text\n\n" + begin) and text.endswith(f"{end}\n\nmore text\n")
    assert "old table" not in text and "| sr-ste 2:4 | 0.001 (edge) | 72.33 ±" in text and "8 runs recorded" in text
    rt.main(["language_modeling", "--render", str(doc), "--results_file", str(path)])
    assert doc.read_text() == text  # rendering twice changes nothing


def test_render_refuses_a_begin_marker_without_its_end(tmp_path, capsys):
    doc = tmp_path / "results.md"
    doc.write_text(rt.MARKER.format("begin", "translation") + "\nno end\n")
    with pytest.raises(SystemExit):
        rt.main(["--render", str(doc)])
    assert "has no <!-- results_table.py end translation -->" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rt.main(["--runs", "dense:2:4"])
    assert "the recipe and the config are required" in capsys.readouterr().err


def test_curve_figure_draws_the_compared_rows_at_their_chosen_rate(tmp_path):
    curve = [{"step": 50, "loss": 6.0}, {"step": 100, "loss": 5.0, "eval_loss": 4.5}, {"step": 150, "eval_loss": 4.4}]
    runs = [{**lm_run("dense", 1e-3, 42, 80.0, 81.0), "curve": curve},
            {**lm_run("dense", 4e-3, 42, 75.0, 76.0), "curve": curve},
            {**lm_run("sr-ste", 1e-3, 42, 70.0, 71.0), "curve": curve},
            {**lm_run("ste", 1e-3, 42, 70.0, 71.0), "curve": curve}]
    path = tmp_path / "figures" / "lm.png"
    assert rt.curve_figure("language_modeling", runs, path) == 2  # dense at 4e-3 and sr-ste; not ste
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


# --------------------------------------------------------------------------------------------- SAD figures, summary


def sad_curve(rates: list[float], from_init: float = 0.3) -> list[dict]:
    """A Trainer log history: a train log with the tracker's metrics every 50 steps, an eval log at the end."""
    curve = [{"loss": 5.0 - i / 10, "sparsity/sad_rate": rate, "sparsity/sad_from_init_rate": from_init,
              "step": 50 * (i + 1)} for i, rate in enumerate(rates)]
    return [*curve, {"eval_loss": 4.2, "step": 50 * len(rates)}]


def sad_runs() -> list[dict]:
    def run(method: str, lr: float, seed: int, val: float, test: float, rates: list[float], final: float, **flags):
        return {**lm_run(method, lr, seed, val, test, **flags), "curve": sad_curve(rates, final),
                "sad": {"sad_from_init": 10, "sad_from_init_rate": final}}

    return [run("dense", 1e-3, 42, 80.0, 81.0, [0.2, 0.1, 0.05], 0.49),
            run("sr-ste", 1e-3, 42, 70.0, 71.0, [0.1, 0.02, 0.01], 0.30),
            run("sr-ste", 1e-3, 1, 70.0, 73.0, [0.12, 0.03, 0.01], 0.31),
            run("sr-ste", 4e-3, 42, 75.0, 76.0, [0.3, 0.2, 0.1], 0.45),  # not its chosen rate: not in the SAD plot
            run("fixed", 1e-3, 42, 69.0, 70.0, [0.0, 0.0, 0.0], 0.0),  # a frozen mask: named, not drawn
            run("sr-ste", 1e-3, 42, 68.0, 69.0, [0.1, 0.02, 0.01], 0.2, decay="2e-4")]  # a variant row


def test_sad_figures_are_drawn_from_the_curves(tmp_path, capsys):
    runs = sad_runs()
    sad, scatter = tmp_path / "sad.png", tmp_path / "scatter.png"
    # dense and sr-ste 2:4 (mean of its two seeds at 1e-3); fixed is flat, the decay variant is not a method's row
    assert rt.sad_figure("language_modeling", runs, sad) == 3
    assert rt.sad_quality_figure("language_modeling", runs, scatter) == len(runs)  # every run
    assert sad.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and scatter.read_bytes().startswith(b"\x89PNG")

    path = tmp_path / "lm.json"
    for i, run in enumerate(runs):
        rt.append_run(path, {**run, "output_dir": f"r{i}", "command": "c"})
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text(f"{rt.MARKER.format('begin', 'language_modeling')}\n{rt.MARKER.format('end', 'language_modeling')}\n")
    figures = tmp_path / "figures"
    rt.main(["language_modeling", "--render", str(doc), "--results_file", str(path), "--figures", str(figures)])
    out = capsys.readouterr().out
    for kind, drawn in (("curves", 3), ("sad", 3), ("sad_vs_quality", 6)):
        assert (figures / f"language_modeling_{kind}.png").exists()
        assert f"language_modeling_{kind}.png: {drawn} runs drawn" in out
    assert "[SAD rate between logs, per method](../figures/language_modeling_sad.png)" in doc.read_text()
    assert "(../figures/language_modeling_sad_vs_quality.png)" in doc.read_text()


def test_figures_of_one_diagnostic_file_are_named_after_it(tmp_path, capsys):
    """--figures without --render: a budget file's dense and sr-ste 2:4 runs (max_steps shared by all of them)
    are the curves figure's rows; the figures are named after the file; no markdown is needed."""
    path = tmp_path / "budget" / "language_modeling_6000.json"
    for i, run in enumerate(sad_runs()[:2]):
        rt.append_run(path, {**run, "flags": {**run["flags"], "max_steps": "6000"}, "output_dir": f"r{i}",
                             "command": "c"})
    figures = tmp_path / "figures"
    rt.main(["language_modeling", "--results_file", str(path), "--figures", str(figures)])
    out = capsys.readouterr().out
    for kind in ("curves", "sad", "sad_vs_quality"):
        assert f"language_modeling_6000_{kind}.png: 2 runs drawn" in out
        assert (figures / f"language_modeling_6000_{kind}.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in figures.iterdir()) == [f"language_modeling_6000_{k}.png"
                                                        for k in ("curves", "sad", "sad_vs_quality")]
    for argv, message in ((["language_modeling", "c.yaml"], "no config; nothing runs"),
                          (["language_modeling", "--results_file", str(tmp_path / "none.json")], "no runs to draw")):
        with pytest.raises(SystemExit):
            rt.main([*argv, "--figures", str(tmp_path / "other")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_sad_figures_are_not_written_without_their_data(tmp_path, capsys):
    no_sad = [{**run, "curve": [{"loss": 5.0, "step": 50}], "sad": {}} for run in sad_runs()]
    for draw in (rt.sad_figure, rt.sad_quality_figure):
        assert draw("language_modeling", no_sad, tmp_path / "f.png") == 0
        assert not (tmp_path / "f.png").exists()
    frozen = [run for run in sad_runs() if run["method"] == "fixed"]  # SAD 0 at every log: nothing to draw
    assert rt.sad_figure("language_modeling", frozen, tmp_path / "f.png") == 0
    assert not (tmp_path / "f.png").exists()

    path = tmp_path / "lm.json"
    for i, run in enumerate(no_sad):
        rt.append_run(path, {**run, "output_dir": f"r{i}", "command": "c"})
    doc = tmp_path / "results.md"
    doc.write_text(f"{rt.MARKER.format('begin', 'language_modeling')}\n{rt.MARKER.format('end', 'language_modeling')}\n")
    figures = tmp_path / "figures"
    rt.main(["language_modeling", "--render", str(doc), "--results_file", str(path), "--figures", str(figures)])
    assert "language_modeling_sad.png: not drawn" in capsys.readouterr().out
    assert not (figures / "language_modeling_sad.png").exists()
    assert not (figures / "language_modeling_sad_vs_quality.png").exists()
    assert "language_modeling_sad" not in doc.read_text()  # no link to a figure that is not there


README = """# project

Intro text.

## Results

Hand-written lead-in.

{begin}
stale line
{end}

## Limits

More text.
"""


def test_readme_summary_is_generated_from_the_results_files(tmp_path, capsys, monkeypatch):
    # the translation line reads its default file: point it at one that does not exist, not the repository's
    monkeypatch.setitem(rt.RESULTS_FILES, "translation", tmp_path / "no_translation.json")
    runs = [lm_run("dense", 1e-3, 42, 80.0, 81.0), lm_run("dense", 4e-3, 42, 75.0, 76.0),
            lm_run("dense", 4e-3, 1, 75.0, 78.0),
            lm_run("sr-ste", 1e-3, 42, 70.0, 71.0), lm_run("sr-ste", 1e-3, 1, 70.0, 72.0),
            lm_run("sr-ste", 4e-3, 42, 72.0, 60.0),  # a better test value at the rate validation did not choose
            lm_run("sr-ste", 1e-3, 42, 60.0, 50.0, decay="2e-4")]  # a variant: counted, not listed
    lm = tmp_path / "lm.json"
    for i, run in enumerate(runs):
        rt.append_run(lm, {**run, "output_dir": f"r{i}", "command": "c"})
    begin, end = rt.MARKER.format("begin", "summary"), rt.MARKER.format("end", "summary")
    readme = tmp_path / "README.md"
    readme.write_text(README.format(begin=begin, end=end))
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text(f"{rt.MARKER.format('begin', 'language_modeling')}\n{rt.MARKER.format('end', 'language_modeling')}\n")
    rt.main(["language_modeling", "--render", str(doc), "--render", str(readme), "--results_file", str(lm)])
    assert capsys.readouterr().out.splitlines()[-1] == f"{readme}: summary"

    text, original = readme.read_text(), README.format(begin=begin, end=end)
    head, generated, tail = text.partition(begin)[0], *text.partition(begin)[2].partition(end)[::2]
    assert head == original.partition(begin)[0] and tail == original.partition(end)[2]  # the rest untouched
    assert begin in text and end in text and "stale line" not in text
    lm_line, mt_line = generated.strip("\n").splitlines()
    assert lm_line.startswith("- **Language model** (python_docs; protocol and tables in [docs/results.md](")
    assert (f"dense 77.00 ± {statistics.stdev([76.0, 78.0]):.2f} (2), "
            f"sr-ste 2:4 71.50 ± {statistics.stdev([71.0, 72.0]):.2f} (2); 1 variant with flags of their own"
            in lm_line)
    assert "60.00" not in lm_line and "50.00" not in lm_line
    assert mt_line.startswith("- **Translation** (Multi30k En->De;") and mt_line.endswith("no runs recorded yet.")
    assert "| sr-ste 2:4 | 0.001 (edge) | 71.50 ±" in doc.read_text()  # the same file, the same rates, in the table

    rt.main(["language_modeling", "--render", str(readme), "--results_file", str(lm)])
    assert readme.read_text() == text  # rendering twice changes nothing


def test_render_refuses_a_file_without_markers_before_writing_anything(tmp_path, capsys):
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers here\n")
    readme = tmp_path / "README.md"
    readme.write_text(README.format(begin=rt.MARKER.format("begin", "summary"), end=rt.MARKER.format("end", "summary")))
    before = readme.read_text()
    with pytest.raises(SystemExit):
        rt.main(["--render", str(readme), str(plain), "--figures", str(tmp_path / "figures")])
    err = capsys.readouterr().err
    assert f"{plain}: no results_table.py markers; put <!-- results_table.py begin summary -->" in err
    assert readme.read_text() == before and plain.read_text() == "no markers here\n"
    assert not (tmp_path / "figures").exists()
    readme.write_text(rt.MARKER.format("begin", "summary") + "\nno end\n")
    with pytest.raises(SystemExit):
        rt.main(["--render", str(readme)])
    assert f"{readme}: <!-- results_table.py begin summary --> has no <!-- results_table.py end summary -->" in (
        capsys.readouterr().err)


def test_throughput_is_compared_only_with_the_dense_run_trained_beside_it():
    def timed(run: dict, end: str, seconds: float, speed: float) -> dict:
        return {**run, "finished_at": end, "throughput": {"tokens_per_second": speed, "train_runtime_s": seconds}}

    runs = [timed(lm_run("dense", 4e-3, 42, 55.0, 54.0), "2026-12-04T01:00:00+00:00", 1000, 6000.0),
            timed(lm_run("sr-ste", 1.6e-2, 42, 54.0, 53.0), "2026-12-04T01:00:30+00:00", 1000, 5850.0),  # 97% overlap
            timed(lm_run("dense", 4e-3, 1, 55.0, 54.0), "2026-12-04T03:00:00+00:00", 1000, 5000.0),
            timed(lm_run("sr-ste", 1.6e-2, 1, 54.0, 53.0), "2026-12-04T03:08:20+00:00", 1000, 4000.0),  # 50%: no pair
            timed(lm_run("ste", 1.6e-2, 42, 54.0, 53.0), "2026-12-04T05:00:00+00:00", 1000, 3000.0),  # alone
            lm_run("fixed", 1.6e-2, 42, 54.0, 53.0)]  # no timing recorded
    assert rt.paired_throughput(runs) == {"sr-ste 2:4": [pytest.approx(0.975)]}
    line = rt.paired_throughput_line(runs)
    assert "sr-ste 2:4 0.975" in line and "ste 2:4" not in line.replace("sr-ste 2:4", "")
    assert rt.paired_throughput_line(runs[4:]) == ""


def test_resume_continues_from_the_last_complete_checkpoint_and_appends_the_log(tmp_path, monkeypatch):
    started = []

    class FakeRun:
        def __init__(self, cmd, stdout, **kwargs):
            started.append((cmd, stdout.mode))

        def wait(self):
            return 0

    monkeypatch.setattr(rt.subprocess, "Popen", FakeRun)
    spec = rt.parse_run_spec("sr-ste:2:4")
    out_dir = tmp_path / "sr-ste-2x4"
    # 908 < 1362 as numbers, not as names; 1816: killed while saving (no trainer_state.json)
    for step, complete in ((454, True), (908, True), (1362, True), (1816, False)):
        (out_dir / f"checkpoint-{step}").mkdir(parents=True)
        (out_dir / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
        if complete:
            (out_dir / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (out_dir / "checkpoint-notanumber").mkdir()
    rt.run_all("translation", "c.yaml", [(spec, None, out_dir)], ["--save_steps", "454"], 1, 1, resume=True)
    rt.run_all("translation", "c.yaml", [(spec, None, out_dir)], ["--save_steps", "454"], 1, 1)
    rt.run_all("translation", "c.yaml", [(spec, None, tmp_path / "fresh")], [], 1, 1, resume=True)
    asp_dir = tmp_path / "asp-2x4"  # a dense warm-up resumes too (either side of the switch)
    (asp_dir / "checkpoint-454").mkdir(parents=True)
    for name in ("model.safetensors", "trainer_state.json"):
        (asp_dir / "checkpoint-454" / name).write_text("{}")
    rt.run_all("translation", "c.yaml", [(rt.parse_run_spec("asp:2:4"), None, asp_dir)], [], 1, 1, resume=True)
    done_dir = tmp_path / "ste-2x4"  # saved at max_steps (the session ended in the final evaluation): starts again
    (done_dir / "checkpoint-2200").mkdir(parents=True)
    (done_dir / "checkpoint-2200" / "model.safetensors").write_bytes(b"")
    (done_dir / "checkpoint-2200" / "trainer_state.json").write_text('{"global_step": 2200, "max_steps": 2200}')
    rt.run_all("translation", "c.yaml", [(rt.parse_run_spec("ste:2:4"), None, done_dir)], [], 1, 1, resume=True)
    (resumed, resumed_mode), (again, again_mode), (fresh, fresh_mode), (asp, asp_mode), (done, done_mode) = started
    assert "--resume_from_checkpoint" not in done and done_mode == "w"
    assert resumed[-2:] == ["--resume_from_checkpoint", str(out_dir / "checkpoint-1362")] and resumed_mode == "a"
    assert asp[-2:] == ["--resume_from_checkpoint", str(asp_dir / "checkpoint-454")] and asp_mode == "a"
    assert "--resume_from_checkpoint" not in again and again_mode == "w"  # without --resume: from scratch
    assert "--resume_from_checkpoint" not in fresh and fresh_mode == "w"  # nothing to resume from


def test_the_rate_is_chosen_on_seed_42_even_when_every_rate_has_more_seeds():
    # seed 42 prefers 4e-3; seeds 1 and 2 at both rates would hand the mean to 8e-3: the choice stays on 42
    runs = [lm_run("dense", 4e-3, 42, 54.0, 53.0), lm_run("dense", 8e-3, 42, 55.0, 54.0),
            lm_run("dense", 4e-3, 1, 58.0, 57.0), lm_run("dense", 4e-3, 2, 58.0, 57.0),
            lm_run("dense", 8e-3, 1, 55.0, 54.0), lm_run("dense", 8e-3, 2, 55.0, 54.0)]
    assert rt.chosen_learning_rates("language_modeling", runs) == {"dense": 4e-3}
    # a rate run so far only with another seed is no candidate against the grid's seed
    early = [lm_run("dense", 4e-3, 42, 55.0, 54.0), lm_run("dense", 8e-3, 1, 50.0, 49.0)]
    assert rt.chosen_learning_rates("language_modeling", early) == {"dense": 4e-3}
    # a row with one rate and three seeds shows seed 42's value, then the seeds' mean (as every other cell)
    one_rate = [lm_run("sr-ste", 1.6e-2, 42, 54.53, 53.0), lm_run("sr-ste", 1.6e-2, 1, 53.92, 52.0),
                lm_run("sr-ste", 1.6e-2, 2, 53.27, 52.5)]
    assert rows(rt.grid_table("language_modeling", one_rate))["sr-ste 2:4"]["lr 0.016"] == (
        "**54.53 (3 seeds: 53.91)**")


def test_a_duplicate_run_counts_once_the_later_entry_everywhere():
    first = lm_run("sr-ste", 4e-3, 42, 55.0, 50.0)
    rerun = lm_run("sr-ste", 4e-3, 42, 54.0, 52.0)  # same row, rate and seed, recorded later (another dir/command)
    runs = [first, lm_run("sr-ste", 4e-3, 1, 56.0, 51.0), rerun]
    table = rows(rt.seeds_table("language_modeling", runs))["sr-ste 2:4"]
    assert table["seeds"] == "2 (1, 42)"
    assert table["test ppl"] == f"51.50 ± {statistics.stdev([51.0, 52.0]):.2f}"
    assert rows(rt.grid_table("language_modeling", runs))["sr-ste 2:4"]["lr 0.004"] == "**54.00 (2 seeds: 55.00)**"
    assert "3 runs recorded" in rt.render_section("language_modeling", runs, Path("lm.json"))
    assert "(1 replaced by a later entry" in rt.render_section("language_modeling", runs, Path("lm.json"))


def test_a_best_rate_at_the_edge_of_its_grid_is_flagged():
    edge = [lm_run("ste", 4e-3, 42, 56.0, 55.0), lm_run("ste", 8e-3, 42, 55.0, 54.0), lm_run("ste", 1.6e-2, 42, 54.0, 53.0)]
    assert rows(rt.grid_table("language_modeling", edge))["ste 2:4"]["lr 0.016"] == "**54.00** (edge)"
    assert rows(rt.seeds_table("language_modeling", edge))["ste 2:4"]["lr"] == "0.016 (edge)"
    inside = [*edge, lm_run("ste", 3.2e-2, 42, 60.0, 59.0)]
    assert rows(rt.grid_table("language_modeling", inside))["ste 2:4"]["lr 0.016"] == "**54.00**"
    single = [lm_run("ste", 4e-3, 42, 56.0, 55.0)]  # one rate: no grid, no edge
    assert rows(rt.seeds_table("language_modeling", single))["ste 2:4"]["lr"] == "0.004"


def test_a_resumed_runs_short_last_part_inside_a_dense_run_is_no_pair():
    def timed(run: dict, end: str, seconds: float, speed: float) -> dict:
        return {**run, "finished_at": end, "throughput": {"tokens_per_second": speed, "train_runtime_s": seconds}}

    runs = [timed(lm_run("dense", 4e-3, 42, 55.0, 54.0), "2026-12-04T01:00:00+00:00", 1000, 6000.0),
            timed(lm_run("ste", 1.6e-2, 42, 54.0, 53.0), "2026-12-04T00:55:00+00:00", 35, 900.0)]  # resumed: 35 s
    assert rt.paired_throughput(runs) == {}


def test_a_run_trained_across_a_suspension_window_is_no_pair(tmp_path):
    def timed(run: dict, end: str, seconds: float, speed: float) -> dict:
        return {**run, "finished_at": end, "throughput": {"tokens_per_second": speed, "train_runtime_s": seconds}}

    runs = [timed(lm_run("dense", 4e-3, 42, 55.0, 54.0), "2026-12-04T01:00:00+00:00", 1000, 3000.0),
            timed(lm_run("sr-ste", 1.6e-2, 42, 54.0, 53.0), "2026-12-04T01:00:30+00:00", 1000, 5850.0)]
    windows = tmp_path / "suspensions.json"
    windows.write_text(json.dumps({"windows": [
        {"start": "2026-12-04T00:50:00+00:00", "end": "2026-12-04T00:55:00+00:00", "why": "quiet window"}]}))
    assert rt.paired_throughput(runs) == {"sr-ste 2:4": [pytest.approx(1.95)]}
    stopped = rt.load_suspensions(windows)
    assert rt.paired_throughput(runs, stopped) == {}
    assert "Throughput, sparse" not in rt.render_section("language_modeling", runs, windows, suspensions=stopped)
    assert "sr-ste 2:4 1.950" in rt.render_section("language_modeling", runs, windows, suspensions=[])
    assert rt.load_suspensions(tmp_path / "absent.json") == []


def test_a_rendered_section_builds_the_validation_grid_once(monkeypatch):
    """The seeds table, the grid table and the chosen rates of each share one grid, with the same text."""
    runs = [lm_run("dense", 4e-3, 42, 54.0, 53.0), lm_run("dense", 8e-3, 42, 55.0, 54.0),
            lm_run("sr-ste", 4e-3, 42, 56.0, 55.0), lm_run("sr-ste", 4e-3, 1, 57.0, 56.0)]
    expected = "\n".join(["", rt.seeds_table("language_modeling", runs), "",
                          "Paired by seed: each row's test ppl less dense's in every seed both ran at their chosen "
                          "learning rates (rows with no such seed left out), so a negative difference is the row "
                          "ahead of dense in that seed:", "", rt.paired_table("language_modeling", runs), "",
                          "Learning-rate grid (validation metric; the chosen rate in bold):", "",
                          rt.grid_table("language_modeling", runs)])
    built = []
    original = rt.validation_grid
    monkeypatch.setattr(rt, "validation_grid", lambda *args: built.append(args) or original(*args))
    section = rt.render_section("language_modeling", runs, Path("lm.json"), suspensions=[])
    assert len(built) == 1
    assert expected in section


def mt_run(method: str, lr: float, seed: int, val: float, test: float) -> dict:
    return {"method": method, "pattern": None if method == "dense" else "2:4", "learning_rate": lr, "seed": seed,
            "validation": {"bleu": val}, "test": {"bleu": test, "chrf": 50.0}, "flags": {"learning_rate": str(lr)}}


def test_paired_by_seed_compares_each_row_with_dense_in_the_seeds_both_ran_at_their_chosen_rates():
    # dense is chosen at 4e-3 (seeds 42 and 1 there); its seed-2 run at 8e-3 is no partner
    runs = [lm_run("dense", 4e-3, 42, 55.0, 54.0), lm_run("dense", 8e-3, 42, 56.0, 50.0),
            lm_run("dense", 4e-3, 1, 55.5, 53.0), lm_run("dense", 8e-3, 2, 56.0, 49.0),
            # sr-ste is chosen at 1.6e-2: ahead in seed 42, behind in seed 1; seed 2 dense lacks at its rate
            lm_run("sr-ste", 1.6e-2, 42, 54.0, 53.0), lm_run("sr-ste", 1.6e-2, 1, 54.5, 53.5),
            lm_run("sr-ste", 1.6e-2, 2, 54.5, 40.0), lm_run("sr-ste", 4e-3, 42, 60.0, 10.0),
            lm_run("ste", 1.6e-2, 7, 54.0, 20.0),  # no seed in common with dense: left out
            lm_run("sr-ste", 1.6e-2, 42, 54.0, 54.0, decay="1e-1"),  # a tie is no win
            lm_run("fixed", 1.6e-2, 1, 54.0, 52.5)]  # lower perplexity: ahead
    assert rt.paired_by_seed("language_modeling", runs) == {
        "sr-ste 2:4": {42: pytest.approx(-1.0), 1: pytest.approx(0.5)}, "sr-ste 2:4 (decay=1e-1)": {42: 0.0},
        "fixed 2:4": {1: pytest.approx(-0.5)}}
    text = rt.paired_table("language_modeling", runs)
    assert text.splitlines()[0] == ("| test ppl, row − dense (lower is better) | seed 1 | seed 42 | mean "
                                    "| row better in |")
    table = rows(text)
    assert list(table) == ["sr-ste 2:4", "sr-ste 2:4 (decay=1e-1)", "fixed 2:4"]  # not dense, not ste
    assert table["sr-ste 2:4"] == {"test ppl, row − dense (lower is better)": "sr-ste 2:4", "seed 1": "+0.50",
                                   "seed 42": "-1.00", "mean": "-0.25", "row better in": "1 of 2 seeds"}
    assert table["sr-ste 2:4 (decay=1e-1)"]["seed 1"] == "-"
    assert table["sr-ste 2:4 (decay=1e-1)"]["row better in"] == "0 of 1 seed"
    assert table["fixed 2:4"]["seed 1"] == "-0.50" and table["fixed 2:4"]["row better in"] == "1 of 1 seed"
    section = rt.render_section("language_modeling", runs, Path("lm.json"), suspensions=[])
    assert "so a negative difference is the row ahead of dense" in section and text in section
    # the seeds table's rows are unchanged by it
    assert section.index(rt.seeds_table("language_modeling", runs)) < section.index(text) < section.index(
        "Learning-rate grid")


def test_paired_by_seed_counts_higher_bleu_as_better_for_translation():
    runs = [mt_run("dense", 1e-3, 42, 32.0, 31.0), mt_run("dense", 1e-3, 1, 32.0, 30.0),
            mt_run("dense", 2e-3, 42, 30.0, 35.0),  # not dense's chosen rate
            mt_run("sr-ste", 2e-3, 42, 33.0, 32.0), mt_run("sr-ste", 2e-3, 1, 33.0, 29.5),
            mt_run("ste", 2e-3, 42, 33.0, 30.0)]
    table = rows(rt.paired_table("translation", runs))
    title = "test BLEU, row − dense (higher is better)"
    assert table["sr-ste 2:4"] == {title: "sr-ste 2:4", "seed 1": "-0.50", "seed 42": "+1.00", "mean": "+0.25",
                                   "row better in": "1 of 2 seeds"}
    assert table["ste 2:4"]["seed 42"] == "-1.00" and table["ste 2:4"]["row better in"] == "0 of 1 seed"
    assert "so a positive difference is the row ahead" in rt.render_section("translation", runs, Path("mt.json"),
                                                                           suspensions=[])


def test_no_paired_table_without_a_dense_partner():
    no_dense = [mt_run("sr-ste", 2e-3, 42, 33.0, 32.0)]
    apart = [mt_run("dense", 1e-3, 1, 32.0, 31.0), mt_run("sr-ste", 2e-3, 42, 33.0, 32.0)]
    for runs in (no_dense, apart):
        assert rt.paired_by_seed("translation", runs) == {} and rt.paired_table("translation", runs) == ""
        assert "Paired by seed" not in rt.render_section("translation", runs, Path("mt.json"), suspensions=[])


def test_a_paired_difference_that_rounds_to_zero_is_a_tie_shown_as_plus_zero():
    # 53.996 - 54.0 = -0.004: shown as +0.00 (not -0.00) and not counted as the row being ahead
    runs = [lm_run("dense", 4e-3, 42, 55.0, 54.0), lm_run("sr-ste", 1.6e-2, 42, 54.0, 53.996)]
    table = rows(rt.paired_table("language_modeling", runs))
    assert table["sr-ste 2:4"]["seed 42"] == "+0.00"
    assert table["sr-ste 2:4"]["row better in"] == "0 of 1 seed"
