"""Tiny Transformers models built offline from configs (no Hub access): shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

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

# name components of the task heads "all-linear" must leave dense
HEAD_PARTS = frozenset({"lm_head", "cls", "classifier", "classification_head", "score", "qa_outputs",
                        "pre_classifier", "head"})

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
    # sliding and full attention layers, a scaled embedding; one layer group shared by every layer (each sparse
    # layer runs twice a forward); a fused query_key_value with ALiBi; an MLM head outside the backbone; DeBERTa's
    # disentangled attention
    "gemma3_text": AutoModelForCausalLM,
    "albert": AutoModelForMaskedLM,
    "bloom": AutoModelForCausalLM,
    "electra": AutoModelForMaskedLM,
    "deberta-v2": AutoModelForMaskedLM,
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
    """The logits (text-image models: `logits_per_image`), else the last hidden state."""
    for key in ("logits", "logits_per_image"):
        if getattr(output, key, None) is not None:
            return getattr(output, key)
    return output.last_hidden_state


def train_steps(model, steps: int, lr: float = 0.05, tracker=None, call_hook: bool = True, *,
                optimizer: torch.optim.Optimizer | None = None, inputs: dict | None = None,
                loss: Callable | None = None,
                on_step: Callable[[], None] | None = None) -> torch.optim.Optimizer:
    """`steps` optimizer steps of a plain training loop, as a user would write it; returns the optimizer.

    Each step: `loss(model).backward()` (default: the LM loss of `inputs`, default `tiny_inputs(model)`,
    the same batch every step), `optimizer.step()` (default: a new `AdamW(lr=lr)`), `zero_grad()`, then
    `nm_hf.after_optimizer_step(model, lr)` if `call_hook`, `tracker.step()` if a tracker is given, and
    `on_step()`. The model's train/eval mode is left as it is.
    """
    from nm_hf.injection import after_optimizer_step  # on call: the model builders need only transformers

    optimizer = optimizer if optimizer is not None else torch.optim.AdamW(model.parameters(), lr=lr)
    if loss is None:
        batch = inputs if inputs is not None else tiny_inputs(model)

        def loss(m):
            return m(**batch, labels=batch["input_ids"]).loss

    for _ in range(steps):
        loss(model).backward()
        optimizer.step()
        optimizer.zero_grad()
        if call_hook:
            after_optimizer_step(model, lr)
        if tracker is not None:
            tracker.step()
        if on_step is not None:
            on_step()
    return optimizer


def random_sparse_layer(kind: str, config, in_features: int = 16, out_features: int = 12, seed: int = 0,
                        dtype=torch.float64):
    """A `SparseLinear` ("linear") or GPT-2 `SparseConv1D` ("conv1d") with standard-normal weight and bias."""
    from nm_hf.layers import SparseConv1D, SparseLinear

    torch.manual_seed(seed)
    if kind == "linear":
        layer = SparseLinear(in_features, out_features, config=config)
    else:
        layer = SparseConv1D(out_features, in_features, config=config)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer.to(dtype)


def out_in(layer, tensor: torch.Tensor) -> torch.Tensor:
    """[out, in] view of a weight-shaped tensor of `layer` (GPT-2 Conv1D stores [in, out])."""
    return tensor if isinstance(layer, torch.nn.Linear) else tensor.t()


def lm_rows(n: int = 16, length: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` random causal-LM examples (input_ids = labels) of `length` tokens, deterministic."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


#: a small code-like vocabulary for text the tests generate
CODE_WORDS = ["def", "return", "self", "value", "list", "index", "import", "class", "None", "print", "for", "in",
              "if", "else", "x", "y", "name", "data", "result", "=", "(", ")", ":", "+", "1", "2"]


def code_lines(n: int, seed: int) -> list[str]:
    """`n` lines of 6-13 random code-like words (the same for the same seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(CODE_WORDS[i] for i in rng.integers(0, len(CODE_WORDS), size=rng.integers(6, 14)))
            for _ in range(n)]


def save_pretrained_lm(root) -> dict:
    """A tiny dense GPT-2 (Conv1D layers) and its offline-trained tokenizer saved under `root`/model, plus
    train/validation/test text files: {"model": dir, "train": file, "validation": file, "test": file}."""
    from pathlib import Path

    from transformers import GPT2Config, GPT2LMHeadModel

    from nm_hf.tokenization import train_causal_lm_tokenizer

    root = Path(root)
    files = {}
    for split, (n, seed) in {"train": (120, 0), "validation": (30, 1), "test": (30, 2)}.items():
        files[split] = root / f"{split}.txt"
        files[split].write_text("\n".join(code_lines(n, seed)) + "\n", encoding="utf-8")
    tokenizer = train_causal_lm_tokenizer(code_lines(200, 3), vocab_size=300, min_frequency=1, model_max_length=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                       n_inner=64, bos_token_id=0, eos_token_id=0, pad_token_id=1))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return {"model": root / "model", **files}
