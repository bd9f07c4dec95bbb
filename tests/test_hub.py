"""Saving, `load_sparse`, model cards and pushing to a loopback Hub over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import HubServer
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file
from transformers import AutoModel, LlamaModel, PreTrainedTokenizerFast
from transformers.pipelines import SUPPORTED_TASKS

from nm_hf.card import card_metrics, write_model_card
from nm_hf.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    load_compressed,
    load_sparse,
    restore_sparsity,
    save_compressed,
)
from nm_hf.cli import main
from nm_hf.config import SparsityConfig
from nm_hf.hub import prepare_upload, push_to_hub
from nm_hf.injection import finalize, iter_sparse_layers, sparsify
from nm_hf.masks import nm_group_counts
from tiny_models import ARCHITECTURES, output_tensor, tiny_inputs, tiny_model

ARCHS = ["gpt2", "bart", "marian", "llama"]
TOKEN = "hf_test_token"


def sparse_model(model_type: str, dtype: torch.dtype = torch.float32, **config):
    model = tiny_model(model_type).to(dtype)
    sparsify(model, SparsityConfig(**config))
    return finalize(model).eval()


def assert_masks_keep_exactly_the_nonzeros(model, n=2, m=4):
    layers = list(iter_sparse_layers(model))
    assert layers
    for name, layer in layers:
        weight = layer.weight.detach()
        mask = layer.current_mask()
        assert not ((weight != 0) & ~mask).any(), name  # every non-zero is kept
        dim = layer.group_dim
        assert (nm_group_counts(mask.to(weight.dtype), m, dim) == n).all(), name  # exactly n per group
        # where a group has n non-zeros the mask is exactly the non-zeros
        full = nm_group_counts(weight, m, dim) == n
        groups_mask = mask.movedim(dim, -1).reshape(-1, m)
        groups_w = weight.movedim(dim, -1).reshape(-1, m)
        assert torch.equal(groups_mask[full], groups_w[full] != 0), name


# ----------------------------------------------------------------------------- saving / load_sparse


@pytest.mark.parametrize("model_type", ARCHS)
def test_vanilla_reload_and_load_sparse(tmp_path, model_type):
    model = sparse_model(model_type)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["nm_sparsity"]
    assert (config["n"], config["m"], config["method"], config["state"]) == (2, 4, "sr-ste", "finalized")
    assert config["targeted_modules"] == model.config.nm_sparsity["targeted_modules"]
    assert config["sparsity"] == pytest.approx(0.5)

    auto_class = ARCHITECTURES[model_type]
    plain = auto_class.from_pretrained(tmp_path).eval()  # plain transformers, no nm_hf involved
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    inputs = tiny_inputs(model)

    sparse = load_sparse(tmp_path)  # class from config.json's architectures
    assert type(sparse) is type(model)
    assert [n for n, _ in iter_sparse_layers(sparse)] == config["targeted_modules"]
    assert sparse.config.nm_sparsity["state"] == "training"
    assert sparse.config.nm_sparsity["target_modules"] == "all-linear"
    assert_masks_keep_exactly_the_nonzeros(sparse)
    with torch.no_grad():
        assert torch.equal(output_tensor(sparse(**inputs)), output_tensor(plain(**inputs)))

    # ready for more SR-STE training: a step keeps the layers sparse and the pattern valid
    sparse.train()
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1)
    out = sparse(**inputs, labels=inputs.get("decoder_input_ids", inputs["input_ids"]))
    out.loss.backward()
    optimizer.step()
    for name, layer in iter_sparse_layers(sparse):
        assert (nm_group_counts(layer.effective_weight(), 4, layer.group_dim) <= 2).all(), name


def test_saved_record_has_group_dims_and_ignored_layers(tmp_path):
    gpt2 = sparse_model("gpt2")
    prepare_upload(gpt2, tmp_path / "gpt2", model_card=False)
    record = json.loads((tmp_path / "gpt2" / "config.json").read_text())["nm_sparsity"]
    assert record["group_dims"] == dict.fromkeys(record["targeted_modules"], 0)  # every projection is a Conv1D
    assert record["ignored_modules"] == ["lm_head"]
    llama = sparse_model("llama", target_modules=["q_proj", "v_proj"])
    prepare_upload(llama, tmp_path / "llama", compressed=True, model_card=False)
    record = json.loads((tmp_path / "llama" / "config.json").read_text())["nm_sparsity"]
    assert set(record["group_dims"].values()) == {1}
    assert "model.layers.0.self_attn.k_proj" in record["ignored_modules"]
    assert "model.layers.0.self_attn.q_proj" not in record["ignored_modules"]


def test_load_sparse_with_other_model_class(tmp_path):
    model = sparse_model("llama")
    model.save_pretrained(tmp_path)
    base = load_sparse(tmp_path, model_class=AutoModel)  # names lose the "model." prefix
    assert type(base) is LlamaModel
    assert [n for n, _ in iter_sparse_layers(base)] == [
        n.removeprefix("model.") for n in model.config.nm_sparsity["targeted_modules"]]
    assert_masks_keep_exactly_the_nonzeros(base)


def test_load_sparse_ties_when_a_kept_weight_is_zero(tmp_path):
    model = sparse_model("llama")
    weight = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        group = weight[3, 8:12]
        kept = (group != 0).nonzero().flatten()
        group[kept[1]] = 0.0  # this group now has one non-zero: its lowest-index zero joins the mask
    model.save_pretrained(tmp_path)
    sparse = load_sparse(tmp_path)
    layer = sparse.model.layers[0].mlp.up_proj
    assert_masks_keep_exactly_the_nonzeros(sparse)
    mask = layer.current_mask()[3, 8:12]
    nonzero = layer.weight[3, 8:12] != 0
    assert int(nonzero.sum()) == 1 and int(mask.sum()) == 2
    first_zero = int((~nonzero).nonzero()[0])
    assert mask[first_zero] and mask[nonzero].all()


@pytest.mark.parametrize("method, config", [
    ("fixed", {}), ("sr-ste", {"decay": 2e-4}), ("sr-ste", {"mask_update_interval": 3}), ("s-ste", {}), ("step", {}),
    ("decaying-mask", {"method_args": {"decay_steps": 4}}),
])
def test_load_sparse_computes_what_was_saved_with_the_method_state_afresh(tmp_path, method, config):
    """A trained model, saved finalized and reloaded: the same outputs in eval and in training mode (S-STE's
    saved weights carry its old scale, so the reloaded scale is 1), and the state of a new run (step 0, STEP
    dense), as load_sparse's docstring says."""
    import nm_hf

    model = tiny_model("llama")
    sparsify(model, SparsityConfig(method=method, **config))
    optimizer = nm_hf.create_sparse_optimizer(model, lr=0.02, total_steps=10)
    inputs = tiny_inputs(model)
    for _ in range(7):  # STEP switches by step 5, the decaying mask is exact N:M from step 4
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        nm_hf.after_optimizer_step(model, 0.02)
    with torch.no_grad():
        before = {mode: output_tensor(model.train(mode)(**inputs)) for mode in (False, True)}
    states = [dict(layer.nm_method_state) for _, layer in iter_sparse_layers(model)]
    finalize(model).save_pretrained(tmp_path)
    reloaded = load_sparse(tmp_path)
    with torch.no_grad():
        for mode in (False, True):
            assert torch.equal(output_tensor(reloaded.train(mode)(**inputs)), before[mode]), mode
    assert {layer.nm_step for _, layer in iter_sparse_layers(reloaded)} == {0}
    fresh = {"s-ste": {"scale": 1.0}, "step": {"switch_step": None}}.get(method, {})
    assert all(layer.nm_method_state == fresh for _, layer in iter_sparse_layers(reloaded))
    if fresh:
        assert all(state != fresh for state in states)  # the trained model's state was not the fresh one


def test_load_sparse_compressed_dir(tmp_path):
    model = sparse_model("marian", torch.float16)
    save_compressed(model, tmp_path / "c")
    sparse = load_sparse(tmp_path / "c")
    assert len(list(iter_sparse_layers(sparse))) == len(model.config.nm_sparsity["targeted_modules"])
    assert "compressed" not in sparse.config.nm_sparsity
    assert_masks_keep_exactly_the_nonzeros(sparse)


def test_load_sparse_errors(tmp_path):
    plain = tiny_model("llama")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no 'nm_sparsity' record"):
        load_sparse(tmp_path / "plain")

    model = sparse_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:3, :4] = 1.0  # 3 groups with 4 non-zeros
        model.model.layers[0].mlp.down_proj.weight[0, :4] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    model.save_pretrained(tmp_path / "broken")
    with pytest.raises(CheckpointError) as err:
        load_sparse(tmp_path / "broken")
    message = str(err.value)
    assert "'model.layers.1.self_attn.o_proj': 3 of 256 groups of 4 have more than 2" in message
    assert "'model.layers.0.mlp.down_proj': 1 of 512 groups" in message
    assert "nothing was patched" in message

    training = tiny_model("llama")
    sparsify(training, SparsityConfig())
    training.save_pretrained(tmp_path / "training")  # dense weights, record state "training"
    with pytest.raises(CheckpointError, match="state='training'"):
        load_sparse(tmp_path / "training")


def test_restore_sparsity_refuses_before_patching():
    model = sparse_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, :4] = 1.0
    with pytest.raises(CheckpointError, match="up_proj"):
        restore_sparsity(model)
    assert not list(iter_sparse_layers(model))  # nothing was patched


# ----------------------------------------------------------------------------- model card


def test_card_metrics_prefixes():
    metrics = card_metrics({"test_bleu": 31.5, "eval_loss": 1.25, "chrf": 55.0, "sparsity": 0.5,
                            "flag": True, "test_perplexity": 3.4})
    assert ("bleu", "BLEU", "test", 31.5) in metrics
    assert ("loss", "Loss", "validation", 1.25) in metrics
    assert ("chrf", "chrF", None, 55.0) in metrics
    assert ("perplexity", "Perplexity", "test", 3.4) in metrics
    assert len(metrics) == 4


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


def test_write_model_card_from_files(tmp_path):
    model = sparse_model("marian")
    model.save_pretrained(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"test_bleu": 27.25, "test_chrf": 51.5, "sparsity": 0.5,
                                                       "sad_from_init": 1234}))
    (tmp_path / "sparsity_history.json").write_text(json.dumps(
        {"format": 1, "records": [{"step": 10, "sad": 40, "sparsity": 0.5, "layers": {}},
                                  {"step": 20, "sad": 12, "sparsity": 0.5, "layers": {}}]}))
    (tmp_path / "sparsity.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    card = write_model_card(tmp_path, dataset_name="ding", command="accelerate launch recipes/translation.py x.yaml")
    text = (tmp_path / "README.md").read_text()
    assert text == str(card)
    meta = _front_matter(text)
    assert meta["library_name"] == "transformers"
    assert {"nm-sparsity", "2:4", "sr-ste", "nm_hf"} <= set(meta["tags"])
    assert meta["datasets"] == ["ding"]
    # transformers 5.23 has no translation pipeline: no pipeline_tag (a widget that cannot run)
    assert meta.get("pipeline_tag") == ("translation" if "translation" in SUPPORTED_TASKS else None)
    results = meta["model-index"][0]["results"]
    values = {metric["type"]: metric["value"] for r in results for metric in r["metrics"]}
    assert values == {"bleu": 27.25, "chrf": 51.5}
    assert all(r["dataset"]["split"] == "test" and r["task"]["type"] == "translation" for r in results)
    assert "| model.encoder.layers.0.self_attn.k_proj | 32x32 | 2:4 | 50.00% | yes |" in text
    assert "![Sparse architecture divergence and sparsity during training](sparsity.png)" in text
    assert "2 records" in text and "sad=12" in text
    assert "AutoModelForSeq2SeqLM.from_pretrained" in text and "nm_hf.load_sparse" in text
    assert "model.generate(" in text
    assert "accelerate launch recipes/translation.py x.yaml" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_model_card_lm_and_compressed(tmp_path):
    model = sparse_model("llama", torch.float16)
    save_compressed(model, tmp_path / "c")
    write_model_card(tmp_path / "c", results={"perplexity": 17.5, "eval_loss": 2.86}, base_model="some/base")
    text = (tmp_path / "c" / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["pipeline_tag"] == "text-generation" and meta["base_model"] == "some/base"
    values = {metric["type"]: metric["value"] for r in meta["model-index"][0]["results"] for metric in r["metrics"]}
    assert values == {"perplexity": 17.5, "loss": 2.86}
    assert "nm_hf compressed" in text and "nm_hf.load_sparse(" in text
    assert "AutoModelForCausalLM.from_pretrained" not in text  # plain transformers cannot read it
    assert "| model.layers.1.mlp.down_proj | 32x64 | 2:4 | 50.00% | yes |" in text


def test_write_model_card_needs_a_record(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no 'nm_sparsity' record"):
        write_model_card(tmp_path)
    assert not (tmp_path / "README.md").exists()


# ----------------------------------------------------------------------------- Hub push over HTTP


@pytest.fixture
def hub():
    with HubServer(token=TOKEN) as server:
        yield server


@pytest.fixture
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(96)}
    vocab.update({"<pad>": 0, "<unk>": 3})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def _received(hub: HubServer, repo_id: str, into: Path) -> Path:
    into.mkdir(parents=True)
    for path, data in hub.repos[repo_id].files.items():
        (into / path).write_bytes(data)
    return into


def test_push_model_over_http(tmp_path, hub, tokenizer):
    model = sparse_model("gpt2")
    info = push_to_hub(model, "tester/gpt2-24", tokenizer=tokenizer, token=TOKEN, endpoint=hub.url,
                       results={"perplexity": 42.0}, dataset_name="wikitext", command="python train.py")
    repo = hub.repos["tester/gpt2-24"]
    assert info.oid == repo.sha and repo.commits[0]["summary"] == "Upload 2:4 sparse model with nm_hf"
    assert {"config.json", "model.safetensors", "README.md", "results.json", "tokenizer.json",
            "generation_config.json"} <= set(repo.files)
    calls = [c for c in hub.requests if c[0] == "POST"]
    assert calls[0] == ("POST", "/api/repos/create")
    assert ("POST", "/api/models/tester/gpt2-24/commit/main") in calls
    assert json.loads(repo.files["results.json"]) == {"perplexity": 42.0}
    meta = _front_matter(repo.files["README.md"].decode())
    assert "2:4" in meta["tags"] and meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 42.0
    record = json.loads(repo.files["config.json"])["nm_sparsity"]
    assert record["ignored_modules"] == ["lm_head"]
    assert record["group_dims"] == dict.fromkeys(record["targeted_modules"], 0)

    local = _received(hub, "tester/gpt2-24", tmp_path / "received")
    plain = ARCHITECTURES["gpt2"].from_pretrained(local)  # what a user downloads loads in plain transformers
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    sparse = load_sparse(local)
    assert_masks_keep_exactly_the_nonzeros(sparse)
    assert PreTrainedTokenizerFast.from_pretrained(local)("w5 w7")["input_ids"] == [5, 7]


def test_push_compressed_dir_over_http(tmp_path, hub):
    model = sparse_model("llama", torch.float16)
    run = tmp_path / "run"
    model.save_pretrained(run)
    (run / "sparsity.png").write_bytes(b"\x89PNG\r\n\x1a\nplot")
    (run / "results.json").write_text(json.dumps({"eval_loss": 2.0}))
    (run / "optimizer.pt").write_bytes(b"not for the hub")
    (run / "checkpoint-10").mkdir()
    push_to_hub(run, "tester/llama-24c", token=TOKEN, endpoint=hub.url, compressed=True,
                commit_message="compressed upload", private=True)
    repo = hub.repos["tester/llama-24c"]
    assert repo.private and repo.commits[0]["summary"] == "compressed upload"
    assert set(repo.files) == {"config.json", WEIGHTS_NAME, "generation_config.json", "README.md",
                               "sparsity.png", "results.json"}
    assert repo.files["sparsity.png"] == b"\x89PNG\r\n\x1a\nplot"
    assert "![Sparse architecture divergence" in repo.files["README.md"].decode()
    loaded = load_compressed(_received(hub, "tester/llama-24c", tmp_path / "received"))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_push_needs_the_right_token_and_a_finalized_model(tmp_path, hub):
    model = sparse_model("llama")
    with pytest.raises(HfHubHTTPError, match="401"):
        push_to_hub(model, "tester/x", token="wrong", endpoint=hub.url)
    assert "tester/x" not in hub.repos
    assert not [path for _, path in hub.requests if "/commit/" in path or "/preupload/" in path]
    sent = len(hub.requests)
    live = tiny_model("llama")
    sparsify(live, SparsityConfig())
    with pytest.raises(CheckpointError, match="finalize"):
        push_to_hub(live, "tester/y", token=TOKEN, endpoint=hub.url)
    assert len(hub.requests) == sent  # refused before any request


def test_model_card_options_pass_through_and_a_misspelt_one_is_refused_before_any_work(tmp_path, hub):
    model = sparse_model("llama")
    folder = prepare_upload(model, tmp_path / "upload", base_model="some/base", dataset_name="wikitext",
                            task="text-generation", license="apache-2.0")
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "base_model: some/base" in card and "- wikitext" in card and "license: apache-2.0" in card
    with pytest.raises(TypeError, match="prepare_upload.*'datset_name'.*dataset_name"):
        prepare_upload(model, tmp_path / "typo", model_card=False, datset_name="wikitext")
    assert not (tmp_path / "typo").exists()
    sent = len(hub.requests)
    with pytest.raises(TypeError, match="push_to_hub.*'base'"):
        push_to_hub(model, "tester/typo", token=TOKEN, endpoint=hub.url, base="some/base")
    assert len(hub.requests) == sent


def test_prepare_upload_matches_the_pushed_files(tmp_path, hub):
    model = sparse_model("bart")
    folder = prepare_upload(model, tmp_path / "upload", compressed=True)
    push_to_hub(model, "tester/bart", token=TOKEN, endpoint=hub.url, compressed=True)
    pushed = hub.repos["tester/bart"].files
    assert set(pushed) == {p.name for p in folder.iterdir()}
    assert pushed["config.json"] == (folder / "config.json").read_bytes()
    received = load_file(str(_received(hub, "tester/bart", tmp_path / "received") / WEIGHTS_NAME))
    assert received.keys() == load_file(str(folder / WEIGHTS_NAME)).keys()


def test_load_sparse_from_the_hub_over_http(tmp_path, hub):
    """`load_sparse("user/repo")` downloads through huggingface_hub (HF_ENDPOINT is read at import: subprocess)."""
    model = sparse_model("llama", torch.float16)
    push_to_hub(model, "tester/plain", token=TOKEN, endpoint=hub.url)
    push_to_hub(model, "tester/packed", token=TOKEN, endpoint=hub.url, compressed=True)
    expected = tmp_path / "expected.pt"
    torch.save(model.state_dict(), expected)
    script = textwrap.dedent(f"""
        import torch
        from nm_hf.checkpoint import load_sparse
        from nm_hf.injection import iter_sparse_layers
        expected = torch.load({str(expected)!r})
        for repo in ("tester/plain", "tester/packed"):
            model = load_sparse(repo, token={TOKEN!r})
            layers = [name for name, _ in iter_sparse_layers(model)]
            same = all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
            print(repo, type(model).__name__, len(layers), same)
    """)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    n_layers = len(model.config.nm_sparsity["targeted_modules"])
    assert result.stdout.split("\n")[:2] == [f"tester/plain LlamaForCausalLM {n_layers} True",
                                             f"tester/packed LlamaForCausalLM {n_layers} True"]
    downloads = {path for method, path in hub.requests if method == "GET" and "/resolve/" in path}
    assert any(p.endswith("/model.safetensors") for p in downloads)
    assert any(p.endswith(f"/{WEIGHTS_NAME}") for p in downloads)


@pytest.mark.parametrize("kind", ["training", "dense"])
def test_card_of_weights_that_are_not_nm_does_not_call_them_sparse(tmp_path, kind):
    """A dense-method baseline or a state='training' directory: the headline and tags said "2:4 sparse"."""
    model = tiny_model("llama")
    sparsify(model, SparsityConfig(method="dense") if kind == "dense" else SparsityConfig())
    if kind == "dense":
        finalize(model)
    model.save_pretrained(tmp_path)
    text = write_model_card(tmp_path).content
    assert "**2:4 sparse**" not in text and "**not 2:4 sparse**" in text
    assert "sparse" not in _front_matter(text)["tags"] and "| N:M pattern holds | NO |" in text
    assert ("state='training'" in text) == (kind == "training")


def test_a_card_for_the_other_weights_format_is_not_carried_over(tmp_path):
    """A recipe's output_dir holds the card of its dense weights: `compress` / `prepare_upload(compressed=True,
    model_card=False)` carried it (plain `from_pretrained` usage, "safetensors (dense)") next to compressed
    weights, and a README.md of one's own was refused as "already in the upload"."""
    sparse_model("llama", torch.float16).save_pretrained(tmp_path / "run")
    write_model_card(tmp_path / "run")
    assert main(["compress", str(tmp_path / "run"), str(tmp_path / "c")]) == 0
    assert not (tmp_path / "c" / "README.md").exists()
    assert not (prepare_upload(tmp_path / "run", tmp_path / "up", compressed=True, model_card=False)
                / "README.md").exists()
    own = tmp_path / "own" / "README.md"
    own.parent.mkdir()
    own.write_text("# my card\n")
    folder = prepare_upload(tmp_path / "run", tmp_path / "up2", model_card=False, extra_files=[own])
    assert (folder / "README.md").read_text() == "# my card\n"
    (tmp_path / "run" / "README.md").write_text("# written by hand\n")  # not nm_hf's: travels as before
    assert (prepare_upload(tmp_path / "run", tmp_path / "up3", compressed=True, model_card=False)
            / "README.md").read_text() == "# written by hand\n"


def test_upload_of_an_unsharded_save_over_a_sharded_one_leaves_the_stale_index(tmp_path):
    """save_pretrained without shards into a folder that held shards deletes them but keeps the index:
    prepare_upload failed on the index's missing shards (transformers loads model.safetensors)."""
    sparse_model("llama").save_pretrained(tmp_path / "run", max_shard_size="20KB")
    model = sparse_model("llama")
    model.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors.index.json").exists()
    folder = prepare_upload(tmp_path / "run", tmp_path / "up")
    assert (folder / "model.safetensors").exists() and not (folder / "model.safetensors.index.json").exists()
    reloaded = type(model).from_pretrained(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
