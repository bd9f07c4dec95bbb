"""The recipes' data and model flags (`HfArgumentParser` dataclasses), checked when they are built.

A base class with what both recipes need and one subclass per recipe (`recipes/translation.py`,
`recipes/language_modeling.py`). Every value is checked in `__post_init__`, so a bad flag fails at
parse time, before any data is loaded, with a message that names the flag. The sparsity flags are the
library's public `nm_hf.arguments.SparsityArguments`.

This module deliberately does not use `from __future__ import annotations`: `HfArgumentParser` needs
real type objects to pick argparse types and choices. Help strings go through argparse's
%-formatting, so they avoid the percent sign (a literal one would have to be doubled).
"""

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..prune import CALIBRATED, CRITERIA

__all__ = [
    "DataArguments",
    "TranslationDataArguments",
    "TextDataArguments",
    "ModelArguments",
    "TranslationModelArguments",
    "CausalLMModelArguments",
]


def _check_positive(owner: object, names: tuple[str, ...], allow_none: bool = True) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")


def _check_probability(owner: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(owner, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"--{name} must be in [0, 1), got {value!r}")


@dataclass
class DataArguments:
    """Where the data comes from and how much of it to use; shared by both recipes."""

    #: flags of the built-in data sets (--dataset ...), and flags of the data given by name or file
    BUILTIN_ONLY: ClassVar[tuple[str, ...]] = ("dataset",)
    SOURCE_ONLY: ClassVar[tuple[str, ...]] = ()

    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset id or local dataset directory (datasets.load_dataset)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, e.g. de-en."})
    train_file: str | None = field(default=None, metadata={"help": "Local training data (see the README)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation data."})
    test_file: str | None = field(default=None, metadata={"help": "Local test data."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N validation rows (and test rows, see below)."}
    )
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N test rows (default: --max_eval_samples)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for datasets.map during tokenization."}
    )
    data_cache_dir: str | None = field(default=None, metadata={"help": "datasets cache directory."})
    validation_split_size: float | None = field(
        default=None,
        metadata={"help": "Size of the validation split carved out of the training data when the source has "
                  "none (built-in data, a lone --train_file): rows if >= 1, a fraction if < 1. Default: "
                  "the loader's (Ding 1,500 pairs; files 5 percent, at most 2,000)."},
    )
    test_split_size: float | None = field(
        default=None, metadata={"help": "The same for the test split."}
    )

    def __post_init__(self) -> None:
        _check_positive(self, ("max_train_samples", "max_eval_samples", "max_test_samples",
                               "preprocessing_num_workers"))
        for name in ("validation_split_size", "test_split_size"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name} must be > 0 (rows if >= 1, a fraction if < 1), got {value!r}")
            if value is not None and value >= 1 and value != int(value):
                raise ValueError(f"--{name} {value}: a row count must be a whole number (or a fraction < 1)")
        if self.dataset_name is not None and self.train_file is not None:
            raise ValueError("pass either --dataset_name or --train_file, not both")
        if self.train_file is None and (self.validation_file or self.test_file):
            raise ValueError("--validation_file/--test_file need --train_file")

    def inert_flags(self) -> tuple[tuple[str, ...], str]:
        """The fields this run ignores, and why (see `nm_hf.recipe.launch.check_inert_flags`)."""
        if self.dataset_name is not None or self.train_file is not None:
            return self.BUILTIN_ONLY, "only for the built-in data; --dataset_name/--train_file replace it"
        return self.SOURCE_ONLY, "only for --dataset_name/--train_file data, not the built-in data set"

    def split_sizes(self) -> dict[str, int | float | None]:
        """``validation_size``/``test_size`` for the data loaders: whole numbers as row counts."""
        def as_size(value: float | None) -> int | float | None:
            return int(value) if value is not None and value >= 1 else value
        return {"validation_size": as_size(self.validation_split_size), "test_size": as_size(self.test_split_size)}

    def loader_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of both data loaders (``nm_hf.data.load_text_data``/``load_translation_data``)
        that these shared flags set: the source, its cache, the row limits and the carved split sizes."""
        return {"dataset_name": self.dataset_name, "dataset_config_name": self.dataset_config_name,
                "train_file": self.train_file, "validation_file": self.validation_file, "test_file": self.test_file,
                "max_train_samples": self.max_train_samples, "max_eval_samples": self.max_eval_samples,
                "max_test_samples": self.max_test_samples, "cache_dir": self.data_cache_dir, **self.split_sizes()}


@dataclass
class TranslationDataArguments(DataArguments):
    BUILTIN_ONLY: ClassVar[tuple[str, ...]] = ("dataset", "ding_min_words", "ding_max_words", "ding_sentences_only")

    dataset: str = field(default="ding", metadata={"help": "Built-in data set: ding (Debian's trans-de-en)."})
    source_lang: str = field(default="en", metadata={"help": "Source language code (key in 'translation')."})
    target_lang: str = field(default="de", metadata={"help": "Target language code."})
    source_prefix: str = field(
        default="", metadata={"help": "Text put before every source sentence (T5-style 'translate ...: ')."}
    )
    max_source_length: int = field(default=128, metadata={"help": "Source sentences are truncated to this."})
    max_target_length: int = field(default=128, metadata={"help": "Target sentences are truncated to this."})
    ding_min_words: int = field(
        default=4, metadata={"help": "--dataset ding: keep pairs whose sides have at least this many words "
                             "(1-3 add the dictionary's word and short phrase entries)."}
    )
    ding_max_words: int = field(
        default=50, metadata={"help": "--dataset ding: keep pairs whose sides have at most this many words."}
    )
    ding_sentences_only: bool = field(
        default=False,
        metadata={"help": "--dataset ding: keep only full sentences (capitalised, ending in . ! or ?), not phrases."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, ("max_source_length", "max_target_length", "ding_min_words", "ding_max_words"),
                        allow_none=False)
        if self.ding_min_words > self.ding_max_words:
            raise ValueError(f"--ding_min_words {self.ding_min_words} is larger than --ding_max_words "
                             f"{self.ding_max_words}: no Ding pair would be kept")
        if self.source_lang == self.target_lang:
            raise ValueError(f"--source_lang and --target_lang must differ (both are {self.source_lang!r})")


@dataclass
class TextDataArguments(DataArguments):
    SOURCE_ONLY: ClassVar[tuple[str, ...]] = ("text_column",)

    dataset: str = field(default="pydoc", metadata={"help": "Built-in data set: pydoc (CPython's help texts) or python_docs (pydoc plus the standard "
                  "library's docstrings, 5x larger)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    block_size: int = field(default=128, metadata={"help": "Training sequence length (texts are concatenated)."})
    add_eos: bool = field(default=False, metadata={"help": "Append the eos token after every row."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, ("block_size",), allow_none=False)


#: calibration examples for --prune_criterion wanda/sparsegpt when --calibration_samples is not given
CALIBRATION_SAMPLES = 128


def _check_prune(owner: "ModelArguments") -> None:
    """--prune_criterion / --calibration_samples: a pretrained model to prune, data only where it is used."""
    criterion, samples = owner.prune_criterion, owner.calibration_samples
    if criterion is not None and criterion not in CRITERIA:
        raise ValueError(f"--prune_criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if criterion is not None and not owner.model_name_or_path:
        raise ValueError(f"--prune_criterion {criterion} needs --model_name_or_path: a model built from scratch "
                         "has nothing to prune")
    if criterion is not None and owner.dense_warmup_fraction:
        raise ValueError(f"--prune_criterion {criterion} and --dense_warmup_fraction both choose the first mask; "
                         "pass one of them")
    if samples is None:
        return
    _check_positive(owner, ("calibration_samples",))
    calibrated = " or ".join(name for name in CRITERIA if name in CALIBRATED)
    if criterion is None:
        raise ValueError(f"--calibration_samples needs --prune_criterion {calibrated} (and --model_name_or_path)")
    if criterion not in CALIBRATED:
        raise ValueError(f"--calibration_samples applies to --prune_criterion {calibrated} only: {criterion} "
                         "uses no calibration data")


@dataclass
class ModelArguments:
    """A pretrained model, or the size of a new one built from a config (with a tokenizer trained here)."""

    #: flags that size a model built from scratch or its tokenizer; with --model_name_or_path they would do nothing
    SCRATCH_ONLY: ClassVar[tuple[str, ...]] = (
        "vocab_size", "min_frequency", "d_model", "num_attention_heads", "ffn_dim", "dropout", "attention_dropout",
        "max_position_embeddings")

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start from this pretrained model (Hub id or local dir) and its tokenizer instead of "
                  "training a new model and tokenizer from scratch."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Extra config settings for a model built from scratch, 'key=value,key=value' "
                  "(existing config attributes only, all checked before any is set), applied last."},
    )
    vocab_size: int = field(default=8000, metadata={"help": "BPE vocabulary size of the new tokenizer."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair frequency for a BPE merge."})
    d_model: int = field(default=512, metadata={"help": "Hidden size."})
    num_attention_heads: int = field(default=8, metadata={"help": "Attention heads."})
    ffn_dim: int = field(default=2048, metadata={"help": "Feed-forward inner size."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on residual branches and embeddings."})
    attention_dropout: float = field(default=0.0, metadata={"help": "Dropout on attention probabilities."})
    max_position_embeddings: int = field(default=512, metadata={"help": "Longest sequence the model accepts."})
    dense_warmup_fraction: float = field(
        default=0.0,
        metadata={"help": "Train dense for this fraction of --max_steps, then switch the layers to --method with "
                  "masks chosen from the warmed-up weights (with --method fixed: NVIDIA ASP's magnitude prune, "
                  "frozen mask); same total steps. 0: sparse from the start."},
    )
    prune_criterion: str | None = field(
        default=None,
        metadata={"help": "With --model_name_or_path: prune the pretrained model one-shot to --sparsity with this "
                  "criterion (nm_hf.prune) before fine-tuning it with --method (fixed: the pruned mask, frozen).",
                  "choices": list(CRITERIA)},
    )
    calibration_samples: int | None = field(
        default=None,
        metadata={"help": "--prune_criterion wanda/sparsegpt: the first N training examples, in batches of "
                  f"--per_device_train_batch_size, are the calibration data (unset: {CALIBRATION_SAMPLES})."},
    )
    keep_freed_memory: bool = field(
        default=True,
        metadata={"help": "CPU runs with glibc: keep freed memory in the process for reuse instead of returning it "
                  "to the OS every step (nm_hf.keep_freed_memory); the page faults it avoids cost a sparse run "
                  "more than a dense one. Process-wide; memory stays committed at its peak."},
    )

    def inert_flags(self) -> tuple[tuple[str, ...], str]:
        """The fields this run ignores, and why (see `nm_hf.recipe.launch.check_inert_flags`)."""
        if not self.model_name_or_path:
            return (), ""
        return self.SCRATCH_ONLY, (f"only for a model built from scratch; --model_name_or_path "
                                   f"{self.model_name_or_path} keeps its own config and tokenizer")

    def __post_init__(self) -> None:
        _check_positive(self, ("vocab_size", "min_frequency", "d_model", "num_attention_heads", "ffn_dim",
                               "max_position_embeddings"), allow_none=False)
        _check_prune(self)
        if not 0.0 <= self.dense_warmup_fraction < 1.0:
            raise ValueError(f"--dense_warmup_fraction must be in [0, 1), got {self.dense_warmup_fraction}")
        _check_probability(self, ("dropout", "attention_dropout"))
        if self.d_model % self.num_attention_heads:
            raise ValueError(f"--d_model {self.d_model} must be divisible by --num_attention_heads "
                             f"{self.num_attention_heads}")


@dataclass
class TranslationModelArguments(ModelArguments):
    """A pre-LN mBART-style encoder-decoder (see docs) unless --model_name_or_path is given."""

    SCRATCH_ONLY: ClassVar[tuple[str, ...]] = (*ModelArguments.SCRATCH_ONLY, "encoder_layers", "decoder_layers",
                                               "activation_function", "activation_dropout", "scale_embedding")

    encoder_layers: int = field(default=6, metadata={"help": "Encoder layers."})
    decoder_layers: int = field(default=6, metadata={"help": "Decoder layers."})
    activation_function: str = field(default="relu", metadata={"help": "FFN activation (relu, gelu, ...)."})
    activation_dropout: float = field(default=0.0, metadata={"help": "Dropout inside the FFN."})
    scale_embedding: bool = field(default=True, metadata={"help": "Multiply embeddings by sqrt(d_model)."})
    length_penalty: float | None = field(
        default=None, metadata={"help": "Beam search length penalty, stored in generation_config.json (default: "
                                "the model's, 1.0 for a new one; fairseq uses 0.6 for WMT14 en-de)."})
    no_repeat_ngram_size: int | None = field(
        default=None, metadata={"help": "Forbid repeating n-grams of this size when generating (default: the "
                                "model's, off for a new one)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, ("encoder_layers", "decoder_layers"), allow_none=False)
        _check_probability(self, ("activation_dropout",))
        if self.no_repeat_ngram_size is not None and self.no_repeat_ngram_size < 0:
            raise ValueError(f"--no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")


@dataclass
class CausalLMModelArguments(ModelArguments):
    """A GPT-2-style (Conv1D) or Llama-style decoder unless --model_name_or_path is given."""

    SCRATCH_ONLY: ClassVar[tuple[str, ...]] = (*ModelArguments.SCRATCH_ONLY, "model_type", "num_layers",
                                               "num_key_value_heads")

    model_type: str = field(
        default="gpt2", metadata={"help": "Architecture of a model built from scratch.", "choices": ["gpt2", "llama"]}
    )
    num_layers: int = field(default=6, metadata={"help": "Decoder layers."})
    num_key_value_heads: int | None = field(
        default=None, metadata={"help": "Llama only: key/value heads (grouped-query attention); default = heads."}
    )
    max_position_embeddings: int = field(default=1024, metadata={"help": "Longest sequence the model accepts."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model_type not in ("gpt2", "llama"):
            raise ValueError(f"--model_type must be gpt2 or llama, got {self.model_type!r}")
        _check_positive(self, ("num_layers", "num_key_value_heads"))
        if self.num_key_value_heads is not None:
            if self.model_type != "llama":
                raise ValueError("--num_key_value_heads only applies to --model_type llama")
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(f"--num_attention_heads {self.num_attention_heads} must be divisible by "
                                 f"--num_key_value_heads {self.num_key_value_heads}")
