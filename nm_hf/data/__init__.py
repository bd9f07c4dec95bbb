"""Data loading for the recipes: translation pairs (Hub, local files, Ding dictionary) and causal-LM text."""

from nm_hf.data.ding import DING_PATH, load_ding, load_ding_pairs, parse_ding_line, split_ding_pairs
from nm_hf.data.text import (
    group_texts,
    iter_texts,
    load_builtin_text,
    load_pydoc,
    load_stdlib_docstrings,
    load_text_data,
    tokenize_and_group,
)
from nm_hf.data.translation import iter_translation_texts, load_translation_data, read_parallel_text

__all__ = [
    "DING_PATH",
    "group_texts",
    "iter_texts",
    "iter_translation_texts",
    "load_ding",
    "load_builtin_text",
    "load_ding_pairs",
    "load_pydoc",
    "load_stdlib_docstrings",
    "load_text_data",
    "load_translation_data",
    "parse_ding_line",
    "read_parallel_text",
    "split_ding_pairs",
    "tokenize_and_group",
]
