"""`nm-hf inspect / compress / decompress`."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from nm_hf.checkpoint import WEIGHTS_NAME, load_compressed
from nm_hf.cli import main
from nm_hf.config import SparsityConfig
from nm_hf.injection import finalize, sparsify
from nm_hf.record import record_group_dims
from nm_hf.report import layer_sparsity
from tiny_models import tiny_model


def saved_model(path, model_type="llama", dtype=torch.float32, **config):
    model = tiny_model(model_type).to(dtype)
    finalize(sparsify(model, SparsityConfig(**config)))
    model.save_pretrained(path)
    return model


def test_inspect_saved_model(tmp_path, capsys):
    model = saved_model(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2:4 (sr-ste), state finalized, safetensors" in out
    for name in model.config.nm_sparsity["targeted_modules"]:
        assert name in out
    assert re.search(r"\nmodel\.layers\.0\.mlp\.down_proj +32x64 +2:4 +50\.00% +yes\n", out)
    assert "N:M pattern holds in all 14 targeted layers" in out


def test_inspect_violated_pattern_exits_1(tmp_path, capsys):
    model = tiny_model("llama")
    finalize(sparsify(model, SparsityConfig()))
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, :4] = 1.0
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.q_proj" in out and " NO" in out
    assert "N:M pattern VIOLATED in 1 of 14 layers: model.layers.1.self_attn.q_proj" in out


def test_inspect_training_checkpoint_exits_1(tmp_path, capsys):
    model = tiny_model("llama")
    sparsify(model, SparsityConfig())
    model.save_pretrained(tmp_path)  # dense training weights
    assert main(["inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "state training" in out
    # the same hint as `nm-hf compress` gives for this directory, as the last line
    assert out.splitlines()[-1] == ("the record says state='training' (dense training weights): "
                                    "save after nm_hf.finalize(model)")


def test_inspect_pattern_whose_m_divides_no_input_size_exits_2(tmp_path, capsys):
    """2:3 on input sizes 32 and 64 cannot hold whatever the weights: one line saying so, not 'VIOLATED'."""
    saved_model(tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path), "--pattern", "2:3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "VIOLATED" not in captured.err
    assert captured.err == (f"nm-hf inspect: error: {tmp_path}: pattern 2:3 cannot hold in any checked layer: no "
                            "input size is divisible by m=3 (sizes: 32, 64); choose an m that divides them\n")


def test_inspect_counts_layers_whose_input_size_m_does_not_divide_apart(tmp_path, capsys):
    """32:64 fits the down_proj layers (input 64), not the others (input 32): each says why, apart from
    real violations."""
    model = tiny_model("llama")
    finalize(sparsify(model, SparsityConfig()))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0] = 1.0  # 64 non-zeros in a group of 64
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--pattern", "32:64"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"\nmodel\.layers\.0\.mlp\.down_proj +32x64 +32:64 +50\.\d\d% +yes\n", out)
    assert re.search(r"\nmodel\.layers\.0\.self_attn\.q_proj +32x32 +32:64 +50\.00% +"
                     r"NO \(input size 32 is not divisible by m=64\)\n", out)
    assert "N:M pattern VIOLATED in 1 of 14 layers: model.layers.1.mlp.down_proj\n" in out
    assert ("N:M pattern cannot hold in 12 of 14 layers, whose input size is not divisible by m=64: "
            "model.layers.0.self_attn.q_proj, ") in out
    assert main(["inspect", str(tmp_path), "--pattern", "32:64", "--json"]) == 1
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["layers"]}
    assert rows["model.layers.0.self_attn.q_proj"]["reason"] == "input size 32 is not divisible by m=64"
    assert rows["model.layers.1.mlp.down_proj"]["reason"] == ""


@pytest.mark.parametrize(("pattern", "message"), [
    ("4:2", "--pattern 4:2: need 1 <= N <= M"),
    ("2x4", "--pattern '2x4' is not of the form N:M (e.g. 2:4)"),
])
def test_inspect_bad_pattern_names_the_flag(tmp_path, capsys, pattern, message):
    saved_model(tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path), "--pattern", pattern]) == 2
    assert capsys.readouterr().err == f"nm-hf inspect: error: {message}\n"


@pytest.mark.parametrize("record_form", ["group_dims", "conv1d_modules", "model_type"])
def test_inspect_gpt2_groups_along_dim0(tmp_path, capsys, record_form):
    model = tiny_model("gpt2")
    finalize(sparsify(model, SparsityConfig()))
    record = model.config.nm_sparsity
    assert record["group_dims"] == dict.fromkeys(record["targeted_modules"], 0)  # what nm_hf writes now
    if record_form != "group_dims":  # older records: a conv1d_modules list, or nothing (read by model type)
        record.pop("group_dims")
    if record_form == "conv1d_modules":
        record["conv1d_modules"] = list(record["targeted_modules"])
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "transformer.h.0.attn.c_attn" in capsys.readouterr().out
    # the group dim matters: these [in, out] weights are not 2:4 along dim 1
    weight = load_file(str(tmp_path / "model.safetensors"))["transformer.h.0.attn.c_attn.weight"]
    assert not layer_sparsity("c_attn", weight, 2, 4, group_dim=1).nm_ok


def test_inspect_json(tmp_path, capsys):
    saved_model(tmp_path, target_modules=["q_proj"])
    assert main(["inspect", "--json", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"]["nm_ok"] is True and len(data["layers"]) == 2
    assert data["record"]["n"] == 2


def test_compress_decompress_and_inspect_compressed(tmp_path, capsys):
    model = saved_model(tmp_path / "plain", "bart", torch.float16)
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "plain"), str(tmp_path / "c")]) == 0
    assert capsys.readouterr().err == ""  # no progress bar when stderr is not a terminal (a log)
    assert (tmp_path / "c" / WEIGHTS_NAME).exists()
    assert main(["inspect", str(tmp_path / "c")]) == 0
    assert "nm_hf compressed" in capsys.readouterr().out
    assert main(["compress", str(tmp_path / "plain"), str(tmp_path / "c")]) == 2  # exists
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["compress", "--overwrite", str(tmp_path / "plain"), str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main(["decompress", str(tmp_path / "c"), str(tmp_path / "d")]) == 0
    assert capsys.readouterr().err == ""
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "d")
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    assert main(["decompress", str(tmp_path / "plain"), str(tmp_path / "e")]) == 2
    assert "is not compressed" in capsys.readouterr().err
    assert load_compressed(tmp_path / "c").config.nm_sparsity["n"] == 2


def test_inspect_lists_layers_in_model_order_compressed_or_not(tmp_path, capsys):
    """A compressed file's header lists keys as strings (layers.10 before layers.2); inspect shows the
    model's order, as for the plain checkpoint, and --layers picks layers in that order too."""
    model = tiny_model("llama", num_hidden_layers=11)
    finalize(sparsify(model, SparsityConfig(target_modules=["q_proj", "o_proj"])))
    model.save_pretrained(tmp_path / "plain")
    order = [f"model.layers.{i}.self_attn.{p}" for i in range(11) for p in ("q_proj", "o_proj")]
    assert model.config.nm_sparsity["targeted_modules"] == order
    assert main(["compress", str(tmp_path / "plain"), str(tmp_path / "c")]) == 0
    for directory, layers in (("plain", []), ("c", []), ("plain", ["--layers", "q_proj"]),
                              ("c", ["--layers", "q_proj"])):
        capsys.readouterr()
        assert main(["inspect", "--json", str(tmp_path / directory), *layers]) == 0
        rows = [row["name"] for row in json.loads(capsys.readouterr().out)["layers"]]
        assert rows == ([name for name in order if name.endswith("q_proj")] if layers else order), directory


def test_compress_refuses_violations(tmp_path, capsys):
    model = tiny_model("llama")
    finalize(sparsify(model, SparsityConfig()))
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[5, 4:8] = 2.0
    model.save_pretrained(tmp_path / "plain")
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "plain"), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err == (f"nm-hf compress: error: {tmp_path / 'plain'}: cannot compress, 1 of 14 targeted "
                   "weights do not obey the 2:4 pattern: model.layers.0.mlp.gate_proj.weight\n")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def last_line(err):
    """What is left on the terminal of stderr: a progress bar (tqdm) redraws its line with \\r."""
    return err.rsplit("\r", 1)[-1]


@pytest.mark.parametrize("case", ["training", "dense"])
def test_compress_of_weights_that_are_not_nm_is_one_line(tmp_path, capsys, case):
    """Every targeted weight breaks the pattern: one headline saying how many and naming the first five,
    never one line per layer; nothing is written, not even the output's missing parent folders."""
    model = tiny_model("llama")
    if case == "training":  # saved before finalize: the dense training weights, state 'training'
        sparsify(model, SparsityConfig())
        with pytest.warns(UserWarning):
            model.save_pretrained(tmp_path / "in")
    else:  # a dense model's save_pretrained given a record by hand (as a careless edit would)
        model.save_pretrained(tmp_path / "in")
        config = json.loads((tmp_path / "in" / "config.json").read_text())
        sparse = tiny_model("llama")
        finalize(sparsify(sparse, SparsityConfig()))
        config["nm_sparsity"] = sparse.config.nm_sparsity
        (tmp_path / "in" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "in"), str(tmp_path / "new" / "sub" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    line = last_line(err)
    assert line.startswith(f"nm-hf compress: error: {tmp_path / 'in'}: cannot compress, 14 of 14 targeted weights "
                           "do not obey the 2:4 pattern: model.layers.0.mlp.down_proj.weight, ")
    assert "(+9 more)" in line and "model.layers.1" not in line
    assert ("state='training'" in line) == (case == "training")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def main_interrupted(argv):
    """`main(argv)` of a run interrupted by Ctrl-C, which main must handle (not pytest)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped nm-hf's main()")


@pytest.mark.parametrize("command", ["compress", "decompress"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_ctrl_c_is_one_line_exit_130_and_writes_nothing(tmp_path, capsys, monkeypatch, command, overwrite):
    """KeyboardInterrupt in the middle of the work (staging directory in use): no traceback, status 130,
    the staging directory is gone and an existing output is left as it was."""
    import nm_hf.checkpoint.compressed as compressed

    saved_model(tmp_path / "plain")
    assert main(["compress", str(tmp_path / "plain"), str(tmp_path / "c")]) == 0
    source = tmp_path / ("plain" if command == "compress" else "c")
    output = tmp_path / "out"
    if overwrite:
        output.mkdir()
        (output / "keep.txt").write_text("mine")
    staged = []

    def interrupted(*args, **kwargs):
        staged.extend(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-"))
        raise KeyboardInterrupt

    monkeypatch.setattr(compressed, "compress_tensor" if command == "compress" else "decompress_tensor", interrupted)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main_interrupted([command, str(source), str(output), *(["--overwrite"] if overwrite else [])]) == 130
    captured = capsys.readouterr()
    assert last_line(captured.err) == f"nm-hf {command}: interrupted, nothing written\n"
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err and captured.out == ""
    assert staged, "the interrupt came before the staging directory existed"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if overwrite:
        assert [p.name for p in output.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("command,function", [("inspect", "inspect_checkpoint"), ("compress", "compress_checkpoint"),
                                              ("decompress", "decompress_checkpoint"), ("plot", "plot_runs")])
def test_ctrl_c_in_every_command(tmp_path, capsys, monkeypatch, command, function):
    import nm_hf.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nm_hf.cli, function, interrupted)
    args = {"inspect": [str(tmp_path)], "plot": [str(tmp_path), "-o", str(tmp_path / "p.png")]}
    assert main_interrupted([command, *args.get(command, [str(tmp_path), str(tmp_path / "out")])]) == 130
    assert capsys.readouterr().err == f"nm-hf {command}: interrupted, nothing written\n"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,message", [
    (["inspect", "{tmp}/missing"], "no such directory"),
    (["compress", "{tmp}/missing", "{tmp}/out"], "no such directory"),
    (["decompress", "{tmp}/missing", "{tmp}/out"], "no such directory"),
    (["inspect", "{tmp}/file.txt"], "not a directory"),
    (["inspect", "{tmp}/empty"], "no config.json"),
    (["inspect", "{tmp}/dense"], "no 'nm_sparsity' record"),
])
def test_bad_input_exits_2_without_traceback(tmp_path, capsys, args, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    capsys.readouterr()
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.err.startswith(f"nm-hf {args[0]}: error: ")


def test_missing_weight_file(tmp_path, capsys):
    saved_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no model.safetensors" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    """The installed `nm-hf` entry point (or `python -m nm_hf.cli`) in a fresh interpreter."""
    script = shutil.which("nm-hf", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "nm_hf.cli"]
    missing = subprocess.run([*command, "inspect", str(tmp_path / "nope")], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip() == f"nm-hf inspect: error: {tmp_path / 'nope'}: no such directory"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as err:
        main([])
    assert err.value.code == 2 and "usage: nm-hf" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["inspect"])
    assert err.value.code == 2


def test_inspect_sharded_checkpoint(tmp_path, capsys):
    model = tiny_model("llama")
    finalize(sparsify(model, SparsityConfig()))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert main(["inspect", str(tmp_path)]) == 0
    assert main(["compress", str(tmp_path), str(tmp_path.parent / "sharded_c")]) == 0
    loaded = load_compressed(tmp_path.parent / "sharded_c")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_unsharded_save_over_a_sharded_one_reads_model_safetensors(tmp_path, capsys):
    # save_pretrained unsharded into a folder that held a sharded save deletes the shards but leaves the index;
    # transformers loads model.safetensors, and so must inspect and compress (not the stale index)
    old = tiny_model("llama")
    finalize(sparsify(old, SparsityConfig()))
    old.save_pretrained(tmp_path, max_shard_size="20KB")
    model = tiny_model("llama", seed=1)
    finalize(sparsify(model, SparsityConfig()))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() and (tmp_path / "model.safetensors").exists()
    assert main(["inspect", str(tmp_path)]) == 0
    assert main(["compress", str(tmp_path), str(tmp_path.parent / "c")]) == 0
    loaded = load_compressed(tmp_path.parent / "c")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_group_dim_heuristics_for_older_records():
    record = {"targeted_modules": ["transformer.h.0.attn.c_attn", "multiple_choice_head.summary"]}
    assert record_group_dims(record, {"model_type": "gpt2"}) == {
        "transformer.h.0.attn.c_attn": 0, "multiple_choice_head.summary": 1}
    assert record_group_dims(record, {"model_type": "gpt_bigcode"}) == dict.fromkeys(record["targeted_modules"], 1)
    nested = {"model_type": "encoder-decoder", "encoder": {"model_type": "bert"}, "decoder": {"model_type": "gpt2"}}
    assert record_group_dims({"targeted_modules": ["decoder.transformer.h.0.mlp.c_fc"]}, nested) == {
        "decoder.transformer.h.0.mlp.c_fc": 0}
    recorded = {**record, "conv1d_modules": ["multiple_choice_head.summary"]}  # the record wins
    assert record_group_dims(recorded, {"model_type": "gpt2"})["multiple_choice_head.summary"] == 0


def test_inspect_gpt2_double_heads_mixes_conv1d_and_linear(tmp_path, capsys):
    from transformers import GPT2DoubleHeadsModel
    from transformers.pytorch_utils import Conv1D

    from tiny_models import tiny_config

    model = GPT2DoubleHeadsModel(tiny_config("gpt2"))
    # "all-linear" leaves the head outside the backbone dense: named here to mix the two layouts
    names = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    finalize(sparsify(model, SparsityConfig(target_modules=[*names, "multiple_choice_head.summary"])))
    assert "multiple_choice_head.summary" in model.config.nm_sparsity["targeted_modules"]
    assert model.config.nm_sparsity["group_dims"]["multiple_choice_head.summary"] == 1
    model.config.nm_sparsity.pop("group_dims")  # an oldest record: read by model type and layer name
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "multiple_choice_head.summary" in capsys.readouterr().out


# ----------------------------------------------------------------------------- "Trust and first contact"


def _rewrite_tensor(path, key, edit):
    """Change one stored tensor of a compressed file, keeping its header (and so its checksum)."""
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = dict(handle.metadata())
    edit(tensors[key])
    save_file(tensors, str(path), metadata=metadata)


def test_inspect_verifies_every_tensor_of_a_compressed_file(tmp_path, capsys):
    saved_model(tmp_path / "plain", "llama", torch.float16)
    assert main(["compress", str(tmp_path / "plain"), str(tmp_path / "c")]) == 0
    _rewrite_tensor(tmp_path / "c" / WEIGHTS_NAME, "model.norm.weight", lambda t: t.view(torch.uint8)[3:4].add_(1))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "c")]) == 2  # not a targeted layer, still corrupted
    err = capsys.readouterr().err
    assert "checksum mismatch for tensor 'model.norm.weight'" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_read_only_output_is_a_one_line_error(tmp_path, capsys, monkeypatch, command):
    saved_model(tmp_path / "plain")
    assert main(["compress", str(tmp_path / "plain"), str(tmp_path / "c")]) == 0
    source = tmp_path / ("plain" if command == "compress" else "c")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    capsys.readouterr()
    assert main([command, str(source), str(tmp_path / "ro" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nm-hf {command}: error: ") and "Read-only file system" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 directory anyway")
def test_unwritable_parent_directory_is_a_one_line_error(tmp_path, capsys):
    saved_model(tmp_path / "plain")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert main(["compress", str(tmp_path / "plain"), str(locked / "out")]) == 2
    finally:
        locked.chmod(0o755)
    assert "Permission denied" in capsys.readouterr().err


def test_compress_never_replaces_its_own_input(tmp_path, capsys):
    saved_model(tmp_path / "P" / "model")
    before = sorted(p.name for p in (tmp_path / "P" / "model").iterdir())
    for output in (tmp_path / "P", tmp_path / "P" / "model", tmp_path):
        assert main(["compress", str(tmp_path / "P" / "model"), str(output), "--overwrite"]) == 2
        assert "would replace the input" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "P" / "model").iterdir()) == before
    assert main(["compress", str(tmp_path / "P" / "model"), str(tmp_path / "P" / "c")]) == 0
    assert main(["decompress", str(tmp_path / "P" / "c"), str(tmp_path / "P"), "--overwrite"]) == 2
    assert (tmp_path / "P" / "c" / WEIGHTS_NAME).exists()


def test_compress_onto_the_current_directory_or_an_existing_one(tmp_path, capsys, monkeypatch):
    saved_model(tmp_path / "plain")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "work")
    assert main(["compress", str(tmp_path / "plain"), ".", "--overwrite"]) == 2
    assert "cannot replace the current directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "work"]
    monkeypatch.chdir(tmp_path)
    assert main(["compress", str(tmp_path / "plain"), str(tmp_path / "work")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_broken_pipe_ends_quietly(tmp_path):
    """`nm-hf inspect DIR | head -3`: the reader goes away before the table is written."""
    saved_model(tmp_path)
    script = shutil.which("nm-hf", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "nm_hf.cli"]
    for args in (["inspect", str(tmp_path)], ["inspect", "--json", str(tmp_path)]):
        proc = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # long before the child has imported torch and written anything
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 141, err.decode()[-2000:]
        assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_version(capsys):
    import nm_hf

    with pytest.raises(SystemExit) as err:
        main(["--version"])
    assert err.value.code == 0 and capsys.readouterr().out.strip() == f"nm-hf {nm_hf.__version__}"


def test_plot_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from nm_hf.tracker import HISTORY_FILE, SparsityTracker

    runs = []
    for name in ("ste", "sr-ste"):
        model = sparsify(tiny_model("gpt2"), SparsityConfig(method=name))
        tracker = SparsityTracker(model)
        for step in (1, 2, 3):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.01 * step)
            tracker.step()
            tracker.log_metrics(step)
        tracker.save(tmp_path / name / HISTORY_FILE)
        runs.append(str(tmp_path / name))
    assert main(["plot", *runs, "-o", str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")
    assert "not enough logged steps" not in capsys.readouterr().err
    short = SparsityTracker(sparsify(tiny_model("gpt2"), SparsityConfig(method="ste")))
    short.step()
    short.log_metrics(1)  # one logged step: not drawn, and the command says so (as python -m nm_hf.plot does)
    short.save(tmp_path / "short" / HISTORY_FILE)
    assert main(["plot", runs[0], str(tmp_path / "short"), "-o", str(tmp_path / "out2.png")]) == 0
    assert "note: ste (short): not enough logged steps (fewer than 2), not drawn" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("nm-hf plot: error: ")


def _without_record(path, model_type="llama", finalized=True):
    model = tiny_model(model_type)
    if finalized:
        finalize(sparsify(model, SparsityConfig()))
        del model.config.nm_sparsity  # as another tool would save it
    model.save_pretrained(path)
    assert "nm_sparsity" not in json.loads((path / "config.json").read_text())


def test_inspect_with_a_pattern_for_checkpoints_of_other_tools(tmp_path, capsys):
    _without_record(tmp_path / "llama")
    assert main(["inspect", str(tmp_path / "llama")]) == 2
    assert "pass a pattern (nm-hf inspect --pattern N:M)" in capsys.readouterr().err
    assert main(["inspect", "--pattern", "2:4", str(tmp_path / "llama")]) == 0
    out = capsys.readouterr().out
    assert "no nm_sparsity record; checking 2:4 on 14 layers (every Linear/Conv1D layer but the output head)" in out
    assert "model.layers.1.mlp.down_proj" in out and "lm_head" not in out
    assert main(["inspect", "--pattern", "2:4", "--layers", "q_proj", "--json", str(tmp_path / "llama")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in data["layers"]] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert data["record"] is None and data["checked"] == "the layers named by --layers"
    assert main(["inspect", "--pattern", "1:4", str(tmp_path / "llama")]) == 1  # 2:4 is not 1:4
    _without_record(tmp_path / "gpt2", "gpt2")  # Conv1D: groups along dim 0, from the layer-kind registry
    assert main(["inspect", "--pattern", "2:4", str(tmp_path / "gpt2")]) == 0
    assert "on 8 layers" in capsys.readouterr().out
    _without_record(tmp_path / "dense", finalized=False)
    assert main(["inspect", "--pattern", "2:4", str(tmp_path / "dense")]) == 1
    assert main(["inspect", "--pattern", "2-4", str(tmp_path / "dense")]) == 2
    assert main(["inspect", str(tmp_path / "dense"), "--pattern", "2:4", "--layers", "nope"]) == 2
    assert "'nope' matched no weight" in capsys.readouterr().err


def _moe_saved(path, model_type, record=True, exclude=()):
    from test_layers_experts import tiny_moe

    model = tiny_moe(model_type)
    finalize(sparsify(model, SparsityConfig(exclude_modules=list(exclude) or None)))
    if not record:
        del model.config.nm_sparsity
    model.save_pretrained(path)


@pytest.mark.parametrize("model_type,block", [("gpt_oss", "mlp"), ("llama4_text", "feed_forward")])
def test_inspect_layers_selects_fused_expert_weights(tmp_path, capsys, model_type, block):
    """gpt_oss / llama4 save experts fused, under keys without `.weight` ([E, in, out]: groups along dim 1)."""
    expected = [f"model.layers.{i}.{block}.experts.gate_up_proj" for i in range(2)]
    for record in (True, False):
        _moe_saved(tmp_path / str(record), model_type, record=record)
        args = ["inspect", str(tmp_path / str(record)), "--pattern", "2:4", "--layers", "experts.gate_up_proj", "--json"]
        assert main(args) == 0
        rows = json.loads(capsys.readouterr().out)["layers"]
        assert [row["name"] for row in rows] == expected and all(row["nm_ok"] for row in rows)
    assert main(["inspect", str(tmp_path / "False"), "--pattern", "1:4", "--layers", "experts.down_proj"]) == 1


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_inspect_without_a_record_checks_expert_weights(tmp_path, capsys, model_type):
    _moe_saved(tmp_path / "sparse", model_type, record=False)
    assert main(["inspect", str(tmp_path / "sparse"), "--pattern", "2:4", "--json"]) == 0
    names = [row["name"] for row in json.loads(capsys.readouterr().out)["layers"]]
    if model_type == "mixtral":  # saved per expert (w1/w2/w3 of each), found with the model's save conversion
        assert sum(".experts." in name for name in names) == 2 * 4 * 3
        assert "model.layers.1.block_sparse_moe.experts.3.w2" in names
    else:
        assert sum(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in names) == 4
    assert not any(name.endswith((".gate", ".router")) for name in names)  # routers are not linear layers to check
    _moe_saved(tmp_path / "dense_experts", model_type, record=False, exclude=["experts"])
    assert main(["inspect", str(tmp_path / "dense_experts"), "--pattern", "2:4"]) == 1
    out = capsys.readouterr().out
    assert "N:M pattern VIOLATED" in out and "experts" in out.split("VIOLATED", 1)[1]


@pytest.mark.parametrize("record", [True, False])
def test_inspect_layers_names_fused_experts_saved_per_expert(tmp_path, capsys, record):
    """Mixtral saves experts.gate_up_proj as experts.{e}.w1 / w3: its in-memory name still selects them."""
    _moe_saved(tmp_path, "mixtral", record=record)
    assert main(["inspect", str(tmp_path), "--pattern", "2:4", "--layers", "experts.gate_up_proj", "--json"]) == 0
    names = [row["name"] for row in json.loads(capsys.readouterr().out)["layers"]]
    assert len(names) == 2 * 4 * 2 and "model.layers.1.block_sparse_moe.experts.3.w3" in names
    assert not any(name.endswith(".w2") for name in names)


@pytest.mark.parametrize("model_type,rows", [("gpt_oss", 2), ("llama4_text", 2), ("mixtral", 2 * 4 * 2)])
def test_inspect_layers_selects_fused_expert_weights_of_a_compressed_checkpoint(tmp_path, capsys, model_type, rows):
    """`--layers experts.gate_up_proj` selects the same weights in a compressed checkpoint as in the normal one:
    fused keys have no `.weight` suffix (gpt_oss, llama4), Mixtral saves them as `experts.{e}.w1/w3`."""
    _moe_saved(tmp_path / "dense", model_type)
    assert main(["compress", str(tmp_path / "dense"), str(tmp_path / "packed")]) == 0
    capsys.readouterr()
    rows_expected, rows = rows, {}
    for name in ("dense", "packed"):
        args = ["inspect", str(tmp_path / name), "--layers", "experts.gate_up_proj", "--json"]
        assert main(args) == 0, capsys.readouterr().err
        rows[name] = [row["name"] for row in json.loads(capsys.readouterr().out)["layers"]]
    assert rows["packed"] == rows["dense"] and len(rows["dense"]) == rows_expected


@pytest.mark.parametrize("group_dim,message", [(None, "holds None for"), ([1], "holds [1] for"),
                                               (5, "group dim 5 of")])
def test_malformed_group_dims_are_one_line_errors(tmp_path, capsys, group_dim, message):
    """A hand-edited group_dims entry was a TypeError / IndexError traceback from `inspect` and `compress`."""
    saved_model(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    first = config["nm_sparsity"]["targeted_modules"][0]
    config["nm_sparsity"]["group_dims"][first] = group_dim
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path / "m") in err
    assert main(["compress", str(tmp_path / "m"), str(tmp_path / "c")]) == 2
    assert str(tmp_path / "m") in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_ctrl_c_after_the_output_replaced_the_old_one(tmp_path, capsys, monkeypatch):
    """compress --overwrite, Ctrl-C while the replaced output is deleted (the new one is already in place): the
    line says the output was written, and no half-deleted hidden copy of the old output stays behind."""
    import nm_hf._files as files

    saved_model(tmp_path / "plain")
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    real, interrupted = shutil.rmtree, []

    def rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(".out.old-") and not interrupted:
            interrupted.append(path)
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files.shutil, "rmtree", rmtree)
    capsys.readouterr()
    assert main_interrupted(["compress", str(tmp_path / "plain"), str(output), "--overwrite"]) == 130
    assert interrupted
    assert last_line(capsys.readouterr().err) == f"nm-hf compress: interrupted after {output} was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]
    assert (output / "config.json").exists() and not (output / "keep.txt").exists()


def test_ctrl_c_ends_the_program_by_sigint_so_a_calling_shell_stops_too(tmp_path):
    """The program (not `main()`, which returns 130 to Python callers) dies of SIGINT after its one line, as
    Python does after an unhandled KeyboardInterrupt: bash stops a loop or script only for a child that died
    of the signal, not for one that exited with status 130."""
    import signal

    code = ("import sys, nm_hf.cli as cli\n"
            "def interrupted(*args, **kwargs):\n    raise KeyboardInterrupt\n"
            "cli.inspect_checkpoint = interrupted\n"
            f"sys.argv = ['nm-hf', 'inspect', {str(tmp_path)!r}]\n"
            "cli.console_main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.stderr == "nm-hf inspect: interrupted, nothing written\n"
    assert proc.returncode == -signal.SIGINT
