"""Plain-text data for causal language modelling, and the tokenize-then-group-into-blocks step.

:func:`load_text_data` returns a ``datasets.DatasetDict`` with the splits ``train``, ``validation`` and
``test`` and a single ``text`` column. Sources, first match wins:

1. ``dataset_name`` (``--dataset_name wikitext --dataset_config_name wikitext-103-raw-v1``): the real
   ``datasets.load_dataset(dataset_name, dataset_config_name)`` call; ``text_column`` is renamed ``text``.
2. ``train_file`` (plus optional ``validation_file``/``test_file``):

   * ``.txt``/``.text`` (optionally ``.gz``): ``datasets.load_dataset("text", sample_by=sample_by,
     keep_linebreaks=True)``. The default ``sample_by="line"`` makes one row per line, like wikitext-raw
     and ``run_clm.py``; since rows are concatenated by :func:`group_texts` anyway the granularity only
     matters for the validation/test carving. ``"paragraph"`` (blank-line separated) and ``"document"``
     (one row per file) are accepted too;
   * ``.json``/``.jsonl`` (optionally ``.gz``): JSON lines with a ``text_column`` string field (every
     record is checked first: an error names the file and line of a bad one).

   Files must be UTF-8 and hold some text; an error names the flag, the file and the line of a bad byte.

   Missing validation/test splits are carved out of train deterministically by a stable MD5 hash of the
   row text (identical rows stay together; blank rows are keyed by position so they spread evenly),
   ``validation_size``/``test_size`` rows each (int, or float fraction; default 5% capped at 2,000).
3. ``dataset="pydoc"`` (the default): the English help texts that ship with CPython in
   ``pydoc_data.topics.topics`` (79 topics, about 465,000 characters / 65,000 words on Python 3.11),
   split into paragraphs at blank lines (about 2,100 distinct ones -- topics repeat paragraphs of one
   another, and a repeat is kept once so that no text is in two splits -- about 53,000 words, each
   ending with a blank line so that the concatenated stream reads like the original), and into
   train/validation/test by the MD5 of
   ``"<topic>/<paragraph index>"`` (5% each by default). Paragraph-level splitting gives even split
   sizes; with 79 topics a topic-level split would be very lumpy. It is small -- a smoke-test corpus that
   needs no download, not a benchmark.
4. ``dataset="python_docs"``: the pydoc topics plus the docstrings of the standard library's modules,
   classes and functions, read from its ``.py`` sources with :mod:`ast` (tests and bundled packages left
   out, docstrings under 8 words dropped, repeats kept once): about 330,000 words on Python 3.11, five
   times pydoc, split by the MD5 of ``"<module>.<qualified name>"``. Technical English; large enough that a
   few hundred training steps do not see it many times over.

``max_train_samples``/``max_eval_samples`` keep the first N rows of train / validation and test;
``max_test_samples`` overrides the latter for test (as in the translation loader).
"""

from __future__ import annotations

import ast
import os
import re
import sysconfig
from collections.abc import Iterable
from itertools import chain
from pathlib import Path
from typing import Any

import datasets

from nm_hf.data._checks import given_files, json_records, scan_text_file
from nm_hf.data._split import (
    SPLITS,
    SplitSize,
    complete_splits,
    hash_split,
    hub_splits,
    resolve_size,
    truncate_splits,
)

TEXT_EXTENSIONS = (".txt", ".text")
JSON_EXTENSIONS = (".json", ".jsonl")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def load_pydoc_paragraphs() -> list[dict[str, str]]:
    """The paragraphs of CPython's bundled pydoc help topics as ``{"id": "<topic>/<i>", "text": ...}``.

    Topics repeat paragraphs of one another (``specialnames`` and ``customization`` share most of their
    text): a repeated paragraph is kept once, at its first occurrence, so that the split by id cannot put
    the same text in two splits.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # stripped-down Python builds may omit pydoc_data
        raise ImportError(
            "--dataset pydoc needs the standard-library module pydoc_data (missing in this Python build); "
            "pass --train_file or --dataset_name instead"
        ) from err
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for topic in sorted(topics):
        for i, paragraph in enumerate(p for p in _PARAGRAPH_BREAK.split(topics[topic]) if p.strip()):
            text = paragraph.strip("\n").rstrip() + "\n\n"
            if text not in seen:
                seen.add(text)
                rows.append({"id": f"{topic}/{i}", "text": text})
    return rows


# Standard-library folders whose docstrings are test scaffolding, generated tables or bundled third-party code.
_STDLIB_SKIP = re.compile(r"(^|/)(tests?|idle_test|site-packages|dist-packages|pydoc_data|encodings|__phello__)/"
                          r"|(^|/)test_[^/]*\.py$")
_MIN_DOCSTRING_WORDS = 8
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(tree: ast.AST, prefix: str) -> Iterable[tuple[str, str]]:
    """``(qualified name, docstring)`` for a module and every class/function in it, in source order."""
    doc = ast.get_docstring(tree, clean=True) if isinstance(tree, _DOCUMENTED) else None
    if doc:
        yield prefix, doc
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(node, f"{prefix}.{node.name}")


def load_stdlib_docstrings(stdlib_dir: str | os.PathLike[str] | None = None) -> list[dict[str, str]]:
    """Docstrings of the standard library's modules, classes and functions as ``{"id", "text"}`` rows.

    Read from the ``.py`` sources with :mod:`ast` (nothing is imported); tests, bundled packages and
    docstrings under ``_MIN_DOCSTRING_WORDS`` words are left out, repeated docstrings kept once. About
    260,000 words on CPython 3.11, four times the pydoc topics.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"--dataset python_docs: the standard library sources are missing ({root}); "
                                "pass --train_file or --dataset_name instead")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if _STDLIB_SKIP.search(relative):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=relative)
        except (SyntaxError, ValueError):  # deliberately broken files (lib2to3 data, bad encodings)
            continue
        module = relative[: -len(".py")].replace("/", ".")
        for name, doc in _docstrings(tree, module):
            if len(doc.split()) >= _MIN_DOCSTRING_WORDS and doc not in seen:
                seen.add(doc)
                rows.append({"id": name, "text": doc.strip() + "\n\n"})
    return rows


def load_python_docs() -> list[dict[str, str]]:
    """The pydoc topic paragraphs, then the standard library's docstrings; a repeated text is kept once
    (pydoc repeats paragraphs across topics), so no text is in two splits."""
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for source, part in (("pydoc", load_pydoc_paragraphs()), ("stdlib", load_stdlib_docstrings())):
        for row in part:
            if row["text"] not in seen:
                seen.add(row["text"])
                rows.append({"id": f"{source}:{row['id']}", "text": row["text"]})
    return rows


BUILTIN_TEXTS = {"pydoc": load_pydoc_paragraphs, "python_docs": load_python_docs}


def load_pydoc(validation_size: SplitSize = 0.05, test_size: SplitSize = 0.05) -> datasets.DatasetDict:
    """The pydoc help-topic paragraphs split deterministically into train/validation/test (``text`` column)."""
    return load_builtin_text("pydoc", validation_size, test_size)


def load_builtin_text(
    name: str = "pydoc", validation_size: SplitSize = 0.05, test_size: SplitSize = 0.05
) -> datasets.DatasetDict:
    """A built-in corpus (``BUILTIN_TEXTS``) split by the MD5 of each row's id into train/validation/test."""
    if name not in BUILTIN_TEXTS:
        raise ValueError(
            f"Unknown --dataset {name!r}: the built-in text datasets are {', '.join(sorted(BUILTIN_TEXTS))}; "
            f"use --dataset_name for a Hub dataset or --train_file for local files"
        )
    rows = BUILTIN_TEXTS[name]()
    n = len(rows)
    sizes = {
        "test": resolve_size(test_size, n, "test_size"),
        "validation": resolve_size(validation_size, n, "validation_size"),
    }
    rest, carved = hash_split([row["id"] for row in rows], sizes)
    index = {"train": rest, **carved}
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict({"text": [rows[i]["text"] for i in index[name]]})
            for name in SPLITS
        }
    )


def _detect_text_format(path: str, flag: str) -> str:
    base = path[: -len(".gz")] if path.endswith(".gz") else path
    if base.endswith(TEXT_EXTENSIONS):
        fmt = "text"
    elif base.endswith(JSON_EXTENSIONS):
        fmt = "json"
    else:
        raise ValueError(
            f"{flag} {path}: unknown file extension {os.path.splitext(base)[1] or '(none)'!r}; "
            f"supported: .txt/.text (one row per line) or .json/.jsonl (JSON lines), optionally .gz"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: file not found: {path}")
    return fmt


def _select_text_column(ds: datasets.Dataset, text_column: str, where: str) -> datasets.Dataset:
    if text_column not in ds.column_names:
        raise ValueError(
            f"{where}: no column {text_column!r} (columns found: {ds.column_names}); set --text_column"
        )
    feature = ds.features.get(text_column)
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"{where}: column {text_column!r} does not hold text (its type: {feature}); "
                         "set --text_column")
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds


def validate_text_jsonl(path: str, text_column: str = "text", flag: str = "--train_file") -> int:
    """Check every record of a JSON lines file has a string ``text_column``; return the number of records.

    ``datasets`` would fail deep inside pyarrow, or build a column of numbers the tokenizer chokes on
    later; this pass names the flag, the file and the (1-based) line instead. Blank lines are skipped;
    a file without records is refused.
    """
    count = 0
    for lineno, record in json_records(path, flag, example=f'{{"{text_column}": "..."}}'):
        if not isinstance(record, dict):
            raise ValueError(f"{flag} {path}, line {lineno}: expected an object, found {type(record).__name__}")
        if text_column not in record:
            raise ValueError(f"{flag} {path}, line {lineno}: no {text_column!r} key (keys found: "
                             f"{sorted(record)}); set --text_column")
        if not isinstance(record[text_column], str):
            value = record[text_column]
            raise ValueError(f"{flag} {path}, line {lineno}: {text_column!r} is "
                             f"{'null' if value is None else type(value).__name__} ({value!r}), not a string")
        count += 1
    return count


def _load_text_file(
    path: str, flag: str, text_column: str, sample_by: str, cache_dir: str | None
) -> datasets.Dataset:
    fmt = _detect_text_format(path, flag)
    if fmt == "text":
        if not scan_text_file(path, flag):
            raise ValueError(f"{flag} {path}: the file is empty (no text)")
        return datasets.load_dataset(
            "text",
            data_files=path,
            split="train",
            sample_by=sample_by,
            keep_linebreaks=True,
            cache_dir=cache_dir,
        )
    validate_text_jsonl(path, text_column, flag)
    try:
        ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
    except Exception as err:  # pyarrow/datasets errors do not name the flag
        raise ValueError(f"{flag} {path}: could not read it as JSON lines ({err})") from err
    return _select_text_column(ds, text_column, f"{flag} {path}")


def _split_keys(train: datasets.Dataset) -> list[str]:
    """The carving key of each row: its text (identical rows stay together), a blank row's position."""
    return [text if text.strip() else f"\0blank/{i}" for i, text in enumerate(train["text"])]


def load_text_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | os.PathLike[str] | None = None,
    validation_file: str | os.PathLike[str] | None = None,
    test_file: str | os.PathLike[str] | None = None,
    dataset: str = "pydoc",
    text_column: str = "text",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_test_samples: int | None = None,
    validation_size: SplitSize | None = None,
    test_size: SplitSize | None = None,
    sample_by: str = "line",
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Load causal-LM text from the Hub, local files or the bundled pydoc topics (see the module docstring).

    Returns train/validation/test with a single ``text`` column.
    """
    if sample_by not in ("line", "paragraph", "document"):
        raise ValueError(f"sample_by must be 'line', 'paragraph' or 'document', got {sample_by!r}")
    files = given_files(dataset_name, train_file, validation_file, test_file)

    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        splits = hub_splits(raw, dataset_name, lambda name, ds: _select_text_column(
            ds, text_column, f"--dataset_name {dataset_name} split {name!r}"))
        result = complete_splits(splits, _split_keys, validation_size, test_size)
    elif files:
        if "train" not in files:
            raise ValueError("--train_file is required when --validation_file/--test_file are given")
        for name, path in files.items():  # check every file before loading any (fail fast)
            _detect_text_format(path, f"--{name}_file")
        splits = {
            name: _load_text_file(path, f"--{name}_file", text_column, sample_by, cache_dir)
            for name, path in files.items()
        }
        result = complete_splits(splits, _split_keys, validation_size, test_size)
    else:
        result = load_builtin_text(
            dataset,
            validation_size=0.05 if validation_size is None else validation_size,
            test_size=0.05 if test_size is None else test_size,
        )
    test_rows = max_test_samples if max_test_samples is not None else max_eval_samples
    return truncate_splits(result, {"train": max_train_samples, "validation": max_eval_samples, "test": test_rows})


def group_texts(examples: dict[str, list[list[Any]]], block_size: int) -> dict[str, list[list[Any]]]:
    """Concatenate a batch of tokenised texts and cut it into ``block_size`` chunks (``run_clm.py`` style).

    The remainder shorter than ``block_size`` is dropped (per ``datasets.map`` batch), so every block is
    full and no padding is needed; ``labels`` is a copy of ``input_ids`` (the model shifts it).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    concatenated = {key: list(chain.from_iterable(values)) for key, values in examples.items()}
    total = (
        len(concatenated["input_ids"])
        if "input_ids" in concatenated
        else len(next(iter(concatenated.values()), []))
    )
    total = (total // block_size) * block_size
    result = {
        key: [seq[i : i + block_size] for i in range(0, total, block_size)]
        for key, seq in concatenated.items()
    }
    result["labels"] = [block.copy() for block in result["input_ids"]]
    return result


def tokenize_and_group(
    dataset_dict: datasets.DatasetDict,
    tokenizer: Any,
    block_size: int,
    num_proc: int | None = None,
    text_column: str = "text",
    add_eos: bool = False,
    batch_size: int = 1000,
) -> datasets.DatasetDict:
    """Tokenise ``text_column`` and regroup every split into ``input_ids``/``attention_mask``/``labels`` blocks.

    ``add_eos`` appends ``tokenizer.eos_token_id`` after every row (document separator) -- useful for
    corpora of independent documents; ``run_clm.py`` does not do it, so it is off by default.
    """
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True needs a tokenizer with an eos_token")
    eos_id = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        # verbose=False: rows longer than model_max_length are expected here, they are cut by group_texts.
        encoded = tokenizer(
            batch[text_column], return_attention_mask=True, return_token_type_ids=False, verbose=False
        )
        ids = [list(x) for x in encoded["input_ids"]]
        mask = [list(x) for x in encoded["attention_mask"]]
        if add_eos:
            for seq, m in zip(ids, mask, strict=True):
                seq.append(eos_id)
                m.append(1)
        return {"input_ids": ids, "attention_mask": mask}

    tokenized = dataset_dict.map(
        tokenize,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=list(next(iter(dataset_dict.values())).column_names),
        desc="Tokenizing",
    )
    return tokenized.map(
        group_texts,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        fn_kwargs={"block_size": block_size},
        desc=f"Grouping texts in blocks of {block_size}",
    )


def iter_texts(data: datasets.Dataset | datasets.DatasetDict, text_column: str = "text") -> Iterable[str]:
    """Yield the texts of a dataset (only ``train`` of a ``DatasetDict``) -- input for a tokenizer trainer."""
    ds = data["train"] if isinstance(data, datasets.DatasetDict) else data
    for batch in ds.iter(batch_size=1000):
        yield from batch[text_column]
