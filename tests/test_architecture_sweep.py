"""Sweep over many transformers model types, built tiny from their configs: "all-linear" 2:4, one training
step, finalize, save, plain reload (about 30 s on one thread; part of `make test`). After a transformers
upgrade it is the first place a new layout shows up:

    .venv/bin/python -m pytest tests/test_architecture_sweep.py

Each type checks, through public behaviour: something is targeted; every targeted weight the forward uses is 2:4
along its input dimension (the layer-kind registry's group dim, recorded in `group_dims`); no embedding-tied weight,
output embedding or task head is targeted; experts in a layout nm_hf has none for are listed as left dense; the
sparse model's eval output equals the finalized model's (a mask that never reaches a computation shows up here);
`save_pretrained` + the plain transformers Auto class reload the same outputs, state and N:M weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForCTC,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSpeechSeq2Seq,
)
from transformers.pytorch_utils import Conv1D

import nm_hf
from nm_hf.layers.experts import unsupported_experts
from nm_hf.masks import check_nm, nm_group_counts
from nm_hf.record import CONFIG_KEY
from tiny_models import HEAD_PARTS, VOCAB, output_tensor, tiny_config, tiny_inputs, train_steps

CLM, MLM, S2S = AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM
IMAGE = 32  # pixels per side of the vision inputs


def image_inputs(model) -> dict:
    return {"pixel_values": torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))}


def text_image_inputs(model) -> dict:
    return {"input_ids": tiny_inputs(model)["input_ids"], **image_inputs(model)}


def layout_inputs(model) -> dict:
    g = torch.Generator().manual_seed(1)
    corner = torch.randint(0, 30, (2, 8, 2), generator=g)  # bounding boxes (x0, y0, x1, y1) within 0..59
    size = torch.randint(0, 30, (2, 8, 2), generator=g)
    return {**tiny_inputs(model), "bbox": torch.cat([corner, corner + size], -1)}


def speech_inputs(model) -> dict:  # log-mel features [batch, mel bins, 2 * max_source_positions] + decoder tokens
    g = torch.Generator().manual_seed(0)
    config = model.config
    return {"input_features": torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions, generator=g),
            "decoder_input_ids": torch.randint(3, VOCAB, (2, 6), generator=g)}


def audio_inputs(model) -> dict:  # raw waveform
    return {"input_values": torch.randn(2, 400, generator=torch.Generator().manual_seed(0))}


@dataclass(frozen=True)
class Case:
    auto_class: type = CLM
    overrides: dict = field(default_factory=dict)
    inputs: Callable[[nn.Module], dict] = tiny_inputs
    #: "sparse": expert Parameters are targeted; "dense": experts in a layout nm_hf has none for, left dense (no model
    #: type has one now: `tests/test_layers_experts.py` builds a synthetic one)
    experts: str | None = None
    #: a known limitation: the reason (the test must fail: strict xfail)
    xfail: str | None = None
    #: layers whose weight the model's code reads without calling them (found in its source): sparse, the read
    #: sees the masked weight
    read_directly: tuple[str, ...] = ()


MOE = {"num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
       "moe_intermediate_size": 16, "num_experts_per_token": 2, "top_k": 2}
MLA = {**MOE, "num_key_value_heads": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1,
       "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
       "v_head_dim": 8}
VISION = {"image_size": IMAGE, "patch_size": 4, "num_channels": 3, "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 64}
TEXT_TOWER = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 64, "projection_dim": 32, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2}
VISION_TOWER = {"image_size": IMAGE, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 1,
                "num_attention_heads": 4, "intermediate_size": 64, "projection_dim": 32}
WAV2VEC2 = {"conv_dim": (16, 16), "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 4, "mask_time_prob": 0.0}
MAMBA = {"hidden_size": 64, "state_size": 8}

#: model type -> how to build, feed and judge it (config keys beyond tiny_models._TINY's)
MAMBA_READS = tuple(f"backbone.layers.0.mixer.{name}" for name in ("dt_proj", "x_proj", "out_proj"))


CASES: dict[str, Case] = {
    # decoders
    "gemma": Case(), "gemma2": Case(), "gemma3_text": Case(overrides={"sliding_window": 8}),
    "qwen3": Case(), "olmo": Case(), "olmo2": Case(), "phi": Case(), "stablelm": Case(), "starcoder2": Case(),
    "cohere": Case(), "cohere2": Case(overrides={"sliding_window": 8}), "granite": Case(), "smollm3": Case(),
    "glm": Case(), "glm4": Case(), "gptj": Case(overrides={"rotary_dim": 4}),
    "gpt_neo": Case(overrides={"attention_types": [[["global", "local"], 1]], "window_size": 8}),
    "bloom": Case(), "codegen": Case(overrides={"rotary_dim": 4, "n_ctx": 64}), "mpt": Case(), "persimmon": Case(),
    "nemotron": Case(), "helium": Case(), "exaone4": Case(overrides={"sliding_window": 8}), "xglm": Case(),
    "biogpt": Case(), "ernie4_5": Case(), "hunyuan_v1_dense": Case(), "seed_oss": Case(), "arcee": Case(),
    "lfm2": Case(overrides={"full_attn_idxs": [1], "block_ff_dim": 64, "block_auto_adjust_ff_dim": False}),
    # mixture of experts: fused expert Parameters
    "qwen3_moe": Case(overrides={**MOE, "decoder_sparse_step": 1, "mlp_only_layers": []}, experts="sparse"),
    "qwen2_moe": Case(overrides={**MOE, "shared_expert_intermediate_size": 16, "decoder_sparse_step": 1,
                                 "mlp_only_layers": []}, experts="sparse"),
    "mixtral": Case(overrides={**MOE, "intermediate_size": 16}, experts="sparse"),
    "olmoe": Case(overrides={**MOE, "intermediate_size": 16}, experts="sparse"),
    "granitemoe": Case(overrides={**MOE, "intermediate_size": 16}, experts="sparse"),
    "phimoe": Case(overrides={**MOE, "intermediate_size": 16}, experts="sparse"),
    "minimax": Case(overrides={**MOE, "intermediate_size": 16}, experts="sparse"),
    "ernie4_5_moe": Case(overrides={**MOE, "moe_layer_start_index": 0}, experts="sparse"),
    "deepseek_v2": Case(overrides=MLA, experts="sparse"),
    "deepseek_v3": Case(overrides=MLA, experts="sparse"),
    # DBRX: stacked [E * ffn, hidden] w1/v1/w2 (`STACKED_EXPERTS`)
    "dbrx": Case(overrides={"attn_config": {"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},
                            "ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2}},
                 experts="sparse"),
    # JetMoE: `JetMoeParallelExperts.weight` [E, out, in] (`NAMED_EXPERTS`), in its MLP and mixture-of-attention
    "jetmoe": Case(overrides={**MOE, "kv_channels": 8}, experts="sparse"),
    # state-space models: Mamba's dt_proj weight is read by its parent's forward (and x_proj / out_proj's by the
    # fused training kernel it calls): the mixer sees their masked weights while it runs
    "mamba": Case(overrides=MAMBA, read_directly=MAMBA_READS),
    "falcon_mamba": Case(overrides={**MAMBA, "use_mambapy": False}, read_directly=MAMBA_READS),
    "mamba2": Case(overrides={**MAMBA, "n_groups": 1, "head_dim": 16, "num_heads": 8, "chunk_size": 8}),
    "jamba": Case(overrides={**MOE, "intermediate_size": 16, "attn_layer_period": 2, "attn_layer_offset": 1,
                             "expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 8,
                             "mamba_dt_rank": 8, "use_mamba_kernels": False}, experts="sparse"),
    # encoders (albert, electra, roformer, convbert, mobilebert: embedding_size != hidden_size)
    "roberta": Case(MLM), "xlm-roberta": Case(MLM), "xlm-roberta-xl": Case(MLM), "camembert": Case(MLM),
    "data2vec-text": Case(MLM), "deberta": Case(MLM), "deberta-v2": Case(MLM), "mpnet": Case(MLM),
    "ernie": Case(MLM), "megatron-bert": Case(MLM), "esm": Case(MLM, {"mask_token_id": 3}),
    "albert": Case(MLM, {"embedding_size": 16}), "electra": Case(MLM, {"embedding_size": 16}),
    "roformer": Case(MLM, {"embedding_size": 16}), "convbert": Case(MLM, {"embedding_size": 16}),
    # embedding_size = hidden_size; its encoder is 1x1 Conv1d layers ("all" targets them, "all-linear" the pooler)
    "squeezebert": Case(MLM, {"embedding_size": 32}),
    "mobilebert": Case(MLM, {"hidden_size": 64, "intra_bottleneck_size": 32, "embedding_size": 32,
                             "num_feedforward_networks": 1, "true_hidden_size": 32}),
    "funnel": Case(MLM, {"block_sizes": [1, 1], "d_head": 8, "d_inner": 64}),
    "longformer": Case(MLM, {"attention_window": 4}),
    "layoutlm": Case(MLM, {"max_2d_position_embeddings": 64}, layout_inputs),
    "layoutlmv3": Case(AutoModel, {"input_size": IMAGE, "rel_pos_bins": 32, "max_rel_pos": 64, "rel_2d_pos_bins": 32,
                                   "max_rel_2d_pos": 64, "coordinate_size": 4, "shape_size": 8}, layout_inputs,
                       read_directly=("encoder.rel_pos_bias", "encoder.rel_pos_x_bias", "encoder.rel_pos_y_bias")),
    # encoder-decoders (t5 family: relative attention buckets)
    "mt5": Case(S2S), "umt5": Case(S2S), "longt5": Case(S2S, {"local_radius": 4}), "pegasus": Case(S2S),
    "mbart": Case(S2S), "plbart": Case(S2S), "blenderbot": Case(S2S), "blenderbot-small": Case(S2S),
    "led": Case(S2S, {"attention_window": 4, "max_encoder_position_embeddings": 64,
                      "max_decoder_position_embeddings": 64}),
    "fsmt": Case(S2S, {"src_vocab_size": VOCAB, "tgt_vocab_size": VOCAB}),
    "prophetnet": Case(S2S, {"ngram": 2}),
    "switch_transformers": Case(S2S, {"num_experts": 4, "num_sparse_encoder_layers": 1,
                                      "num_sparse_decoder_layers": 1}),
    "nllb-moe": Case(S2S, {"num_experts": 4, "encoder_sparse_step": 1, "decoder_sparse_step": 1}),
    # vision, audio, text-image
    "vit": Case(AutoModelForImageClassification, VISION, image_inputs),
    "beit": Case(AutoModelForImageClassification, VISION, image_inputs),
    "dinov2": Case(AutoModelForImageClassification, VISION, image_inputs),
    "deit": Case(AutoModel, VISION, image_inputs),
    "swin": Case(AutoModelForImageClassification, {"image_size": IMAGE, "patch_size": 4, "embed_dim": 16,
                                                   "depths": [1, 1], "num_heads": [2, 4], "window_size": 4},
                 image_inputs),
    "convnext": Case(AutoModelForImageClassification, {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2,
                                                       "image_size": IMAGE}, image_inputs),
    "clip": Case(AutoModel, {"text_config": TEXT_TOWER, "vision_config": VISION_TOWER, "projection_dim": 32},
                 text_image_inputs),
    "siglip": Case(AutoModel, {"text_config": TEXT_TOWER, "vision_config": VISION_TOWER}, text_image_inputs),
    "whisper": Case(AutoModelForSpeechSeq2Seq, {"num_mel_bins": 8, "max_source_positions": 16,
                                                 "max_target_positions": 32, "suppress_tokens": None,
                                                 "begin_suppress_tokens": None}, speech_inputs),
    "wav2vec2": Case(AutoModelForCTC, WAV2VEC2, audio_inputs),
    "hubert": Case(AutoModelForCTC, WAV2VEC2, audio_inputs),
}


PARAMS = [pytest.param(model_type, id=model_type,
                       marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [])
          for model_type, case in CASES.items()]


def build(model_type: str, case: Case) -> nn.Module:
    torch.manual_seed(0)
    return case.auto_class.from_config(tiny_config(model_type, **case.overrides))


def eval_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return output_tensor(model(**inputs)).clone()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model_type", PARAMS)
def test_sparsify_train_finalize_reload(model_type, tmp_path):
    case = CASES[model_type]
    model = build(model_type, case)
    inputs = case.inputs(model)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out_emb = model.get_output_embeddings()
    dense_experts = [f"{module}.{param}" for module, names in unsupported_experts(model).items() for param in names]

    nm_hf.sparsify(model, nm_hf.SparsityConfig(n=2, m=4))
    layers = dict(nm_hf.iter_sparse_layers(model))
    record = getattr(model.config, CONFIG_KEY)
    assert layers, "nothing was sparsified"
    assert list(layers) == record["targeted_modules"]
    assert record["group_dims"] == {name: layer.group_dim for name, layer in layers.items()}
    for name, layer in layers.items():
        if isinstance(layer, nn.Linear | Conv1D):  # the 2-D layouts: input features along dim 1 ([out, in]) / 0
            assert layer.group_dim == (0 if isinstance(layer, Conv1D) else 1), name
    # no embedding-tied weight, output embedding or task head
    assert not {id(layer.weight) for layer in layers.values()} & embedding_weights
    if out_emb is not None:
        assert all(layer.weight is not out_emb.weight for layer in layers.values())
    assert not [name for name in layers if HEAD_PARTS.intersection(name.split("."))]
    # experts
    expert_targets = record.get("parameter_targets", [])
    if case.experts == "sparse":
        assert expert_targets and not dense_experts
    elif case.experts == "dense":
        assert dense_experts and not expert_targets
    else:
        assert not dense_experts and not expert_targets
    assert not set(dense_experts) & set(layers) and set(dense_experts) <= set(record["ignored_modules"])
    assert all(name in record.get("ignored_reasons", {}) for name in dense_experts)
    # layers read directly (LayoutLMv3's relative-position tables, `.weight.t()[index]`) stay sparse
    assert set(case.read_directly) <= set(layers)

    # one optimizer step through the sparse forward and backward
    model.train()
    train_steps(model, 1, lr=1e-2, loss=lambda m: output_tensor(m(**inputs)).float().pow(2).mean())
    assert all(torch.isfinite(layer.weight).all() for layer in layers.values())
    live = nm_hf.sparsity_report(model)  # the weights the forward uses, along each layer's group dim
    assert live.nm_ok and [row.name for row in live.layers] == list(layers)
    for name, layer in layers.items():
        assert check_nm(layer.effective_weight(), 2, 4, dim=layer.group_dim), name
    sparse_out = eval_output(model, inputs)

    group_dims = record["group_dims"]
    nm_hf.finalize(model)
    assert not nm_hf.is_sparsified(model)
    final_out = eval_output(model, inputs)
    # the masks reach every computation: the baked dense model computes what the sparse one did
    torch.testing.assert_close(final_out, sparse_out, rtol=1e-4, atol=1e-5)
    for name in layers:
        weight = model.get_parameter(name if name in expert_targets else f"{name}.weight").detach()
        assert (nm_group_counts(weight, 4, dim=group_dims[name]) == 2).all(), name
    assert nm_hf.sparsity_report(model).nm_ok

    model.save_pretrained(tmp_path)
    reloaded, info = case.auto_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # the same weights, maybe another summation order (other memory): equal to float noise, not always bit-equal
    torch.testing.assert_close(eval_output(reloaded, inputs), final_out, rtol=1e-5, atol=1e-6)
    state, state2 = model.state_dict(), reloaded.state_dict()
    assert state.keys() == state2.keys()
    assert [key for key in state if not torch.equal(state[key], state2[key])] == []
    report = nm_hf.sparsity_report(reloaded)  # layers from the saved record, group dims from the registry
    assert report.nm_ok and [row.name for row in report.layers] == list(layers)
    assert getattr(reloaded.config, CONFIG_KEY)["state"] == "finalized"
