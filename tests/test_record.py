"""The nm_sparsity record: building, reading every version, checking."""

from __future__ import annotations

import pytest

import nm_hf
from nm_hf.record import (
    RecordError,
    build_record,
    config_from_record,
    is_compressed,
    read_record,
    record_group_dims,
    require_record,
    with_compressed_marker,
    without_compressed_marker,
)
from tiny_models import tiny_model


def test_record_of_a_sparsified_gpt2_has_group_dims(tiny_gpt2):
    nm_hf.sparsify(tiny_gpt2, nm_hf.SparsityConfig())
    record = read_record(tiny_gpt2)
    assert record["state"] == "training"
    assert set(record["group_dims"].values()) == {0}  # every GPT-2 projection is a Conv1D [in, out]
    assert record_group_dims(record) == record["group_dims"]
    assert config_from_record(record) == nm_hf.SparsityConfig()


def test_old_records_still_give_group_dims():
    targeted = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "score"]
    with_list = {"n": 2, "m": 4, "targeted_modules": targeted, "conv1d_modules": targeted[:2]}
    assert record_group_dims(with_list) == {targeted[0]: 0, targeted[1]: 0, "score": 1}
    oldest = {"n": 2, "m": 4, "targeted_modules": targeted}
    assert record_group_dims(oldest, {"model_type": "gpt2"}) == {targeted[0]: 0, targeted[1]: 0, "score": 1}
    assert set(record_group_dims(oldest, {"model_type": "llama"}).values()) == {1}


def test_require_record_names_the_source():
    model = tiny_model("llama")
    with pytest.raises(RecordError, match="somewhere/config.json: config has no 'nm_sparsity' record"):
        require_record(model, "somewhere/config.json")
    with pytest.raises(RecordError, match="has no 'targeted_modules'"):
        require_record({"nm_sparsity": {"n": 2, "m": 4}}, "x")
    with pytest.raises(RecordError, match="malformed"):
        require_record({"nm_sparsity": {"n": 5, "m": 4, "targeted_modules": []}}, "x")
    for n in (2.5, "2", True, None):  # a hand-edited record: refused, not truncated to 2 or read as 1
        with pytest.raises(RecordError, match=r"x: .*non-integer n or m"):
            require_record({"nm_sparsity": {"n": n, "m": 4, "targeted_modules": []}}, "x")
    for name in (1, None, ["a"], ""):  # a hand-edited name: refused here, not a TypeError/AttributeError later
        with pytest.raises(RecordError, match=r"x: .*targeted_modules holds .*not a layer name"):
            require_record({"nm_sparsity": {"n": 2, "m": 4, "targeted_modules": ["a.b", name]}}, "x")


def test_compressed_marker_round_trip():
    record = build_record(nm_hf.SparsityConfig(), ["a"], {"a": 1}, [], "finalized", sparsity=0.5)
    marked = with_compressed_marker(record, {"format": "nm-compressed", "version": 1})
    assert is_compressed(marked) and not is_compressed(record)
    assert without_compressed_marker(marked) == record
    with pytest.raises(ValueError, match="record state"):
        build_record(nm_hf.SparsityConfig(), ["a"], {"a": 1}, [], "done")
