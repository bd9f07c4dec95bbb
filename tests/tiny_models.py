"""Tiny Transformers models built offline from configs (no Hub access): shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
)

VOCAB = 96
HIDDEN = 32

# Every config key a tiny model may need; only the keys a config already has are set.
_TINY = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "dim": HIDDEN, "word_embed_proj_dim": HIDDEN,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2,
    "encoder_layers": 1, "decoder_layers": 1, "num_decoder_layers": 1,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64, "hidden_dim": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "d_ff": 64, "d_kv": 8, "head_dim": 8,
    "max_position_embeddings": 64, "n_positions": 64,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
    "sep_token_id": 2, "cls_token_id": 1,
    "global_attn_every_n_layers": 1, "local_attention": 8,
}

# model_type -> the head class the tests use
ARCHITECTURES = {
    "bert": AutoModelForMaskedLM,
    "distilbert": AutoModelForMaskedLM,
    "gpt2": AutoModelForCausalLM,
    "t5": AutoModelForSeq2SeqLM,
    "bart": AutoModelForSeq2SeqLM,
    "marian": AutoModelForSeq2SeqLM,
    "m2m_100": AutoModelForSeq2SeqLM,
    "llama": AutoModelForCausalLM,
    "qwen2": AutoModelForCausalLM,
    "mistral": AutoModelForCausalLM,
    "opt": AutoModelForCausalLM,
    "gpt_neox": AutoModelForCausalLM,
    "falcon": AutoModelForCausalLM,
    "phi3": AutoModelForCausalLM,
    "modernbert": AutoModelForMaskedLM,
    "gpt_bigcode": AutoModelForCausalLM,
}


def tiny_config(model_type: str, **overrides):
    defaults = AutoConfig.for_model(model_type).to_dict()
    kwargs = {key: value for key, value in _TINY.items() if key in defaults}
    if "layer_types" in defaults:
        kwargs["layer_types"] = None  # derived again from the tiny num_hidden_layers
    if model_type in ("gpt2", "gpt_bigcode"):
        kwargs["n_inner"] = 64
    if model_type == "falcon":
        kwargs["new_decoder_architecture"] = False
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, auto_class=None, seed: int = 0, **overrides):
    """A randomly initialised tiny model of `model_type` (deterministic for a given seed)."""
    torch.manual_seed(seed)
    auto_class = auto_class or ARCHITECTURES.get(model_type, AutoModel)
    return auto_class.from_config(tiny_config(model_type, **overrides))


def tiny_inputs(model, batch: int = 2, length: int = 8, seed: int = 0) -> dict:
    """Token inputs (and decoder inputs for encoder-decoders) for a forward pass."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, length), generator=g)
    return inputs


def output_tensor(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state
