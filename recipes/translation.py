#!/usr/bin/env python
"""Train an N:M sparse (SR-STE by default) translation Transformer; report BLEU/chrF and sparsity.

    accelerate launch recipes/translation.py recipes/configs/translation_demo.yaml [--flag value ...]

Data: the Ding dictionary's example sentences (default), local files (--train_file ...) or a Hub
dataset (--dataset_name wmt14 --dataset_config_name de-en). Model: a pre-LN mBART-style
encoder-decoder built from the size flags with a joint BPE tokenizer trained on the training data, or
any pretrained seq2seq model (--model_name_or_path) with its own tokenizer. Training:
`nm_hf.trainer.SparseSeq2SeqTrainer`. Evaluation: sacrebleu corpus BLEU and chrF of generated
translations against the raw reference sentences, on validation (during and after training) and test.
Outputs in --output_dir: the finalized model (plain transformers loads it), tokenizer,
sparsity_history.json, sparsity.png, README.md (model card), results.json (with a few test samples,
also printed at the end), generated_predictions.txt, and the Trainer's train/eval/test/all_results.json.
Without a config file, a model built from scratch gets training defaults that learn (see
`adaptive_defaults`); anything set in a config file or flag wins. Run with --help for every flag; see
docs/recipes.md.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sacrebleu.metrics import BLEU, CHRF
from transformers import (
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    MBartConfig,
    MBartForConditionalGeneration,
    PreTrainedTokenizerBase,
    Seq2SeqTrainingArguments,
    set_seed,
)

from nm_hf.arguments import SparsityArguments
from nm_hf.data.translation import iter_translation_texts, load_translation_data
from nm_hf.recipe import (
    PREDICTIONS_FILE,
    ArgumentsError,
    TranslationDataArguments,
    TranslationModelArguments,
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
    pick_samples,
    pretrained_model_config,
    results_record,
    setup_logging,
    skeleton,
    train_recipe_model,
    user_errors,
    write_predictions,
)
from nm_hf.tokenization import train_translation_tokenizer
from nm_hf.trainer import SparseSeq2SeqTrainer

logger = logging.getLogger(__name__)

# Recipe defaults (below the config file and the flags): generate during evaluation so BLEU can be
# computed; see common_training_defaults for the rest.
RECIPE_DEFAULTS: dict[str, Any] = {
    **common_training_defaults(),
    "output_dir": "runs/translation",
    "predict_with_generate": True,
}
# A model built from scratch learns nothing in a short run at the stock TrainingArguments settings
# (AdamW lr 5e-5, no warm-up): these are translation_demo.yaml's (a pre-LN Transformer, Adam betas
# (0.9, 0.98), inverse-sqrt schedule, label smoothing), the warm-up scaled to the run.
SCRATCH_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-3, "lr_scheduler_type": "inverse_sqrt", "adam_beta1": 0.9, "adam_beta2": 0.98,
    "weight_decay": 0.0, "max_grad_norm": 1.0, "label_smoothing_factor": 0.1,
}
ARGUMENT_TYPES = (TranslationModelArguments, TranslationDataArguments, SparsityArguments, Seq2SeqTrainingArguments)
DESCRIPTION = (
    "Flags override the values of the optional config file (its keys are flag names). A model built from "
    "scratch trains with learning rate 2e-3, an inverse-sqrt schedule with a warm-up of 1/6 of the steps "
    "(at most 200), Adam betas (0.9, 0.98), label smoothing 0.1 and gradient clipping at 1.0 unless the "
    "config file or a flag sets them; every run logs about 10 times (at most every 50 steps)."
)
PROG = "recipes/translation.py"
SAMPLES = 5  # test sentences printed at the end and kept in results.json
# Defaults that depend on the run: a logging interval sized to --max_steps and, for a model built from
# scratch, SCRATCH_DEFAULTS with a warm-up of 1/6 of the steps (at most 200: the demo's 200 of 1,200).
adaptive_defaults = adaptive_training_defaults(SCRATCH_DEFAULTS, warmup_fraction=1 / 6, warmup_cap=200)


class BleuMetric:
    """`compute_metrics` for generated ids: corpus BLEU and chrF (sacrebleu) plus mean generated length.

    Scores are computed against `references` (the raw target sentences of the split being evaluated)
    when set and of the right length, otherwise against the decoded labels (truncated and normalised
    by the tokenizer, so slightly different).

    `bleu_control` / `chrf_control` score the same translations against the references rotated by one
    sentence: what fluent target-language output scores without translating its source. A model that
    learned to translate scores clearly above its control; on small budgets the gap is the evidence.
    With fewer than two sentences there is nothing to rotate, so the control keys are left out.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, references: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.references = references
        self.last_hypotheses: list[str] = []
        self.last_signature = ""

    def __call__(self, eval_preds: Any) -> dict[str, float]:
        preds, labels = eval_preds.predictions, eval_preds.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        pad = self.tokenizer.pad_token_id
        preds = np.where(preds != -100, preds, pad)
        hypotheses = [h.strip() for h in self.tokenizer.batch_decode(preds, skip_special_tokens=True)]
        if self.references is not None and len(self.references) == len(hypotheses):
            references = self.references
        else:
            if self.references is not None:
                logger.warning(f"{len(hypotheses)} predictions for {len(self.references)} references: "
                               "scoring against the decoded labels instead")
            labels = np.where(labels != -100, labels, pad)
            references = [r.strip() for r in self.tokenizer.batch_decode(labels, skip_special_tokens=True)]
        bleu_metric, chrf_metric = BLEU(), CHRF()
        bleu = bleu_metric.corpus_score(hypotheses, [references])
        chrf = chrf_metric.corpus_score(hypotheses, [references])
        self.last_hypotheses = hypotheses
        self.last_signature = str(bleu_metric.get_signature())
        # content tokens per translation: beam search pads finished hypotheses with eos, so count neither
        # pad nor any other special token
        special = np.array(sorted(set(self.tokenizer.all_special_ids) | {pad}))
        gen_len = float(np.isin(preds, special, invert=True).sum(-1).mean()) if len(preds) else 0.0
        scores = {"bleu": round(bleu.score, 4), "chrf": round(chrf.score, 4), "gen_len": round(gen_len, 2)}
        if len(references) >= 2:
            rotated = list(references[1:]) + list(references[:1])
            scores["bleu_control"] = round(bleu_metric.corpus_score(hypotheses, [rotated]).score, 4)
            scores["chrf_control"] = round(chrf_metric.corpus_score(hypotheses, [rotated]).score, 4)
        return scores


def scratch_config(model_args: TranslationModelArguments, data_args: TranslationDataArguments, vocab_size: int,
                   eos: int, pad: int) -> MBartConfig:
    """The config of a pre-LN mBART-style Transformer sized by the flags (with --config_overrides applied).

    mBART's label shift wraps the last label token (eos) to the front, so generation must start from
    eos too: `decoder_start_token_id = eos`. Source, target and output embeddings are one matrix.
    """
    longest = max(data_args.max_source_length, data_args.max_target_length)
    if model_args.max_position_embeddings < longest:
        raise ArgumentsError(f"--max_position_embeddings {model_args.max_position_embeddings} is shorter than "
                             f"--max_source_length/--max_target_length ({longest})")
    config = MBartConfig(
        vocab_size=vocab_size,
        d_model=model_args.d_model,
        encoder_layers=model_args.encoder_layers,
        decoder_layers=model_args.decoder_layers,
        encoder_attention_heads=model_args.num_attention_heads,
        decoder_attention_heads=model_args.num_attention_heads,
        encoder_ffn_dim=model_args.ffn_dim,
        decoder_ffn_dim=model_args.ffn_dim,
        dropout=model_args.dropout,
        attention_dropout=model_args.attention_dropout,
        activation_dropout=model_args.activation_dropout,
        activation_function=model_args.activation_function,
        max_position_embeddings=model_args.max_position_embeddings,
        scale_embedding=model_args.scale_embedding,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=eos,
        decoder_start_token_id=eos,
        forced_eos_token_id=eos,
        tie_word_embeddings=True,
    )
    apply_config_overrides(config, model_args.config_overrides)
    return config


def build_scratch_model(model_args: TranslationModelArguments, tokenizer: PreTrainedTokenizerBase,
                        data_args: TranslationDataArguments) -> MBartForConditionalGeneration:
    """The from-scratch model, consistent with the tokenizer's vocabulary and special ids."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError("the tokenizer needs pad and eos tokens to build a model from scratch")
    config = scratch_config(model_args, data_args, len(tokenizer), eos, pad)
    if model_args.config_overrides:
        logger.info(f"--config_overrides: {model_args.config_overrides}")
    return MBartForConditionalGeneration(config)


def pretrained_config(model_args: TranslationModelArguments) -> Any:
    """The config of --model_name_or_path, checked to be an encoder-decoder one."""
    config = pretrained_model_config(model_args)
    if not getattr(config, "is_encoder_decoder", False):
        raise ArgumentsError(f"--model_name_or_path {model_args.model_name_or_path} is a {config.model_type} "
                             "model, not an encoder-decoder (seq2seq) model")
    return config


def load_pretrained(model_args: TranslationModelArguments) -> Any:
    """--model_name_or_path, its config checked (`pretrained_config`) before the weights are loaded, and
    able to start generating."""
    pretrained_config(model_args)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path)
    if model.config.decoder_start_token_id is None:
        raise ValueError(f"{model_args.model_name_or_path}: config.decoder_start_token_id is not set; "
                         "generation cannot start")
    return model


def check_model_settings(model_args: TranslationModelArguments, data_args: TranslationDataArguments,
                         sparsity_config: Any) -> None:
    """Everything about the model that can fail, checked before any data is loaded or file written: the
    config (sizes, --config_overrides, the pretrained model's kind) and the layer selection, on an
    uninitialised copy of the model (a placeholder vocabulary: the tokenizer is not trained yet)."""
    if model_args.model_name_or_path:
        config = pretrained_config(model_args)
        model = skeleton(lambda: AutoModelForSeq2SeqLM.from_config(config))
    else:
        # the ids of train_translation_tokenizer's layout: <pad> 0, </s> 1
        config = scratch_config(model_args, data_args, model_args.vocab_size, eos=1, pad=0)
        model = skeleton(lambda: MBartForConditionalGeneration(config))
    check_sparsity_targets(model, sparsity_config)


def tokenize_splits(raw: Any, tokenizer: PreTrainedTokenizerBase, data_args: TranslationDataArguments,
                    training_args: Seq2SeqTrainingArguments) -> Any:
    src, tgt, prefix = data_args.source_lang, data_args.target_lang, data_args.source_prefix

    def preprocess(batch: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
        sources = [prefix + pair[src] for pair in batch["translation"]]
        targets = [pair[tgt] for pair in batch["translation"]]
        encoded = tokenizer(sources, max_length=data_args.max_source_length, truncation=True)
        encoded["labels"] = tokenizer(text_target=targets, max_length=data_args.max_target_length,
                                      truncation=True)["input_ids"]
        return encoded

    with training_args.main_process_first(desc="tokenizing the data"):
        return raw.map(preprocess, batched=True, num_proc=data_args.preprocessing_num_workers,
                       remove_columns=raw["train"].column_names, desc="Tokenizing")


def _dataset_label(data_args: TranslationDataArguments) -> str:
    if data_args.dataset != "ding":
        return dataset_label(data_args, data_args.dataset)
    entries = "example sentences" if data_args.ding_sentences_only else "phrases and example sentences"
    return dataset_label(data_args, f"ding (Debian trans-de-en {entries}, {data_args.ding_min_words}-"
                                    f"{data_args.ding_max_words} words)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (model_args, data_args, sparsity_args, training_args), hub = parse_recipe_args_or_exit(
        ARGUMENT_TYPES, argv, RECIPE_DEFAULTS, prog=PROG, adaptive_defaults=adaptive_defaults,
        description=DESCRIPTION)
    sparsity_config = sparsity_args.to_config()
    with user_errors(PROG):
        check_first_mask(model_args, sparsity_config, training_args)
        check_model_settings(model_args, data_args, sparsity_config)
    setup_logging(training_args)
    output_dir = Path(training_args.output_dir)
    set_seed(training_args.seed)

    # ---- data (nothing is written to the output directory before training starts)
    t0 = time.perf_counter()
    with user_errors(PROG), training_args.main_process_first(desc="loading the data"):
        raw = load_translation_data(
            source_lang=data_args.source_lang, target_lang=data_args.target_lang, dataset=data_args.dataset,
            ding_min_words=data_args.ding_min_words,
            ding_max_words=data_args.ding_max_words, ding_sentences_only=data_args.ding_sentences_only,
            **data_args.loader_kwargs())
    for split in ("train", "validation", "test"):
        if len(raw[split]) == 0:
            exit_with_error(PROG, f"the {split} split is empty (too little data to carve it out of the training "
                            "data? set --validation_file/--test_file or --validation_split_size/--test_split_size)")
    logger.info(f"data: {', '.join(f'{k} {len(v):,}' for k, v in raw.items())} pairs "
                f"({time.perf_counter() - t0:.1f} s)")

    # ---- tokenizer and model
    languages = (data_args.source_lang, data_args.target_lang)
    with user_errors(PROG):
        model, tokenizer = model_and_tokenizer(
            model_args, training_args, sparsity_config, load_pretrained=lambda: load_pretrained(model_args),
            train_tokenizer=lambda: train_translation_tokenizer(
                iter_translation_texts(raw["train"], languages), vocab_size=model_args.vocab_size,
                min_frequency=model_args.min_frequency),
            build_model=lambda tokenizer: build_scratch_model(model_args, tokenizer, data_args))
    model.generation_config.max_length = training_args.generation_max_length or data_args.max_target_length
    if training_args.generation_num_beams:
        model.generation_config.num_beams = training_args.generation_num_beams
    if model_args.length_penalty is not None:
        model.generation_config.length_penalty = model_args.length_penalty
    if model_args.no_repeat_ngram_size is not None:
        model.generation_config.no_repeat_ngram_size = model_args.no_repeat_ngram_size
    logger.info(f"model: {type(model).__name__}, {count_parameters(model):,} parameters")

    tokenized = tokenize_splits(raw, tokenizer, data_args, training_args)
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    src, tgt = data_args.source_lang, data_args.target_lang
    references = {split: [pair[tgt] for pair in raw[split]["translation"]] for split in ("validation", "test")}
    metric = BleuMetric(tokenizer, references["validation"])

    # ---- training (after a one-shot prune with --prune_criterion, or with a --dense_warmup_fraction)
    trainer, blocks = train_recipe_model(
        PROG, SparseSeq2SeqTrainer, model=model, model_args=model_args, sparsity_config=sparsity_config,
        training_args=training_args, train_dataset=tokenized["train"], eval_dataset=tokenized["validation"],
        data_collator=collator, processing_class=tokenizer, compute_metrics=metric, count_label_tokens=True)

    # ---- evaluation (generation)
    metric.references = references["validation"]
    val_m = trainer.evaluate(metric_key_prefix="eval")
    trainer.save_metrics("eval", {**val_m, "eval_samples": len(raw["validation"])})
    metric.references = references["test"]
    test_m = trainer.predict(tokenized["test"], metric_key_prefix="test").metrics
    trainer.save_metrics("test", {**test_m, "test_samples": len(raw["test"])})
    hypotheses = list(metric.last_hypotheses)
    if training_args.should_save:
        write_predictions(output_dir / PREDICTIONS_FILE, hypotheses)
    sources = [pair[src] for pair in raw["test"]["translation"]]

    generation = model.generation_config
    results = results_record(
        {"task": "translation", "dataset": _dataset_label(data_args), "language_pair": f"{src}-{tgt}",
         "test_bleu": test_m.get("test_bleu"), "test_chrf": test_m.get("test_chrf"),
         "eval_bleu": val_m.get("eval_bleu"), "eval_chrf": val_m.get("eval_chrf"),
         "test_bleu_control": test_m.get("test_bleu_control"), "test_chrf_control": test_m.get("test_chrf_control"),
         "test_loss": test_m.get("test_loss"), "eval_loss": val_m.get("eval_loss")},
        blocks, notes={"bleu_signature": metric.last_signature},
        evaluation={"test_samples": len(raw["test"]), "validation_samples": len(raw["validation"]),
                    "test_gen_len": test_m.get("test_gen_len"), "num_beams": generation.num_beams,
                    "max_length": generation.max_length, "length_penalty": generation.length_penalty,
                    "no_repeat_ngram_size": generation.no_repeat_ngram_size,
                    "test_runtime_s": test_m.get("test_runtime"), "validation_runtime_s": val_m.get("eval_runtime")},
        model=trainer.model, model_name_or_path=model_args.model_name_or_path,
        data={"train_pairs": len(raw["train"])},
        samples=pick_samples(sources, hypotheses, references["test"], SAMPLES))
    finish_run(training_args, results, model=trainer.model, task="translation",
               dataset_name=data_args.dataset_name or _dataset_label(data_args),
               base_model=model_args.model_name_or_path, hub=hub,
               title=f"translation {results['language_pair']}, {sparsity_config.pattern} {sparsity_config.method}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
