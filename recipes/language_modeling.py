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
loads it), tokenizer, sparsity_history.json, sparsity.png, README.md (model card), results.json.
Run with --help for every flag; see docs (README, "Recipes").
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from nm_hf.arguments import CausalLMModelArguments, SparsityArguments, TextDataArguments
from nm_hf.data.text import iter_texts, load_text_data, tokenize_and_group
from nm_hf.recipe_utils import (
    ArgumentsError,
    apply_config_overrides,
    common_training_defaults,
    count_parameters,
    finish_run,
    launch_command,
    model_summary,
    parse_recipe_args_or_exit,
    prepare_tokenizer,
    safe_perplexity,
    setup_logging,
    train_and_save,
    with_token_throughput,
)
from nm_hf.tokenization import train_causal_lm_tokenizer
from nm_hf.trainer import SparseTrainer

logger = logging.getLogger(__name__)

RECIPE_DEFAULTS: dict[str, Any] = {**common_training_defaults(), "output_dir": "runs/language_modeling"}
ARGUMENT_TYPES = (CausalLMModelArguments, TextDataArguments, SparsityArguments, TrainingArguments)
PROG = "recipes/language_modeling.py"


def build_scratch_model(model_args: CausalLMModelArguments, tokenizer: PreTrainedTokenizerBase,
                        block_size: int) -> GPT2LMHeadModel | LlamaForCausalLM:
    """A GPT-2-style (Conv1D projections) or Llama-style decoder sized by the flags, tied embeddings."""
    if model_args.max_position_embeddings < block_size:
        raise ArgumentsError(f"--block_size {block_size} is longer than --max_position_embeddings "
                             f"{model_args.max_position_embeddings}")
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    if model_args.model_type == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=model_args.max_position_embeddings,
            n_embd=model_args.d_model, n_layer=model_args.num_layers, n_head=model_args.num_attention_heads,
            n_inner=model_args.ffn_dim, resid_pdrop=model_args.dropout, embd_pdrop=model_args.dropout,
            attn_pdrop=model_args.attention_dropout, tie_word_embeddings=True, **special)
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=model_args.d_model, intermediate_size=model_args.ffn_dim,
            num_hidden_layers=model_args.num_layers, num_attention_heads=model_args.num_attention_heads,
            num_key_value_heads=model_args.num_key_value_heads or model_args.num_attention_heads,
            max_position_embeddings=model_args.max_position_embeddings,
            attention_dropout=model_args.attention_dropout, tie_word_embeddings=True, **special)
    changed = apply_config_overrides(config, model_args.config_overrides)
    if changed:
        logger.info(f"--config_overrides: {changed}")
    model_class = GPT2LMHeadModel if model_args.model_type == "gpt2" else LlamaForCausalLM
    return model_class(config)


def load_pretrained(model_args: CausalLMModelArguments, block_size: int) -> tuple[Any, PreTrainedTokenizerBase]:
    if model_args.config_overrides:
        raise ArgumentsError("--config_overrides only applies to a model built from scratch, not to "
                             f"--model_name_or_path {model_args.model_name_or_path}")
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    if getattr(config, "is_encoder_decoder", False):
        raise ArgumentsError(f"--model_name_or_path {model_args.model_name_or_path} is an encoder-decoder model; "
                             "use recipes/translation.py for seq2seq models")
    longest = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if longest is not None and block_size > longest:
        raise ArgumentsError(f"--block_size {block_size} is longer than the {longest} positions of "
                             f"{model_args.model_name_or_path}")
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    return model, tokenizer


BUILTIN_DESCRIPTIONS = {
    "pydoc": "pydoc (CPython's bundled help texts)",
    "python_docs": "python_docs (CPython's pydoc help texts and standard-library docstrings)",
}


def _dataset_label(data_args: TextDataArguments) -> str:
    if data_args.dataset_name:
        return data_args.dataset_name + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name
                                         else "")
    if data_args.train_file:
        return f"local files ({Path(data_args.train_file).name})"
    return BUILTIN_DESCRIPTIONS.get(data_args.dataset, data_args.dataset)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    (model_args, data_args, sparsity_args, training_args), hub = parse_recipe_args_or_exit(
        ARGUMENT_TYPES, argv, RECIPE_DEFAULTS, prog=PROG)
    setup_logging(training_args)
    sparsity_config = sparsity_args.to_config()
    output_dir = Path(training_args.output_dir)
    block_size = data_args.block_size
    set_seed(training_args.seed)

    # ---- data
    t0 = time.perf_counter()
    with training_args.main_process_first(desc="loading the data"):
        raw = load_text_data(
            dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
            train_file=data_args.train_file, validation_file=data_args.validation_file,
            test_file=data_args.test_file, dataset=data_args.dataset, text_column=data_args.text_column,
            max_train_samples=data_args.max_train_samples, max_eval_samples=data_args.max_eval_samples,
            cache_dir=data_args.data_cache_dir, **data_args.split_sizes())
    if data_args.max_test_samples is not None and data_args.max_test_samples < len(raw["test"]):
        raw["test"] = raw["test"].select(range(data_args.max_test_samples))
    logger.info(f"data: {', '.join(f'{k} {len(v):,}' for k, v in raw.items())} rows "
                f"({time.perf_counter() - t0:.1f} s)")

    # ---- tokenizer and model
    if model_args.model_name_or_path:
        model, tokenizer = load_pretrained(model_args, block_size)
    else:
        tokenizer = prepare_tokenizer(
            training_args, output_dir, reuse_existing=bool(training_args.resume_from_checkpoint),
            train=lambda: train_causal_lm_tokenizer(iter_texts(raw["train"]), vocab_size=model_args.vocab_size,
                                                    min_frequency=model_args.min_frequency,
                                                    model_max_length=model_args.max_position_embeddings))
        model = build_scratch_model(model_args, tokenizer, block_size)
    logger.info(f"model: {type(model).__name__}, {count_parameters(model):,} parameters")

    with training_args.main_process_first(desc="tokenizing the data"):
        blocks = tokenize_and_group(raw, tokenizer, block_size, num_proc=data_args.preprocessing_num_workers,
                                    add_eos=data_args.add_eos)
    for split in ("train", "validation", "test"):
        if len(blocks[split]) == 0:
            raise SystemExit(f"{PROG}: error: the {split} split has fewer than --block_size {block_size} "
                             "tokens; use a smaller --block_size or more data")
    logger.info(f"blocks of {block_size} tokens: {', '.join(f'{k} {len(v):,}' for k, v in blocks.items())}")

    # ---- training
    trainer_cls = with_token_throughput(SparseTrainer)
    trainer = trainer_cls(
        model=model, args=training_args, sparsity_config=sparsity_config,
        train_dataset=blocks["train"], eval_dataset=blocks["validation"],
        data_collator=default_data_collator, processing_class=tokenizer)
    result_blocks = train_and_save(trainer, training_args, sparsity_config)

    # ---- evaluation
    val_metrics = trainer.evaluate(metric_key_prefix="eval")
    test_metrics = trainer.evaluate(blocks["test"], metric_key_prefix="test")

    test_loss, val_loss = float(test_metrics["test_loss"]), float(val_metrics["eval_loss"])
    results: dict[str, Any] = {
        "task": "causal-lm",
        "dataset": _dataset_label(data_args),
        "test_loss": round(test_loss, 6), "test_perplexity": round(safe_perplexity(test_loss), 4),
        "eval_loss": round(val_loss, 6), "eval_perplexity": round(safe_perplexity(val_loss), 4),
        **{k: v for k, v in result_blocks.items() if not isinstance(v, dict)},
        "evaluation": {
            "block_size": block_size, "test_blocks": len(blocks["test"]),
            "validation_blocks": len(blocks["validation"]),
            "test_runtime_s": test_metrics.get("test_runtime"), "validation_runtime_s": val_metrics.get("eval_runtime"),
        },
        **{k: v for k, v in result_blocks.items() if isinstance(v, dict)},
        "model": model_summary(trainer.model, model_args.model_name_or_path),
        "data": {"train_blocks": len(blocks["train"]), "train_rows": len(raw["train"])},
        "run": {"total_time_s": round(time.perf_counter() - started, 1), "command": launch_command()},
    }
    finish_run(training_args, results, model=trainer.model, task="text-generation",
               dataset_name=data_args.dataset_name or _dataset_label(data_args),
               base_model=model_args.model_name_or_path, hub=hub,
               title=f"causal LM ({results['model']['type']}), {sparsity_config.pattern} {sparsity_config.method}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
