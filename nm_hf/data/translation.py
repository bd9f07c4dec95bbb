"""Translation data from the Hub, from local files, or from the bundled-with-Debian Ding dictionary.

:func:`load_translation_data` always returns a ``datasets.DatasetDict`` with the splits ``train``,
``validation`` and ``test`` and the single column ``translation`` holding
``{source_lang: ..., target_lang: ...}``, the layout of the Hub's wmt14/wmt16/opus datasets, so recipes
need one preprocessing function for every source. Sources, first match wins:

1. ``dataset_name`` (``--dataset_name wmt14 --dataset_config_name de-en``): the real
   ``datasets.load_dataset(dataset_name, dataset_config_name)`` call (a Hub id or a local dataset
   directory holding data files). Split names ``valid``/``dev`` are renamed ``validation``. Datasets with
   plain ``source_lang``/``target_lang`` columns instead of ``translation`` are accepted too.
2. ``train_file`` (plus optional ``validation_file``/``test_file``), in one of two formats:

   * **JSON lines** -- ``*.json``, ``*.jsonl`` (optionally ``.gz``), one
     ``{"translation": {"en": "...", "de": "..."}}`` object per line, loaded with
     ``datasets.load_dataset("json", data_files=...)`` after a validation pass that reports the file and
     line of a bad record;
   * **parallel plain text** -- two line-aligned UTF-8 files, one sentence per line, named
     ``<prefix>.<lang>`` or ``<prefix>.<lang>.gz`` (Moses/fairseq convention, as in Multi30k's
     ``train.en.gz``/``train.de.gz``). Pass either the prefix (``--train_file data/train``) or one side
     (``--train_file data/train.en`` or ``data/train.de.gz``): the other side is found by replacing the
     language suffix (compressed or not). Lines are split on ``"\\n"`` only (a trailing newline does
     not make an extra line; ``\\r`` is stripped) and kept as they are, empty ones included, so line
     ``i`` of both files stays aligned with line ``i`` of any reference file.

   Every file must be UTF-8 text and hold something: a bad byte, an empty file or a bad JSON record is
   reported with the flag, the file and (where it applies) the line, before ``datasets`` reads it.

   ``validation``/``test`` splits whose file is not given are carved out of the training file
   deterministically: by a stable MD5 hash of the source sentence (so identical source sentences stay in
   one split, and so do pairs sharing a target sentence), ``validation_size``/``test_size`` rows each (an int, or a float fraction; default 5% of
   the training rows capped at 2,000). The same applies to Hub datasets lacking those splits.
3. ``dataset="ding"`` (the default): English-German example sentences of the Ding dictionary, see
   :mod:`nm_hf.data.ding` (``validation_size``/``test_size`` default to 1,500 pairs each).

``max_train_samples`` keeps the first N training rows, ``max_eval_samples`` the first N validation (and
test) rows, ``max_test_samples`` overrides it for test. Ding splits are stored in hash order, so "first N"
is an unbiased sample; for files it is the first N lines, as in the transformers examples.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import datasets

from nm_hf.data._checks import given_files, json_records, open_text, scan_text_file
from nm_hf.data._split import SplitSize, complete_splits, hub_splits, linked_keys, truncate_splits
from nm_hf.data.ding import DING_PATH, load_ding

JSON_EXTENSIONS = (".json", ".jsonl")


def _strip_gz(path: str) -> str:
    return path[: -len(".gz")] if path.endswith(".gz") else path


def _first_existing(*candidates: str) -> str | None:
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    return None


def resolve_parallel_files(
    path: str, source_lang: str, target_lang: str, flag: str = "--train_file"
) -> tuple[str, str]:
    """Find the ``(source, target)`` files of a parallel pair from a prefix or from either side's path.

    ``data/train``, ``data/train.en`` and ``data/train.de.gz`` all resolve to ``data/train.en[.gz]`` and
    ``data/train.de[.gz]`` (each side may independently be gzipped).
    """
    base = _strip_gz(path)
    prefix = base
    for lang in (source_lang, target_lang):
        if base.endswith("." + lang):
            prefix = base[: -len(lang) - 1]
            break
    found: dict[str, str] = {}
    missing: list[str] = []
    for lang in (source_lang, target_lang):
        candidate = _first_existing(f"{prefix}.{lang}", f"{prefix}.{lang}.gz")
        if candidate is None:
            missing.append(f"{prefix}.{lang}[.gz]")
        else:
            found[lang] = candidate
    if missing:
        raise FileNotFoundError(
            f"{flag} {path}: parallel text file(s) not found: {', '.join(missing)}. Expected line-aligned files "
            f"<prefix>.{source_lang} and <prefix>.{target_lang} (optionally .gz), or a JSON lines file "
            f"(.json/.jsonl) with a 'translation' column."
        )
    return found[source_lang], found[target_lang]


def detect_translation_format(
    path: str, source_lang: str, target_lang: str, flag: str = "--train_file"
) -> str:
    """Return ``"json"`` or ``"parallel"`` for a ``--*_file`` argument, or raise a clear error."""
    base = _strip_gz(path)
    if base.endswith(JSON_EXTENSIONS):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag}: file not found: {path}")
        return "json"
    if base.endswith(("." + source_lang, "." + target_lang)):
        return "parallel"
    if _first_existing(
        f"{base}.{source_lang}",
        f"{base}.{source_lang}.gz",
        f"{base}.{target_lang}",
        f"{base}.{target_lang}.gz",
    ):
        return "parallel"
    if os.path.isfile(path):
        raise ValueError(
            f"{flag} {path}: unknown file extension {os.path.splitext(base)[1] or '(none)'!r}. Supported: JSON lines "
            f"(.json, .jsonl, optionally .gz) or parallel text <prefix>.{source_lang} + <prefix>.{target_lang} "
            f"(optionally .gz; pass the prefix or either file)."
        )
    raise FileNotFoundError(
        f"{flag}: file not found: {path} (also looked for the parallel text files {base}.{source_lang}[.gz] and "
        f"{base}.{target_lang}[.gz])"
    )


def read_lines(path: str) -> list[str]:
    """Lines of a UTF-8 (optionally gzipped) text file, split on ``\\n`` only, without a trailing empty line."""
    with open_text(path) as f:
        text = f.read()
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_parallel_text(
    path: str, source_lang: str, target_lang: str, flag: str = "--train_file"
) -> list[dict[str, str]]:
    """Read a line-aligned parallel pair into ``[{source_lang: ..., target_lang: ...}, ...]``.

    Both files must be UTF-8 and hold some text (errors name the flag, the file and the line).
    """
    source_path, target_path = resolve_parallel_files(path, source_lang, target_lang, flag)
    for side in (source_path, target_path):
        if not scan_text_file(side, flag):
            raise ValueError(f"{flag} {side}: the file is empty (no text)")
    source_lines = read_lines(source_path)
    target_lines = read_lines(target_path)
    if len(source_lines) != len(target_lines):
        raise ValueError(
            f"{flag}: parallel files are not line-aligned: {source_path} has {len(source_lines)} lines but "
            f"{target_path} has {len(target_lines)} lines."
        )
    return [{source_lang: s, target_lang: t} for s, t in zip(source_lines, target_lines, strict=True)]


def validate_translation_jsonl(
    path: str, source_lang: str, target_lang: str, flag: str = "--train_file"
) -> int:
    """Check every record of a JSON lines file has ``translation.<source_lang>`` and ``<target_lang>``.

    ``datasets`` would either fail deep inside pyarrow or silently fill missing keys with ``None``; this
    pass names the file, the (1-based) line and the keys found instead; a file that is not UTF-8 or holds
    no record is refused the same way. Returns the number of records.
    """
    count = 0
    for lineno, record in json_records(path, flag):
        if not isinstance(record, dict) or not isinstance(record.get("translation"), dict):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{flag} {path}, line {lineno}: expected an object with a 'translation' object, "
                f'e.g. {{"translation": {{"{source_lang}": "...", "{target_lang}": "..."}}}}; found keys {found}'
            )
        translation = record["translation"]
        missing = [lang for lang in (source_lang, target_lang) if not isinstance(translation.get(lang), str)]
        if missing:
            raise ValueError(
                f"{flag} {path}, line {lineno}: language key(s) {missing} missing (or not a string) in "
                f"'translation'; keys found: {sorted(translation)} (check --source_lang/--target_lang)"
            )
        count += 1
    return count


def _only_translation(ds: datasets.Dataset, source_lang: str, target_lang: str) -> datasets.Dataset:
    """Keep only the ``translation`` column, restricted to the two languages."""
    ds = ds.select_columns(["translation"])
    feature = ds.features["translation"]
    languages = list(
        getattr(feature, "languages", None) or (feature.keys() if isinstance(feature, dict) else [])
    )
    if sorted(languages) != sorted([source_lang, target_lang]):
        features = datasets.Features(
            {"translation": {source_lang: datasets.Value("string"), target_lang: datasets.Value("string")}}
        )
        ds = ds.map(
            lambda ex: {
                "translation": {
                    source_lang: ex["translation"][source_lang],
                    target_lang: ex["translation"][target_lang],
                }
            },
            features=features,
        )
    return ds


def _load_file(
    path: str, source_lang: str, target_lang: str, flag: str, cache_dir: str | None
) -> datasets.Dataset:
    fmt = detect_translation_format(path, source_lang, target_lang, flag)
    if fmt == "json":
        validate_translation_jsonl(path, source_lang, target_lang, flag)
        ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
        return _only_translation(ds, source_lang, target_lang)
    rows = read_parallel_text(path, source_lang, target_lang, flag)
    features = datasets.Features(
        {"translation": datasets.Translation(languages=sorted([source_lang, target_lang]))}
    )
    return datasets.Dataset.from_dict({"translation": rows}, features=features)


def _pair_keys(source_lang: str, target_lang: str) -> Callable[[datasets.Dataset], list[str]]:
    """The carving key of each row: its source sentence, shared by every pair linked to it through an equal
    source or target sentence (`linked_keys`: no sentence of either side in two splits)."""
    def keys(train: datasets.Dataset) -> list[str]:
        rows = train["translation"]
        return linked_keys([row[source_lang] for row in rows], [row[target_lang] for row in rows])
    return keys


def _normalise_hub_split(
    name: str, ds: datasets.Dataset, source_lang: str, target_lang: str, dataset_name: str
) -> datasets.Dataset:
    """One split of a Hub dataset as a `translation` column of the two languages."""
    if "translation" in ds.column_names:
        feature = ds.features["translation"]
        languages = getattr(feature, "languages", None) or (
            list(feature) if isinstance(feature, dict) else []
        )
        missing = [lang for lang in (source_lang, target_lang) if lang not in languages]
        if missing:
            raise ValueError(
                f"--dataset_name {dataset_name}: split {name!r} has no language(s) {missing} in its 'translation' "
                f"column (languages found: {sorted(languages)}); check --source_lang/--target_lang/--dataset_config_name"
            )
    elif source_lang in ds.column_names and target_lang in ds.column_names:
        ds = ds.map(
            lambda ex: {"translation": {source_lang: ex[source_lang], target_lang: ex[target_lang]}},
            remove_columns=ds.column_names,
        )
    else:
        raise ValueError(
            f"--dataset_name {dataset_name}: split {name!r} has neither a 'translation' column nor "
            f"'{source_lang}'/'{target_lang}' columns (columns found: {ds.column_names})"
        )
    return _only_translation(ds, source_lang, target_lang)


def load_translation_data(
    source_lang: str = "en",
    target_lang: str = "de",
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | os.PathLike[str] | None = None,
    validation_file: str | os.PathLike[str] | None = None,
    test_file: str | os.PathLike[str] | None = None,
    dataset: str = "ding",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_test_samples: int | None = None,
    validation_size: SplitSize | None = None,
    test_size: SplitSize | None = None,
    ding_path: str | os.PathLike[str] = DING_PATH,
    ding_min_words: int = 4,
    ding_max_words: int | None = 50,
    ding_sentences_only: bool = False,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Load translation data from the Hub, local files or the Ding dictionary (see the module docstring).

    Returns train/validation/test with one ``translation`` column of ``{source_lang, target_lang}`` dicts.
    """
    if source_lang == target_lang:
        raise ValueError(f"--source_lang and --target_lang must differ (both are {source_lang!r})")
    files = given_files(dataset_name, train_file, validation_file, test_file)

    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        splits = hub_splits(raw, dataset_name, lambda name, ds: _normalise_hub_split(
            name, ds, source_lang, target_lang, dataset_name))
        result = complete_splits(splits, _pair_keys(source_lang, target_lang), validation_size, test_size)
    elif files:
        if "train" not in files:
            raise ValueError(
                "--train_file is required when --validation_file/--test_file are given "
                "(or use --dataset_name / --dataset ding)"
            )
        for name, path in files.items():  # check every file before loading any (fail fast)
            if detect_translation_format(path, source_lang, target_lang, f"--{name}_file") == "parallel":
                resolve_parallel_files(path, source_lang, target_lang, f"--{name}_file")
        splits = {
            name: _load_file(path, source_lang, target_lang, f"--{name}_file", cache_dir)
            for name, path in files.items()
        }
        result = complete_splits(splits, _pair_keys(source_lang, target_lang), validation_size, test_size)
    elif dataset == "ding":
        if {source_lang, target_lang} != {"en", "de"}:
            raise ValueError(
                f"--dataset ding only has English-German pairs; got --source_lang {source_lang} --target_lang "
                f"{target_lang}. Use --train_file or --dataset_name for other languages."
            )
        result = load_ding(
            ding_path,
            min_words=ding_min_words,
            max_words=ding_max_words,
            sentences_only=ding_sentences_only,
            validation_size=1500 if validation_size is None else validation_size,
            test_size=1500 if test_size is None else test_size,
        )
    else:
        raise ValueError(
            f"Unknown --dataset {dataset!r}: the only built-in translation dataset is 'ding'; "
            f"use --dataset_name for a Hub dataset or --train_file for local files"
        )

    return truncate_splits(result, {
        "train": max_train_samples,
        "validation": max_eval_samples,
        "test": max_test_samples if max_test_samples is not None else max_eval_samples,
    })


def iter_translation_texts(
    data: datasets.Dataset | datasets.DatasetDict, languages: tuple[str, ...] = ("en", "de")
) -> Iterator[str]:
    """Yield every sentence of every language -- the input for a joint BPE tokenizer.

    For a ``DatasetDict`` only the ``train`` split is used, so the vocabulary never sees test sentences.
    """
    ds = data["train"] if isinstance(data, datasets.DatasetDict) else data
    for batch in ds.iter(batch_size=1000):
        for row in batch["translation"]:
            for lang in languages:
                yield row[lang]
