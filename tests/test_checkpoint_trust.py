"""Checkpoint files are trusted only as far as they stay inside their directory; writes are all-or-nothing.

Regression tests for "Trust and first contact": symlinks and index entries pointing out of a
checkpoint, half-written upload folders, training state in uploads, Auto classes in
`load_compressed`, crafted compressed headers, local paths that look like Hub ids, repo ids without
a namespace, extra files that replace the model's own, self-deleting overwrites.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM, LlamaModel

import nm_hf
from nm_hf.cli import main as cli_main
from nm_hf.config import SparsityConfig
from nm_hf.hub import prepare_upload, push_to_hub
from nm_hf.injection import finalize, sparsify
from tiny_models import tiny_model

TOKEN = "hf_test_token"
WEIGHTS = "nm_compressed.safetensors"


def sparse_model(model_type: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0):
    model = tiny_model(model_type, seed=seed).to(dtype)
    return finalize(sparsify(model, SparsityConfig()))


def saved(path: Path, model_type: str = "llama", **save_kwargs) -> Path:
    sparse_model(model_type).save_pretrained(path, **save_kwargs)
    return path


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def hub():
    with HubServer(token=TOKEN) as server:
        yield server


# ----------------------------------------------------------------------------- files from outside the directory


def test_symlink_out_of_the_folder_is_refused(tmp_path, hub):
    secret = tmp_path / "elsewhere" / "secret"
    secret.parent.mkdir()
    secret.write_text("api key: do not publish")
    run = saved(tmp_path / "run")
    (run / "notes.txt").symlink_to(secret)
    with pytest.raises(nm_hf.CheckpointError, match=r"'notes\.txt' is a symlink to .*secret, outside the directory"):
        prepare_upload(run, tmp_path / "upload")
    assert not (tmp_path / "upload").exists()
    with pytest.raises(nm_hf.CheckpointError, match="notes.txt"):
        push_to_hub(run, "tester/leak", token=TOKEN, endpoint=hub.url)
    assert hub.requests == [] and "tester/leak" not in hub.repos  # refused before any request
    with pytest.raises(nm_hf.CheckpointError, match="notes.txt"):
        prepare_upload(run, tmp_path / "upload-c", compressed=True)
    assert listing(tmp_path) == ["elsewhere", "run"]


def test_symlink_inside_the_folder_uploads_its_content(tmp_path):
    run = saved(tmp_path / "run")
    (run / "real.txt").write_text("inside")
    (run / "alias.txt").symlink_to("real.txt")
    out = prepare_upload(run, tmp_path / "upload", model_card=False)
    assert (out / "alias.txt").read_text() == "inside" and not (out / "alias.txt").is_symlink()


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_entry_outside_the_folder_is_refused(tmp_path, where):
    run = saved(tmp_path / "run", max_shard_size="20KB")
    index_path = run / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    outside = tmp_path / "outside.safetensors"
    (run / shard).rename(outside)
    entry = "../outside.safetensors" if where == "parent" else str(outside)
    index["weight_map"] = {k: (entry if v == shard else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    for action in (lambda: prepare_upload(run, tmp_path / "upload"),
                   lambda: prepare_upload(run, tmp_path / "upload", compressed=True)):
        with pytest.raises(nm_hf.CheckpointError, match=f"{entry!r} is not a path inside the directory"):
            action()
    assert cli_main(["compress", str(run), str(tmp_path / "c")]) == 2
    assert cli_main(["inspect", str(run)]) == 2
    assert listing(tmp_path) == ["outside.safetensors", "run"]


def test_hugging_face_cache_snapshots_are_read(tmp_path):
    """A snapshot's files are symlinks into the repository's blobs/: that is inside the checkpoint."""
    plain = saved(tmp_path / "plain")
    repo = tmp_path / "hub" / "models--u--m"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, path in enumerate(sorted(plain.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    assert cli_main(["compress", str(snapshot), str(tmp_path / "c")]) == 0
    assert nm_hf.load_compressed(tmp_path / "c").config.nm_sparsity["n"] == 2


def test_hugging_face_cache_snapshot_subfolders_are_read(tmp_path):
    """`load_sparse(repo, subfolder="x")`: hf_hub_download links snapshots/<rev>/x/* to ../../../blobs/*."""
    assert cli_main(["compress", str(saved(tmp_path / "plain")), str(tmp_path / "packed")]) == 0
    repo = tmp_path / "hub" / "models--u--m"
    folder = repo / "snapshots" / "0123abcd" / "sparse24"
    folder.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, path in enumerate(sorted((tmp_path / "packed").iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(path.read_bytes())
        (folder / path.name).symlink_to(Path("..") / ".." / ".." / "blobs" / blob.name)
    assert nm_hf.load_sparse(folder).config.nm_sparsity["n"] == 2
    assert cli_main(["decompress", str(folder), str(tmp_path / "d")]) == 0


# ----------------------------------------------------------------------------- what an upload holds


def test_training_state_never_uploaded_and_tensorboard_runs_are(tmp_path, hub):
    run = saved(tmp_path / "run")
    training_state = ["training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scheduler.bin",
                      "scaler.pt", "rng_state.pth", "rng_state_1.pth", "random_states_0.pkl", "trainer_state.json",
                      "sparsity_tracker.pt", "pytorch_model_fsdp.bin"]
    for name in training_state:
        (run / name).write_bytes(b"training state")
    (run / "checkpoint-10").mkdir()
    (run / "checkpoint-10" / "model.safetensors").write_bytes(b"old")
    events = run / "runs" / "Jan01_00-00-00_host" / "events.out.tfevents.1.host"
    events.parent.mkdir(parents=True)
    events.write_bytes(b"tensorboard events")
    (run / "results.json").write_text(json.dumps({"eval_loss": 2.0}))
    for compressed in (False, True):
        push_to_hub(run, f"tester/run-{int(compressed)}", token=TOKEN, endpoint=hub.url, compressed=compressed)
        files = set(hub.repos[f"tester/run-{int(compressed)}"].files)
        assert not files & set(training_state), files & set(training_state)
        assert not [f for f in files if f.startswith("checkpoint-")]
        assert "runs/Jan01_00-00-00_host/events.out.tfevents.1.host" in files
        assert {"config.json", "README.md", "results.json"} <= files


def test_extra_file_may_not_replace_a_file_of_the_model(tmp_path):
    model = sparse_model()
    other = tmp_path / "mine" / "config.json"
    other.parent.mkdir()
    other.write_text("{}")
    with pytest.raises(nm_hf.CheckpointError, match=r"'config\.json' is already in the upload"):
        prepare_upload(model, tmp_path / "upload", extra_files=[other])
    readme = tmp_path / "mine" / "README.md"
    readme.write_text("my card")
    with pytest.raises(nm_hf.CheckpointError, match="model_card=False"):
        prepare_upload(model, tmp_path / "upload", extra_files=[readme])
    assert listing(tmp_path) == ["mine"]
    out = prepare_upload(model, tmp_path / "upload", extra_files=[readme], model_card=False)
    assert (out / "README.md").read_text() == "my card"


def test_prepare_upload_never_leaves_a_half_written_folder(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, directory):
            Path(directory, "tokenizer.json").write_text("{")  # half written, then the failure
            raise OSError("disk full while saving the tokenizer")

    model = sparse_model()
    out = tmp_path / "upload"
    out.mkdir()  # an existing empty folder
    for compressed in (False, True):
        with pytest.raises(OSError, match="disk full"):
            prepare_upload(model, out, tokenizer=BrokenTokenizer(), compressed=compressed)
        assert listing(out) == [] and listing(tmp_path) == ["upload"]
    prepare_upload(model, out, model_card=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        prepare_upload(model, out)
    with pytest.raises(OSError, match="disk full"):
        prepare_upload(model, out, tokenizer=BrokenTokenizer(), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and listing(tmp_path) == ["upload"]


# ----------------------------------------------------------------------------- Hub ids and local paths


@pytest.mark.parametrize("repo_id", ["bare-name", "a/b/c", "/name", "tester/"])
def test_repo_id_without_namespace_is_refused_before_any_request(hub, repo_id):
    with pytest.raises(ValueError, match="must be 'namespace/name'"):
        push_to_hub(sparse_model(), repo_id, token=TOKEN, endpoint=hub.url)
    assert hub.requests == [] and hub.repos == {}


def test_load_sparse_of_a_missing_local_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in (tmp_path / "nope", "./nope", str(tmp_path / "runs" / "x"), "runs/a/b"):
        with pytest.raises(nm_hf.CheckpointError, match="no such directory"):
            nm_hf.load_sparse(missing)
    (tmp_path / "file").write_text("x")
    with pytest.raises(nm_hf.CheckpointError, match="not a directory"):
        nm_hf.load_sparse("file")


def test_load_sparse_of_a_missing_name_that_could_be_a_hub_id(tmp_path, monkeypatch):
    """'runs/x' (one slash) and 'x' are valid Hub ids; when neither a local directory nor the Hub has them, the
    error is a CheckpointError that says no local directory has that name either."""
    monkeypatch.chdir(tmp_path)
    for missing in ("runs/x", "x"):
        with pytest.raises(nm_hf.CheckpointError, match=f"^{missing}: no such local directory, and loading it as a "
                                                        "Hub repo id failed: ") as info:
            nm_hf.load_sparse(missing, local_files_only=True)  # no request leaves the machine
        assert isinstance(info.value.__cause__, OSError)


# ----------------------------------------------------------------------------- load_compressed classes


def test_load_compressed_with_auto_classes_and_unknown_architectures(tmp_path):
    model = sparse_model("llama", torch.float16)
    out = nm_hf.save_compressed(model, tmp_path / "c")
    expected = model.state_dict()
    auto = nm_hf.load_compressed(out, model_class=AutoModelForCausalLM)
    assert type(auto) is LlamaForCausalLM
    assert all(torch.equal(auto.state_dict()[k], v) for k, v in expected.items())

    config = json.loads((out / "config.json").read_text())
    config["architectures"] = ["SomethingTransformersDoesNotHave"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="lm_head.weight"):  # the base model has no head: left out, said so
        base = nm_hf.load_compressed(out)
    assert type(base) is LlamaModel
    assert all(torch.equal(base.state_dict()[k.removeprefix("model.")], v)
               for k, v in expected.items() if k != "lm_head.weight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sparse = nm_hf.load_sparse(out, model_class=AutoModelForCausalLM)
    assert type(sparse) is LlamaForCausalLM and nm_hf.is_sparsified(sparse)


# ----------------------------------------------------------------------------- crafted compressed headers


def _edit_header(path: Path, edit) -> None:
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = dict(handle.metadata())
    header = json.loads(metadata["nm_hf.header"])
    edit(header)
    metadata["nm_hf.header"] = json.dumps(header)
    save_file(tensors, str(path), metadata=metadata)


def _crafted(header):
    header["n"], header["m"], header["bits"] = 1, 1 << 20, 20


@pytest.mark.parametrize("edit,message", [
    (_crafted, "need 1 <= n <= m <= 64"),
    (lambda h: h["tensors"]["model.norm.weight"].__setitem__("shape", [1 << 40, 1 << 20]), "stored shape"),
    (lambda h: h["tensors"]["model.layers.0.mlp.up_proj.weight"].__setitem__("shape", [1 << 30, 64]),
     "kept values"),
    (lambda h: h["tensors"]["model.layers.0.mlp.up_proj.weight"].__setitem__("shape", [-64, -32]), "negative"),
    (lambda h: h["tensors"]["model.layers.0.mlp.up_proj.weight"].__setitem__("dtype", "int64"), "floating point"),
])
def test_crafted_header_is_refused_before_anything_is_allocated(tmp_path, monkeypatch, edit, message):
    out = nm_hf.save_compressed(sparse_model("llama", torch.float16), tmp_path / "c")
    _edit_header(out / WEIGHTS, edit)
    import nm_hf.checkpoint.compressed as compressed

    def never(*args, **kwargs):
        raise AssertionError("a tensor was rebuilt from a header that should have been refused")

    monkeypatch.setattr(compressed, "decompress_tensor", never)
    with pytest.raises(nm_hf.CheckpointError, match=message):
        nm_hf.load_compressed_state_dict(out)


# ----------------------------------------------------------------------------- overwrites


def test_save_compressed_onto_the_current_directory(tmp_path, monkeypatch):
    work = nm_hf.save_compressed(sparse_model(), tmp_path / "work")
    before = listing(work)
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="cannot replace the current directory"):
        nm_hf.save_compressed(sparse_model(seed=1), ".", overwrite=True)
    assert listing(tmp_path) == ["work"] and listing(work) == before  # no stray staging folder


def test_failed_rename_during_an_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    out = nm_hf.save_compressed(sparse_model(), tmp_path / "c")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = os.rename

    def rename(src, dst):
        if ".c.tmp-" in os.fspath(src) and Path(dst) == out:
            raise OSError("killed between the two renames")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="killed"):
        nm_hf.save_compressed(sparse_model(seed=1), out, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert listing(tmp_path) == ["c"]


def test_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        out = nm_hf.save_compressed(sparse_model(), tmp_path / "c")
        upload = prepare_upload(out, tmp_path / "u")
    finally:
        os.umask(previous)
    for directory in (out, upload):
        assert directory.stat().st_mode & 0o777 == 0o755
        for path in directory.iterdir():
            assert path.stat().st_mode & 0o777 == 0o644, path.name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_compiled_models_are_saved_and_uploaded_under_their_own_names(tmp_path):
    model = sparse_model()
    compiled = torch.compile(model)  # never run: only the wrapper matters
    out = prepare_upload(compiled, tmp_path / "u", compressed=True)
    record = json.loads((out / "config.json").read_text())["nm_sparsity"]
    assert record["targeted_modules"] == model.config.nm_sparsity["targeted_modules"]
    assert "_orig_mod" not in (out / "README.md").read_text()
    nm_hf.save_compressed(compiled, tmp_path / "c")
    assert all(torch.equal(nm_hf.load_compressed(tmp_path / "c").state_dict()[k], v)
               for k, v in model.state_dict().items())
