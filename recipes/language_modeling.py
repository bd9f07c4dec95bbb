#!/usr/bin/env python
"""Train an N:M sparse (SR-STE by default) causal language model; report loss, perplexity and sparsity.

    accelerate launch recipes/language_modeling.py recipes/configs/lm_demo.yaml [--flag value ...]

Data: CPython's bundled pydoc help texts (default; --dataset python_docs adds the standard library's
docstrings), local files (--train_file ...) or a Hub dataset
(--dataset_name wikitext --dataset_config_name wikitext-103-raw-v1), concatenated and cut into blocks
of --block_size tokens. Model: a GPT-2-style decoder (Conv1D layers, the default) or a Llama-style one
(--model_type llama) built from the size flags with a byte-level BPE tokenizer trained on the
training text, or any pretrained causal LM (--model_name_or_path) with its own tokenizer. Training:
`nm_hf.trainer.SparseTrainer`. Outputs in --output_dir: the finalized model (plain transformers
loads it), tokenizer, sparsity_history.json, sparsity.png, README.md (model card), results.json, and the
Trainer's train/eval/test/all_results.json. Without a config file, a model built from scratch gets
training defaults that learn (see `adaptive_defaults`); anything set in a config file or flag wins.
Run with --help for every flag; see docs/recipes.md.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from nm_hf.arguments import SparsityArguments
from nm_hf.data.text import iter_texts, load_text_data, tokenize_and_group
from nm_hf.recipe import (
    ArgumentsError,
    CausalLMModelArguments,
    TextDataArguments,
    adaptive_training_defaults,
    apply_config_overrides,
    check_first_mask,
    check_sparsity_targets,
    common_training_defaults,
    count_parameters,
    dataset_label,
    exit_with_error,
    finish_run,
    model_and_tokenizer,
    parse_recipe_args_or_exit,
    pretrained_model_config,
    results_record,
    safe_perplexity,
    setup_logging,
    skeleton,
    train_recipe_model,
    user_errors,
)
from nm_hf.recipe.model_setup import count_causal_lm_targets
from nm_hf.tokenization import train_causal_lm_tokenizer
from nm_hf.trainer import SparseTrainer

logger = logging.getLogger(__name__)

RECIPE_DEFAULTS: dict[str, Any] = {**common_training_defaults(), "output_dir": "runs/language_modeling"}
# A model built from scratch learns little in a short run at the stock TrainingArguments settings
# (AdamW lr 5e-5, no warm-up): these are lm_demo.yaml's (GPT-3-paper style AdamW (0.9, 0.95), weight
# decay 0.1, cosine schedule), the warm-up scaled to the run.
SCRATCH_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-3, "lr_scheduler_type": "cosine", "adam_beta1": 0.9, "adam_beta2": 0.95,
    "weight_decay": 0.1, "max_grad_norm": 1.0,
}
ARGUMENT_TYPES = (CausalLMModelArguments, TextDataArguments, SparsityArguments, TrainingArguments)
DESCRIPTION = (
    "Flags override the values of the optional config file (its keys are flag names). A model built from "
    "scratch trains with learning rate 2e-3, a cosine schedule with a warm-up of 10 percent of the steps "
    "(at most 400), AdamW betas (0.9, 0.95), weight decay 0.1 and gradient clipping at 1.0 unless the "
    "config file or a flag sets them; every run logs about 10 times (at most every 50 steps)."
)
PROG = "recipes/language_modeling.py"
# Defaults that depend on the run: a logging interval sized to --max_steps and, for a model built from
# scratch, SCRATCH_DEFAULTS with a warm-up of 10 percent of the steps (at most 400).
adaptive_defaults = adaptive_training_defaults(SCRATCH_DEFAULTS, warmup_fraction=0.1, warmup_cap=400)


def scratch_config(model_args: CausalLMModelArguments, vocab_size: int, special: dict[str, int | None],
                   block_size: int) -> GPT2Config | LlamaConfig:
    """The config of a GPT-2-style (Conv1D projections) or Llama-style decoder sized by the flags, tied
    embeddings, --config_overrides applied."""
    if model_args.max_position_embeddings < block_size:
        raise ArgumentsError(f"--block_size {block_size} is longer than --max_position_embeddings "
                             f"{model_args.max_position_embeddings}")
    if model_args.model_type == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=model_args.max_position_embeddings,
            n_embd=model_args.d_model, n_layer=model_args.num_layers, n_head=model_args.num_attention_heads,
            n_inner=model_args.ffn_dim, resid_pdrop=model_args.dropout, embd_pdrop=model_args.dropout,
            attn_pdrop=model_args.attention_dropout, tie_word_embeddings=True, **special)
    else:
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=model_args.d_model, intermediate_size=model_args.ffn_dim,
            num_hidden_layers=model_args.num_layers, num_attention_heads=model_args.num_attention_heads,
            num_key_value_heads=model_args.num_key_value_heads or model_args.num_attention_heads,
            max_position_embeddings=model_args.max_position_embeddings,
            attention_dropout=model_args.attention_dropout, tie_word_embeddings=True, **special)
    apply_config_overrides(config, model_args.config_overrides)
    return config


def _model_class(model_args: CausalLMModelArguments) -> type:
    return GPT2LMHeadModel if model_args.model_type == "gpt2" else LlamaForCausalLM


def build_scratch_model(model_args: CausalLMModelArguments, tokenizer: PreTrainedTokenizerBase,
                        block_size: int) -> GPT2LMHeadModel | LlamaForCausalLM:
    """The from-scratch model, consistent with the tokenizer's vocabulary and special ids."""
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = scratch_config(model_args, len(tokenizer), special, block_size)
    if model_args.config_overrides:
        logger.info(f"--config_overrides: {model_args.config_overrides}")
    return _model_class(model_args)(config)


def pretrained_config(model_args: CausalLMModelArguments, block_size: int) -> Any:
    """The config of --model_name_or_path, checked to be a decoder one with room for --block_size."""
    config = pretrained_model_config(model_args)
    if getattr(config, "is_encoder_decoder", False):
        raise ArgumentsError(f"--model_name_or_path {model_args.model_name_or_path} is an encoder-decoder model; "
                             "use recipes/translation.py for seq2seq models")
    longest = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if longest is not None and block_size > longest:
        raise ArgumentsError(f"--block_size {block_size} is longer than the {longest} positions of "
                             f"{model_args.model_name_or_path}")
    return config


def load_pretrained(model_args: CausalLMModelArguments, block_size: int) -> Any:
    """--model_name_or_path, its config checked (`pretrained_config`) before the weights are loaded."""
    pretrained_config(model_args, block_size)
    return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)


def check_model_settings(model_args: CausalLMModelArguments, block_size: int, sparsity_config: Any) -> None:
    """Everything about the model that can fail, checked before any data is loaded or file written: the
    config (sizes, --block_size, --config_overrides, the pretrained model's kind) and the layer
    selection, on an uninitialised copy of the model (a placeholder vocabulary: the tokenizer is not
    trained yet)."""
    if model_args.model_name_or_path:
        config = pretrained_config(model_args, block_size)
        model = skeleton(lambda: AutoModelForCausalLM.from_config(config))
    else:
        # the ids of train_causal_lm_tokenizer's layout: <|endoftext|> 0 (bos/eos), <pad> 1
        special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
        config = scratch_config(model_args, model_args.vocab_size, special, block_size)
        model = skeleton(lambda: _model_class(model_args)(config))
    check_sparsity_targets(model, sparsity_config)


BUILTIN_DESCRIPTIONS = {
    "pydoc": "pydoc (CPython's bundled help texts)",
    "python_docs": "python_docs (CPython's pydoc help texts and standard-library docstrings)",
}


def _dataset_label(data_args: TextDataArguments) -> str:
    return dataset_label(data_args, BUILTIN_DESCRIPTIONS.get(data_args.dataset, data_args.dataset))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (model_args, data_args, sparsity_args, training_args), hub = parse_recipe_args_or_exit(
        ARGUMENT_TYPES, argv, RECIPE_DEFAULTS, prog=PROG, adaptive_defaults=adaptive_defaults,
        description=DESCRIPTION)
    sparsity_config = sparsity_args.to_config()
    block_size = data_args.block_size
    with user_errors(PROG):
        check_first_mask(model_args, sparsity_config, training_args)
        check_model_settings(model_args, block_size, sparsity_config)
    setup_logging(training_args)
    set_seed(training_args.seed)

    # ---- data (nothing is written to the output directory before training starts)
    t0 = time.perf_counter()
    with user_errors(PROG), training_args.main_process_first(desc="loading the data"):
        raw = load_text_data(dataset=data_args.dataset, text_column=data_args.text_column,
                             **data_args.loader_kwargs())
    logger.info(f"data: {', '.join(f'{k} {len(v):,}' for k, v in raw.items())} rows "
                f"({time.perf_counter() - t0:.1f} s)")

    # ---- tokenizer and model
    with user_errors(PROG):
        model, tokenizer = model_and_tokenizer(
            model_args, training_args, sparsity_config,
            load_pretrained=lambda: load_pretrained(model_args, block_size),
            train_tokenizer=lambda: train_causal_lm_tokenizer(
                iter_texts(raw["train"]), vocab_size=model_args.vocab_size, min_frequency=model_args.min_frequency,
                model_max_length=model_args.max_position_embeddings),
            build_model=lambda tokenizer: build_scratch_model(model_args, tokenizer, block_size))
    if count_causal_lm_targets(model):
        logger.info(f"{type(model).__name__}: loss_type set to ForCausalLM, so the Trainer counts the predicted "
                    "tokens (labels[..., 1:]) of its loss")
    logger.info(f"model: {type(model).__name__}, {count_parameters(model):,} parameters")

    with training_args.main_process_first(desc="tokenizing the data"):
        blocks = tokenize_and_group(raw, tokenizer, block_size, num_proc=data_args.preprocessing_num_workers,
                                    add_eos=data_args.add_eos)
    for split in ("train", "validation", "test"):
        if len(blocks[split]) == 0:
            exit_with_error(PROG, f"the {split} split has fewer than --block_size {block_size} tokens; use a "
                            "smaller --block_size or more data")
    logger.info(f"blocks of {block_size} tokens: {', '.join(f'{k} {len(v):,}' for k, v in blocks.items())}")

    # ---- training (after a one-shot prune with --prune_criterion, or with a --dense_warmup_fraction)
    trainer, result_blocks = train_recipe_model(
        PROG, SparseTrainer, model=model, model_args=model_args, sparsity_config=sparsity_config,
        training_args=training_args, train_dataset=blocks["train"], eval_dataset=blocks["validation"],
        data_collator=default_data_collator, processing_class=tokenizer)

    # ---- evaluation
    val_metrics = trainer.evaluate(metric_key_prefix="eval")
    test_metrics = trainer.evaluate(blocks["test"], metric_key_prefix="test")
    test_loss, val_loss = float(test_metrics["test_loss"]), float(val_metrics["eval_loss"])
    trainer.save_metrics("eval", {**val_metrics, "eval_perplexity": safe_perplexity(val_loss),
                                  "eval_samples": len(blocks["validation"])})
    trainer.save_metrics("test", {**test_metrics, "test_perplexity": safe_perplexity(test_loss),
                                  "test_samples": len(blocks["test"])})

    results = results_record(
        {"task": "causal-lm", "dataset": _dataset_label(data_args),
         "test_loss": round(test_loss, 6), "test_perplexity": round(safe_perplexity(test_loss), 4),
         "eval_loss": round(val_loss, 6), "eval_perplexity": round(safe_perplexity(val_loss), 4)},
        result_blocks,
        evaluation={"block_size": block_size, "test_blocks": len(blocks["test"]),
                    "validation_blocks": len(blocks["validation"]), "test_runtime_s": test_metrics.get("test_runtime"),
                    "validation_runtime_s": val_metrics.get("eval_runtime")},
        model=trainer.model, model_name_or_path=model_args.model_name_or_path,
        data={"train_blocks": len(blocks["train"]), "train_rows": len(raw["train"])})
    finish_run(training_args, results, model=trainer.model, task="text-generation",
               dataset_name=data_args.dataset_name or _dataset_label(data_args),
               base_model=model_args.model_name_or_path, hub=hub,
               title=f"causal LM ({results['model']['type']}), {sparsity_config.pattern} {sparsity_config.method}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
