"""Recipe support: what `recipes/translation.py` and `recipes/language_modeling.py` share.

Not part of the library core (nothing in `nm_hf` outside this package imports it); one module per
concern:

- `args`: the recipes' data and model flags (`TranslationDataArguments`, `CausalLMModelArguments`, ...);
  the sparsity flags are the library's `nm_hf.arguments.SparsityArguments`;
- `config_files`: `[CONFIG.yaml|.json] [--flag value ...]` parsing, strict about the config file;
- `launch`: the CLI entry (`parse_recipe_args_or_exit`), recipe defaults, launch checks, logging, the
  recorded command line with its secrets redacted, the process's run time;
- `model_setup`: model config overrides, layer-selection checks before anything is written, the
  tokenizer trained once and shared by every process, the run's model and tokenizer;
- `training`: the first-mask checks (dense warm-up, one-shot prune) and the recipe trainer's run;
- `trainer_mixins`: token throughput and exact in-order evaluation for the recipes' trainers;
- `results`: train and save, results.json, the printed table, model card and Hub push.
"""

from .args import (
    CausalLMModelArguments,
    DataArguments,
    ModelArguments,
    TextDataArguments,
    TranslationDataArguments,
    TranslationModelArguments,
)
from .config_files import (
    CONFIG_SUFFIXES,
    ArgumentsError,
    ParsedArgs,
    load_config_file,
    parse_recipe_args,
    parse_recipe_args_full,
)
from .launch import (
    REDACTED,
    HubTarget,
    adaptive_training_defaults,
    check_launch,
    check_training_arguments,
    common_training_defaults,
    exit_with_error,
    is_secret_flag,
    launch_command,
    one_line,
    parse_recipe_args_or_exit,
    process_elapsed_seconds,
    redact_command,
    run_environment,
    run_length_defaults,
    setup_logging,
    take_over_hub_push,
    user_errors,
)
from .model_setup import (
    apply_config_overrides,
    check_sparsity_targets,
    model_and_tokenizer,
    pretrained_model_config,
    resume_dirs,
    shared_tokenizer,
    skeleton,
)
from .results import (
    PREDICTIONS_FILE,
    RESULTS_FILE,
    count_parameters,
    dataset_label,
    finish_run,
    format_results_table,
    format_samples,
    json_safe,
    model_summary,
    pick_samples,
    results_record,
    safe_perplexity,
    train_and_save,
    write_predictions,
    write_results_json,
)
from .trainer_mixins import ExactEvalMixin, TokenThroughputMixin, batch_token_count, with_token_throughput
from .training import check_first_mask, train_recipe_model

__all__ = [
    "ArgumentsError",
    "CONFIG_SUFFIXES",
    "CausalLMModelArguments",
    "DataArguments",
    "ExactEvalMixin",
    "HubTarget",
    "ModelArguments",
    "PREDICTIONS_FILE",
    "ParsedArgs",
    "REDACTED",
    "RESULTS_FILE",
    "TextDataArguments",
    "TokenThroughputMixin",
    "TranslationDataArguments",
    "TranslationModelArguments",
    "adaptive_training_defaults",
    "apply_config_overrides",
    "batch_token_count",
    "check_first_mask",
    "check_launch",
    "check_sparsity_targets",
    "check_training_arguments",
    "common_training_defaults",
    "count_parameters",
    "dataset_label",
    "exit_with_error",
    "finish_run",
    "format_results_table",
    "format_samples",
    "is_secret_flag",
    "json_safe",
    "launch_command",
    "load_config_file",
    "model_and_tokenizer",
    "model_summary",
    "one_line",
    "parse_recipe_args",
    "parse_recipe_args_full",
    "parse_recipe_args_or_exit",
    "pick_samples",
    "pretrained_model_config",
    "process_elapsed_seconds",
    "redact_command",
    "results_record",
    "resume_dirs",
    "run_environment",
    "run_length_defaults",
    "safe_perplexity",
    "setup_logging",
    "shared_tokenizer",
    "skeleton",
    "take_over_hub_push",
    "train_and_save",
    "train_recipe_model",
    "user_errors",
    "with_token_throughput",
    "write_predictions",
    "write_results_json",
]
