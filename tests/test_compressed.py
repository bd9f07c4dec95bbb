"""The compressed N:M checkpoint format: codec, size, round trips, corruption, atomic writes."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import nm_hf.checkpoint.codec as codec
import nm_hf.checkpoint.compressed as compressed
from nm_hf.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    compress_checkpoint,
    decompress_checkpoint,
    inspect_checkpoint,
    load_compressed,
    load_compressed_state_dict,
    save_compressed,
)
from nm_hf.checkpoint.codec import (
    compress_tensor,
    decode_positions,
    decompress_tensor,
    encode_positions,
    pack_codes,
    position_bits,
    unpack_codes,
)
from nm_hf.checkpoint.compressed import POSITIONS_SUFFIX, VALUES_SUFFIX
from nm_hf.config import SparsityConfig
from nm_hf.injection import finalize, sparsify
from nm_hf.masks import nm_mask
from tiny_models import output_tensor, tiny_inputs, tiny_model

ARCHS = ["gpt2", "bart", "marian", "llama", "t5"]


def sparse_model(model_type: str, dtype: torch.dtype = torch.float32, n: int = 2, m: int = 4, **overrides):
    model = tiny_model(model_type, **overrides).to(dtype)
    sparsify(model, SparsityConfig(n=n, m=m))
    return finalize(model)


def nm_weight(shape, n, m, dim=-1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    return w * nm_mask(w, n, m, dim=dim)


def assert_same_bits_up_to_zero_sign(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-exact, except that -0.0 may come back as +0.0."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all()
    canon = [t.masked_fill(t == 0, 0.0).contiguous().view(torch.uint8) for t in (a, b)]
    assert torch.equal(canon[0], canon[1])


# ----------------------------------------------------------------------------- codec


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (4, 4), (2, 8), (4, 8), (5, 8), (3, 16)])
def test_codes_cover_every_choice_exactly_once(n, m):
    combos = list(itertools.combinations(range(m), n))
    keep = torch.zeros(len(combos), m, dtype=torch.bool)
    for row, pos in enumerate(combos):
        keep[row, list(pos)] = True
    codes = encode_positions(keep, n, m)
    assert sorted(codes.tolist()) == list(range(math.comb(m, n)))  # a bijection onto [0, C(m, n))
    bits = position_bits(n, m)
    assert 2 ** bits >= math.comb(m, n) and (bits == 0 or 2 ** (bits - 1) < math.comb(m, n))
    decoded = decode_positions(codes, n, m)
    assert decoded.tolist() == [list(p) for p in combos]
    # the lookup-table path (m <= 16) and the generic path agree on every choice
    if m <= codec._TABLE_MAX_M:
        codes_table, counts = codec._group_codes(keep.float(), n, m)
        assert torch.equal(codes_table, codes)
        assert counts.tolist() == [n] * len(combos)


def test_generic_path_for_large_m_round_trips():
    w = nm_weight((6, 64), 2, 32, dim=1, seed=3)
    values, packed, entry = compress_tensor(w, 2, 32, 1)
    assert position_bits(2, 32) == 9 and packed.numel() == math.ceil(6 * 2 * 9 / 8)
    assert torch.equal(decompress_tensor(values, packed, 2, 32, (6, 64), 1), w)


def test_bits_per_group():
    assert position_bits(2, 4) == 3  # C(4,2) = 6
    assert position_bits(1, 4) == 2
    assert position_bits(4, 8) == 7  # C(8,4) = 70
    assert position_bits(4, 4) == 0
    with pytest.raises(ValueError):
        position_bits(3, 2)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8, 9, 12, 16, 17])
@pytest.mark.parametrize("groups", [1, 7, 8, 13, 1000])
def test_pack_unpack(bits, groups):
    g = torch.Generator().manual_seed(bits * 1000 + groups)
    codes = torch.randint(0, 1 << bits, (groups,), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(groups * bits / 8)
    assert torch.equal(unpack_codes(packed, groups, bits), codes)
    # the bit stream is little-endian: group 0's lowest bit is bit 0 of byte 0
    bits_np = np.unpackbits(packed.numpy(), bitorder="little")
    assert int(sum(int(b) << i for i, b in enumerate(bits_np[:bits]))) == int(codes[0])


def test_chunking_gives_the_same_bytes(monkeypatch):
    w = nm_weight((40, 64), 2, 4, dim=1, dtype=torch.float16, seed=5)
    reference = compress_tensor(w, 2, 4, 1)
    monkeypatch.setattr(codec, "CHUNK_GROUPS", 8)  # many chunks, byte-aligned boundaries
    chunked = compress_tensor(w, 2, 4, 1)
    assert torch.equal(reference[0], chunked[0]) and torch.equal(reference[1], chunked[1])
    assert reference[2] == chunked[2]
    assert torch.equal(decompress_tensor(chunked[0], chunked[1], 2, 4, (40, 64), 1), w)


def test_unpack_rejects_bad_lengths_and_padding():
    packed = pack_codes(torch.tensor([1, 2, 3]), 3)  # 9 bits -> 2 bytes, 7 padding bits
    with pytest.raises(ValueError, match="expected 2 packed"):
        unpack_codes(packed[:1], 3, 3)
    dirty = packed.clone()
    dirty[-1] |= 0x80
    with pytest.raises(ValueError, match="padding"):
        unpack_codes(dirty, 3, 3)


# ----------------------------------------------------------------------------- tensors


@settings(max_examples=40, deadline=None)
@given(
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (4, 16)]),
    rows=st.integers(1, 5),
    groups=st.integers(1, 4),
    dim=st.sampled_from([0, 1]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    zero_frac=st.floats(0, 1),
    seed=st.integers(0, 10_000),
)
def test_round_trip_property(nm, rows, groups, dim, dtype, zero_frac, seed):
    n, m = nm
    shape = (groups * m, rows) if dim == 0 else (rows, groups * m)
    g = torch.Generator().manual_seed(seed)
    w = nm_weight(shape, n, m, dim=dim, dtype=dtype, seed=seed)
    w[torch.rand(shape, generator=g) < zero_frac] = 0  # kept weights that are exactly zero
    w[torch.rand(shape, generator=g) < 0.1] *= -0.0  # and some negative zeros
    values, packed, entry = compress_tensor(w, n, m, dim)
    assert values.numel() == w.numel() * n // m
    assert packed.numel() == math.ceil(w.numel() // m * position_bits(n, m) / 8)
    back = decompress_tensor(values, packed, n, m, shape, dim)
    assert_same_bits_up_to_zero_sign(back, w)
    assert entry["sha256"] == codec.tensor_sha256(back)


def test_special_values_survive_bit_exactly():
    w = torch.tensor([[float("nan"), 0.0, -0.0, float("inf")],
                      [0.0, -0.0, 0.0, 0.0],
                      [-0.0, 5e-45, 0.0, -float("inf")]], dtype=torch.float32)
    values, packed, _ = compress_tensor(w, 2, 4, 1)
    back = decompress_tensor(values, packed, 2, 4, (3, 4), 1)
    assert torch.isnan(back[0, 0]) and back[0, 3] == float("inf") and back[2, 3] == -float("inf")
    assert back[2, 1].item() == w[2, 1].item() != 0  # a denormal is a kept value like any other
    assert_same_bits_up_to_zero_sign(back, w)
    # a group with fewer than n non-zeros keeps its lowest-index zeros: row 1 keeps positions 0, 1,
    # and the stored -0.0 at position 1 is returned with its sign
    assert torch.equal(values.view(3, 2)[1].view(torch.int32), torch.tensor([0.0, -0.0]).view(torch.int32))
    assert torch.signbit(back[1, 1]) and not torch.signbit(back[1, 2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_float_dtype_round_trips_its_bits(dtype):
    """Values move as raw bits: bfloat16's CPU gather rewrote a NaN payload (0x7fc0 -> 0xffff) and
    float8 had no gather/scatter at all (NotImplementedError instead of a compressed file)."""
    w = torch.tensor([[1.0, 0.0, -2.0, 0.0], [0.0, 0.5, 0.0, -0.0]]).to(dtype)
    bits_dtype = torch.uint8 if w.element_size() == 1 else torch.int16
    bits = w.view(bits_dtype)
    bits[0, 0] = 0x7F if w.element_size() == 1 else 0x7FC0  # a NaN (e4m3fn, e5m2, bf16, fp16 payloads)
    values, packed, entry = compress_tensor(w, 2, 4, 1)
    back = decompress_tensor(values, packed, 2, 4, (2, 4), 1)
    assert back.dtype == dtype
    assert torch.equal(back.view(bits_dtype), torch.where(w != 0, bits, 0).to(bits_dtype))  # pruned -0.0 -> +0.0
    assert entry["sha256"] == codec.tensor_sha256(back)


def test_violating_tensor_is_refused_with_counts():
    w = nm_weight((4, 16), 2, 4, dim=1)
    w[1, 0:4] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    w[3, 4:8] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=r"layer\.weight: 2 of 16 groups of 4 have more than 2 .*up to 4"):
        compress_tensor(w, 2, 4, 1, name="layer.weight")


def test_group_dim_must_divide():
    with pytest.raises(ValueError, match="not divisible by m=4"):
        compress_tensor(torch.zeros(6, 6), 2, 4, 1)


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("model_type", ARCHS)
def test_model_round_trip(tmp_path, model_type):
    model = sparse_model(model_type, torch.float16)
    out = save_compressed(model, tmp_path / "c")
    files = sorted(p.name for p in out.iterdir())
    assert WEIGHTS_NAME in files and "config.json" in files and "model.safetensors" not in files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    if model.can_generate():
        assert "generation_config.json" in files
    config = json.loads((out / "config.json").read_text())
    assert config["nm_sparsity"]["compressed"]["format"] == "nm-compressed"
    assert config["nm_sparsity"]["targeted_modules"] == model.config.nm_sparsity["targeted_modules"]

    loaded = load_compressed(out)
    # the reference is what plain transformers reloads from save_pretrained (it may keep some
    # modules in fp32, e.g. T5's `wo`, and recomputes non-persistent buffers)
    model.save_pretrained(tmp_path / "plain")
    plain = type(model).from_pretrained(tmp_path / "plain")
    assert type(loaded) is type(model) and loaded.dtype == plain.dtype == torch.float16
    assert "compressed" not in loaded.config.nm_sparsity
    reference, back, original = plain.state_dict(), loaded.state_dict(), model.state_dict()
    assert reference.keys() == back.keys() == original.keys()
    for key in reference:
        assert_same_bits_up_to_zero_sign(back[key], reference[key])
        assert torch.equal(back[key].to(original[key].dtype), original[key])
    inputs = tiny_inputs(model)
    with torch.no_grad():
        assert torch.equal(output_tensor(plain.float()(**inputs)), output_tensor(loaded.float()(**inputs)))
    if model.can_generate():
        assert loaded.generation_config.to_dict() == plain.generation_config.to_dict()


def test_gpt2_conv1d_groups_run_along_dim0(tmp_path):
    model = sparse_model("gpt2", torch.float16)
    save_compressed(model, tmp_path / "c")
    with safe_open(str(tmp_path / "c" / WEIGHTS_NAME), "pt") as handle:
        header = json.loads(handle.metadata()["nm_hf.header"])
    entry = header["tensors"]["transformer.h.0.attn.c_attn.weight"]
    assert entry["group_dim"] == 0 and entry["shape"] == [32, 96]
    assert header["tensors"]["transformer.h.0.attn.c_attn.bias"]["format"] == "dense"


def _targeted_bytes(model) -> int:
    modules = dict(model.named_modules())
    return sum(modules[name].weight.numel() * modules[name].weight.element_size()
               for name in model.config.nm_sparsity["targeted_modules"])


def test_size_ratio_2_4_fp16(tmp_path):
    model = sparse_model("llama", torch.float16, hidden_size=64, intermediate_size=256)
    out = save_compressed(model, tmp_path / "c")
    dense_bytes = _targeted_bytes(model)
    stored = compressed.stored_nm_bytes(out)
    ratio = stored / dense_bytes
    print(f"\n2:4 fp16 targeted weights: {stored:,} compressed bytes / {dense_bytes:,} dense bytes = {ratio:.4f}")
    assert ratio <= 0.57
    assert ratio == pytest.approx(35 / 64, abs=1e-3)  # 2 fp16 values + 3 position bits per 4 weights
    # the whole file too, against the plain checkpoint
    model.save_pretrained(tmp_path / "dense")
    file_ratio = (out / WEIGHTS_NAME).stat().st_size / (tmp_path / "dense" / "model.safetensors").stat().st_size
    print(f"whole file (embeddings and norms stay dense): {file_ratio:.4f}")
    assert file_ratio < 1


def test_checkpoint_level_compress_decompress(tmp_path):
    model = sparse_model("llama", torch.bfloat16)
    model.save_pretrained(tmp_path / "plain")
    compress_checkpoint(tmp_path / "plain", tmp_path / "c")
    save_compressed(model, tmp_path / "c2")
    files = [tmp_path / "c" / WEIGHTS_NAME, tmp_path / "c2" / WEIGHTS_NAME]
    headers, contents = [], []
    for path in files:
        with safe_open(str(path), "pt") as handle:
            headers.append(json.loads(handle.metadata()["nm_hf.header"]))
            contents.append({k: handle.get_tensor(k) for k in handle.keys()})
    assert headers[0] == headers[1]
    assert contents[0].keys() == contents[1].keys()
    assert all(torch.equal(contents[0][k].view(torch.uint8), contents[1][k].view(torch.uint8))
               for k in contents[0] if contents[0][k].numel())
    decompress_checkpoint(tmp_path / "c", tmp_path / "d")
    assert "compressed" not in json.loads((tmp_path / "d" / "config.json").read_text())["nm_sparsity"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d")  # a normal transformers checkpoint
    for key, value in model.state_dict().items():
        assert_same_bits_up_to_zero_sign(plain.state_dict()[key], value)
    report, _ = inspect_checkpoint(tmp_path / "c")
    assert report.nm_ok and report.sparsity == pytest.approx(0.5)


def test_refuses_live_dense_method_and_plain_models(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(CheckpointError, match="no 'nm_sparsity' record"):
        save_compressed(model, tmp_path / "a")
    sparsify(model, SparsityConfig())
    with pytest.raises(CheckpointError, match="finalize"):
        save_compressed(model, tmp_path / "b")
    dense = tiny_model("llama")
    finalize(sparsify(dense, SparsityConfig(method="dense")))
    with pytest.raises(CheckpointError, match="method='dense'"):
        save_compressed(dense, tmp_path / "c")
    assert not list(tmp_path.iterdir())


def test_violating_checkpoint_names_layer(tmp_path):
    model = sparse_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, :4] = 1.0
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: 1 of 512 groups"):
        compress_checkpoint(tmp_path / "plain", tmp_path / "c")
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- corruption


@pytest.fixture
def saved(tmp_path):
    model = sparse_model("llama", torch.float16)
    return model, save_compressed(model, tmp_path / "c")


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _rewrite(path: Path, edit_tensors=None, edit_header=None) -> None:
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = dict(handle.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        header = json.loads(metadata["nm_hf.header"])
        edit_header(header)
        metadata["nm_hf.header"] = json.dumps(header)
    save_file(tensors, str(path), metadata=metadata)


def test_flipped_value_byte_is_detected(saved):
    _, out = saved
    path = out / WEIGHTS_NAME
    with safe_open(str(path), "pt") as handle:
        key = next(k for k in handle.keys() if k.endswith(VALUES_SUFFIX))

    def flip(tensors):
        tensors[key].view(torch.uint8)[5] ^= 0x40
    _rewrite(path, edit_tensors=flip)
    with pytest.raises(CheckpointError, match=f"checksum mismatch for tensor '{key.removesuffix(VALUES_SUFFIX)}'"):
        load_compressed(out)


@pytest.mark.parametrize("offset_from_end", [1, 7, 100, 1000])
def test_flipped_data_bytes_never_load_silently(saved, offset_from_end):
    _, out = saved
    path = out / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    assert len(data) - offset_from_end >= _data_start(path)
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_compressed_state_dict(out)


def test_flipped_position_bits(saved):
    _, out = saved
    path = out / WEIGHTS_NAME

    def flip(tensors):
        key = next(k for k in tensors if k.endswith(POSITIONS_SUFFIX))
        tensors[key][3] ^= 0b00100100
    _rewrite(path, edit_tensors=flip)
    with pytest.raises(CheckpointError, match="corrupted"):
        load_compressed(out)


def test_truncated_file(saved):
    _, out = saved
    path = out / WEIGHTS_NAME
    data = path.read_bytes()
    for cut in (len(data) - 10, _data_start(path) + 3, 40, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cannot read the safetensors file.*truncated or corrupted"):
            load_compressed(out)


def test_garbled_safetensors_header(saved):
    _, out = saved
    path = out / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[9] = ord("!")  # inside the JSON header of the safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_compressed(out)


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["tensors"]["model.layers.0.mlp.up_proj.weight"].__setitem__("shape", [64, 64]),
     "expected 2048 kept values"),
    (lambda h: h["tensors"]["model.layers.0.mlp.up_proj.weight"].__setitem__("group_dim", 0),
     "checksum mismatch"),
    (lambda h: h["tensors"]["model.norm.weight"].__setitem__("shape", [16]), "header says"),
    (lambda h: h["tensors"]["model.norm.weight"].__setitem__("dtype", "float32"), "header says"),
    (lambda h: h.__setitem__("bits", 4), "inconsistent header"),
    (lambda h: h.__setitem__("m", 8), "inconsistent header"),
    (lambda h: h["tensors"].pop("model.norm.weight"), "do not match the header"),
    (lambda h: h.pop("tensors"), "malformed"),
])
def test_edited_header(saved, edit, message):
    _, out = saved
    _rewrite(out / WEIGHTS_NAME, edit_header=edit)
    with pytest.raises(CheckpointError, match=message):
        load_compressed(out)


def test_not_a_compressed_file(saved, tmp_path):
    model, out = saved
    save_file({"x": torch.zeros(2)}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not an nm_hf compressed checkpoint"):
        load_compressed(out)
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="is not compressed"):
        load_compressed(tmp_path / "plain")


def test_config_that_does_not_match_the_weights(saved):
    _, out = saved
    config = json.loads((out / "config.json").read_text())
    config["intermediate_size"] = 128
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not (fit|match) LlamaForCausalLM"):
        load_compressed(out)


def test_config_pattern_must_match_the_file(saved):
    _, out = saved
    config = json.loads((out / "config.json").read_text())
    config["nm_sparsity"]["n"] = 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weights are 2:4 but config.json says 1:4"):
        load_compressed(out)
    # decompressing it would write a dense checkpoint whose record lies about its pattern
    with pytest.raises(CheckpointError, match="weights are 2:4 but config.json says 1:4"):
        decompress_checkpoint(out, out.parent / "dense")
    assert not (out.parent / "dense").exists()


def test_record_targeting_a_weight_stored_dense_is_not_called_nm(saved):
    # a hand-edited record adds a layer the file stores dense: inspect said "holds in all targeted layers"
    _, out = saved
    config = json.loads((out / "config.json").read_text())
    record = config["nm_sparsity"]
    record["targeted_modules"].append("lm_head")
    record["group_dims"]["lm_head"] = 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="the record targets 'lm_head.weight' but the compressed file stores "
                                              "it dense"):
        inspect_checkpoint(out)


def test_record_targeting_a_weight_absent_from_the_file_is_refused(saved):
    # a hand-edited record names a layer the model does not have: inspect and decompress passed it
    _, out = saved
    config = json.loads((out / "config.json").read_text())
    config["nm_sparsity"]["targeted_modules"].append("model.layers.9.mlp.up_proj")
    (out / "config.json").write_text(json.dumps(config))
    message = "the record targets 'model.layers.9.mlp.up_proj.weight' but the compressed file has no such weight"
    with pytest.raises(CheckpointError, match=message):
        inspect_checkpoint(out)
    with pytest.raises(CheckpointError, match=message):
        decompress_checkpoint(out, out.parent / "dense")
    assert not (out.parent / "dense").exists()
    with pytest.raises(CheckpointError, match=message):
        load_compressed(out)


def test_missing_files(tmp_path, saved):
    _, out = saved
    with pytest.raises(CheckpointError, match="no such directory"):
        load_compressed(tmp_path / "nope")
    (out / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="no such file"):
        load_compressed(out)


def test_shard_that_lost_a_tensor_is_not_compressed(tmp_path):
    # a sharded checkpoint whose index lists a tensor no shard holds: compressing it would write a checkpoint
    # without that tensor (which load_compressed then refuses); refused up front, nothing written
    sparse_model("llama").save_pretrained(tmp_path / "plain", max_shard_size="20KB")
    index = json.loads((tmp_path / "plain" / "model.safetensors.index.json").read_text())
    shard = tmp_path / "plain" / index["weight_map"]["model.norm.weight"]
    with safe_open(str(shard), "pt") as handle:
        kept = {k: handle.get_tensor(k) for k in handle.keys() if k != "model.norm.weight"}
    save_file(kept, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"index.json: tensor 'model.norm.weight' is listed in "
                                              r"model-\d+-of-\d+.safetensors but no weight file holds it"):
        compress_checkpoint(tmp_path / "plain", tmp_path / "c")
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- atomic writes


def _visible(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = sparse_model("llama", torch.float16)

    def broken_writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")  # a partial write, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(compressed, "save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, tmp_path / "c")
    assert _visible(tmp_path) == []  # neither the target nor the staging directory


def test_failure_after_the_weights_leaves_nothing(tmp_path, monkeypatch):
    model = sparse_model("gpt2", torch.float16)

    def broken_copy(src, dst, skip=()):
        raise RuntimeError("killed while copying the tokenizer")

    monkeypatch.setattr(compressed, "copy_extra_files", broken_copy)
    with pytest.raises(RuntimeError, match="killed"):
        save_compressed(model, tmp_path / "c")
    assert _visible(tmp_path) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = sparse_model("llama", torch.float16)
    out = save_compressed(model, tmp_path / "c")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="not empty"):
        save_compressed(model, out)
    monkeypatch.setattr(compressed, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        save_compressed(model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _visible(tmp_path) == ["c"]
    monkeypatch.undo()
    other = sparse_model("llama", torch.float16, seed=1)
    save_compressed(other, out, overwrite=True)
    assert _visible(tmp_path) == ["c"]
    for key, value in load_compressed_state_dict(out).items():
        assert_same_bits_up_to_zero_sign(value, other.state_dict()[key])


def test_permissions_follow_umask(tmp_path):
    model = sparse_model("llama", torch.float16)
    out = save_compressed(model, tmp_path / "c")
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~mask)


# ----------------------------------------------------------------------------- records of every version


@pytest.mark.parametrize("record_form", ["group_dims", "conv1d_modules", "model_type"])
def test_older_records_still_compress_and_load(tmp_path, record_form):
    """Records before `group_dims` (a `conv1d_modules` list, or nothing: read by model type) still work."""
    model = sparse_model("gpt2", torch.float16)
    model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    record = config["nm_sparsity"]
    if record_form != "group_dims":
        record.pop("group_dims")
    if record_form == "conv1d_modules":
        record["conv1d_modules"] = list(record["targeted_modules"])
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    out = compress_checkpoint(tmp_path / "plain", tmp_path / "c")
    saved = json.loads((out / "config.json").read_text())["nm_sparsity"]
    assert saved["group_dims"] == dict.fromkeys(record["targeted_modules"], 0)
    with safe_open(str(out / WEIGHTS_NAME), "pt") as handle:
        header = json.loads(handle.metadata()["nm_hf.header"])
    assert {header["tensors"][f"{name}.weight"]["group_dim"] for name in record["targeted_modules"]} == {0}
    # a compressed directory with an old record loads too: the header holds each tensor's group dim
    saved.pop("group_dims")
    compressed_config = json.loads((out / "config.json").read_text())
    compressed_config["nm_sparsity"] = saved
    (out / "config.json").write_text(json.dumps(compressed_config))
    loaded = load_compressed(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_progress_bars_count_tensors(saved, monkeypatch):
    """On a terminal the bar counts tensors; in a log (not a TTY) there is none (its redraws garble the lines)."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    _, out = saved
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        load_compressed_state_dict(out)
        err = stream.getvalue()
        assert ("0tensor" not in err and " tensors" in err) if drawn else err == ""


def test_groups_larger_than_64_are_not_stored():
    with pytest.raises(ValueError, match="at most m=64"):
        compress_tensor(torch.zeros(2, 128), 1, 128, 1)
