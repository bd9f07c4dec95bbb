"""`nm-hf inspect / compress / decompress`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
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
    assert "state training" in capsys.readouterr().out


@pytest.mark.parametrize("drop_conv1d_list", [False, True])
def test_inspect_gpt2_groups_along_dim0(tmp_path, capsys, drop_conv1d_list):
    model = tiny_model("gpt2")
    finalize(sparsify(model, SparsityConfig()))
    record = model.config.nm_sparsity
    if drop_conv1d_list:  # an older record: the group dim comes from the model type (gpt2: Conv1D)
        record.pop("conv1d_modules", None)
    else:  # as nm_hf's save helpers record it
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
    assert main(["compress", str(tmp_path / "plain"), str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / WEIGHTS_NAME).exists()
    assert main(["inspect", str(tmp_path / "c")]) == 0
    assert "nm_hf compressed" in capsys.readouterr().out
    assert main(["compress", str(tmp_path / "plain"), str(tmp_path / "c")]) == 2  # exists
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["compress", "--overwrite", str(tmp_path / "plain"), str(tmp_path / "c")]) == 0
    assert main(["decompress", str(tmp_path / "c"), str(tmp_path / "d")]) == 0
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "d")
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    assert main(["decompress", str(tmp_path / "plain"), str(tmp_path / "e")]) == 2
    assert "is not compressed" in capsys.readouterr().err
    assert load_compressed(tmp_path / "c").config.nm_sparsity["n"] == 2


def test_compress_refuses_violations(tmp_path, capsys):
    model = tiny_model("llama")
    finalize(sparsify(model, SparsityConfig()))
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[5, 4:8] = 2.0
    model.save_pretrained(tmp_path / "plain")
    assert main(["compress", str(tmp_path / "plain"), str(tmp_path / "c")]) == 2
    assert "model.layers.0.mlp.gate_proj.weight: 1 of 512 groups" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


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

    from tiny_models import tiny_config

    model = GPT2DoubleHeadsModel(tiny_config("gpt2"))
    finalize(sparsify(model, SparsityConfig()))
    assert "multiple_choice_head.summary" in model.config.nm_sparsity["targeted_modules"]
    model.config.nm_sparsity.pop("conv1d_modules", None)
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "multiple_choice_head.summary" in capsys.readouterr().out
