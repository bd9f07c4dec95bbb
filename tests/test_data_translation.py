"""load_translation_data: parallel text (plain and gz), JSON lines, Hub-style directories, Ding, errors."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from nm_hf.data.ding import count_words
from nm_hf.data.translation import iter_translation_texts, load_translation_data, resolve_parallel_files

FIXTURE = Path(__file__).parent / "fixtures" / "ding_sample.txt"

EN = [f"A man number {i} rides a red bicycle." for i in range(40)]
DE = [f"Ein Mann Nummer {i} fährt ein rotes Fahrrad." for i in range(40)]


def _write(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "hf_cache")


def test_parallel_plain_prefix_with_carved_splits(tmp_path):
    _write(tmp_path / "train.en", EN)
    _write(tmp_path / "train.de", DE)
    dsd = load_translation_data(train_file=str(tmp_path / "train"), validation_size=5, test_size=0.1)
    assert list(dsd) == ["train", "validation", "test"]
    assert [len(dsd[s]) for s in ("train", "validation", "test")] == [31, 5, 4]
    rows = [r["translation"] for split in dsd.values() for r in split]
    assert sorted(r["en"] for r in rows) == sorted(EN)
    assert all(DE[EN.index(r["en"])] == r["de"] for r in rows)  # alignment kept
    again = load_translation_data(train_file=str(tmp_path / "train"), validation_size=5, test_size=0.1)
    assert dsd["test"]["translation"] == again["test"]["translation"]


def test_parallel_gz_by_either_side_and_given_eval_files(tmp_path):
    _write(tmp_path / "train.en.gz", EN)
    _write(tmp_path / "train.de.gz", DE)
    _write(tmp_path / "val.en", EN[:3])
    _write(tmp_path / "val.de.gz", DE[:3])  # sides may differ in compression
    _write(tmp_path / "test.en.gz", EN[3:5])
    _write(tmp_path / "test.de.gz", DE[3:5])
    dsd = load_translation_data(
        source_lang="de",
        target_lang="en",
        train_file=tmp_path / "train.de.gz",
        validation_file=str(tmp_path / "val.en"),
        test_file=str(tmp_path / "test"),
    )
    assert [len(dsd[s]) for s in ("train", "validation", "test")] == [40, 3, 2]
    assert dsd["train"][0]["translation"] == {"de": DE[0], "en": EN[0]}
    assert dsd["validation"][2]["translation"]["de"] == DE[2]
    assert resolve_parallel_files(str(tmp_path / "val.de.gz"), "en", "de") == (
        str(tmp_path / "val.en"),
        str(tmp_path / "val.de.gz"),
    )


def test_max_samples_truncate_deterministically(tmp_path):
    _write(tmp_path / "train.en", EN)
    _write(tmp_path / "train.de", DE)
    _write(tmp_path / "dev.en", EN[:10])
    _write(tmp_path / "dev.de", DE[:10])
    dsd = load_translation_data(
        train_file=str(tmp_path / "train.en"),
        validation_file=str(tmp_path / "dev.en"),
        test_file=str(tmp_path / "dev.de"),
        max_train_samples=7,
        max_eval_samples=4,
        max_test_samples=2,
    )
    assert [len(dsd[s]) for s in ("train", "validation", "test")] == [7, 4, 2]
    assert [r["translation"]["en"] for r in dsd["train"]] == EN[:7]


def test_windows_line_endings_and_unicode_separators(tmp_path):
    (tmp_path / "t.en").write_bytes("one line\r\nsecond\u2028line\r\n".encode())
    (tmp_path / "t.de").write_bytes(b"eine Zeile\r\nzweite Zeile\r\n")
    dsd = load_translation_data(train_file=str(tmp_path / "t"), validation_size=0, test_size=0)
    assert [r["translation"]["en"] for r in dsd["train"]] == ["one line", "second\u2028line"]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def test_json_lines_files(tmp_path, cache_dir):
    records = [
        {"translation": {"en": e, "de": d, "fr": "x"}, "id": i}
        for i, (e, d) in enumerate(zip(EN, DE, strict=True))
    ]
    _write_jsonl(tmp_path / "train.jsonl.gz", records)
    _write_jsonl(tmp_path / "valid.json", records[:4])
    dsd = load_translation_data(
        train_file=str(tmp_path / "train.jsonl.gz"),
        validation_file=str(tmp_path / "valid.json"),
        test_size=6,
        cache_dir=cache_dir,
    )
    assert [len(dsd[s]) for s in ("train", "validation", "test")] == [34, 4, 6]
    assert dsd["train"].column_names == ["translation"]
    assert dsd["validation"][0]["translation"] == {"en": EN[0], "de": DE[0]}  # extra language dropped


def test_hub_code_path_with_a_local_dataset_directory(tmp_path, cache_dir):
    hub = tmp_path / "my_wmt"
    hub.mkdir()
    records = [{"translation": {"de": d, "en": e}} for e, d in zip(EN, DE, strict=True)]
    _write_jsonl(hub / "train.jsonl", records[:30])
    _write_jsonl(hub / "validation.jsonl", records[30:35])
    _write_jsonl(hub / "test.jsonl", records[35:])
    dsd = load_translation_data(dataset_name=str(hub), cache_dir=cache_dir, max_eval_samples=2)
    assert [len(dsd[s]) for s in ("train", "validation", "test")] == [30, 2, 2]
    assert dsd["test"][0]["translation"]["en"] == EN[35]
    with pytest.raises(ValueError, match=re.escape(f"--dataset_name {hub}") + ".*'fr'"):
        load_translation_data(dataset_name=str(hub), source_lang="fr", target_lang="de", cache_dir=cache_dir)


def test_ding_default(tmp_path):
    dsd = load_translation_data(ding_path=FIXTURE, validation_size=3, test_size=3, max_train_samples=10)
    assert len(dsd["train"]) == 10 and len(dsd["validation"]) >= 3
    texts = list(iter_translation_texts(dsd, ("en", "de")))
    assert len(texts) == 20
    with pytest.raises(FileNotFoundError, match="apt-get install trans-de-en.*--train_file"):
        load_translation_data(ding_path=tmp_path / "nope")
    with pytest.raises(ValueError, match="--dataset ding.*--source_lang fr"):
        load_translation_data(source_lang="fr", ding_path=FIXTURE)


def test_ding_length_and_sentence_filters_reach_the_loader():
    every = load_translation_data(ding_path=FIXTURE, validation_size=1, test_size=1)
    short = load_translation_data(ding_path=FIXTURE, validation_size=1, test_size=1, ding_max_words=6,
                                  ding_sentences_only=True)
    rows = [row for split in short.values() for row in split["translation"]]
    assert 0 < len(rows) < sum(len(split) for split in every.values())
    for row in rows:
        assert all(len(row[lang].split()) <= 6 and row[lang][-1] in ".!?" for lang in ("en", "de"))


def test_ding_min_words_reaches_the_loader():
    """The default minimum (4) leaves out the dictionary's short phrase entries; a lower one adds them."""
    def rows(**kwargs):
        dsd = load_translation_data(ding_path=FIXTURE, validation_size=1, test_size=1, **kwargs)
        return [row for split in dsd.values() for row in split["translation"]]

    default, phrases = rows(), rows(ding_min_words=2, ding_max_words=3)
    assert all(count_words(row[lang]) >= 4 for row in default for lang in ("en", "de"))
    assert phrases and all(2 <= count_words(row[lang]) <= 3 for row in phrases for lang in ("en", "de"))
    assert {"en": "to take leave", "de": "Abschied nehmen"} in phrases


# ---- errors name the file or the flag ----------------------------------------------------------------


def test_error_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--train_file.*missing_train.*missing_train\.en\[\.gz\]"):
        load_translation_data(train_file=str(tmp_path / "missing_train"))
    _write(tmp_path / "train.en", EN)
    with pytest.raises(FileNotFoundError, match=r"--train_file .*train\.en: .*train\.de\[\.gz\]"):
        load_translation_data(train_file=str(tmp_path / "train.en"))
    with pytest.raises(FileNotFoundError, match=r"--validation_file: file not found: .*dev\.jsonl"):
        _write(tmp_path / "train.de", DE)
        load_translation_data(train_file=str(tmp_path / "train"), validation_file=str(tmp_path / "dev.jsonl"))


def test_error_mismatched_line_counts(tmp_path):
    _write(tmp_path / "train.en", EN)
    _write(tmp_path / "train.de.gz", DE[:-1])
    pattern = r"--train_file.*train\.en has 40 lines but .*train\.de\.gz has 39 lines"
    with pytest.raises(ValueError, match=pattern):
        load_translation_data(train_file=str(tmp_path / "train"))


def test_error_missing_language_key_in_json(tmp_path, cache_dir):
    records = [{"translation": {"en": "a b", "de": "c d"}}, {"translation": {"en": "a b", "fr": "c d"}}]
    path = _write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(
        ValueError, match=re.escape(f"--train_file {path}, line 2") + r".*\['de'\].*\['en', 'fr'\]"
    ):
        load_translation_data(train_file=str(path), cache_dir=cache_dir)
    bad = tmp_path / "bad.json"
    bad.write_text('{"translation": {"en": "a", "de": "b"}}\n{"src": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json, line 2: expected .*'translation'.*\['src'\]"):
        load_translation_data(train_file=str(bad), cache_dir=cache_dir)
    bad.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json, line 1: invalid JSON"):
        load_translation_data(train_file=str(bad), cache_dir=cache_dir)


def test_error_same_languages_and_flag_conflicts(tmp_path):
    with pytest.raises(ValueError, match="--source_lang and --target_lang must differ"):
        load_translation_data(source_lang="de", target_lang="de")
    with pytest.raises(ValueError, match="--dataset_name.*--train_file"):
        load_translation_data(dataset_name="wmt14", train_file="x")
    with pytest.raises(ValueError, match="--train_file is required"):
        load_translation_data(test_file=str(tmp_path / "t"))
    with pytest.raises(ValueError, match="Unknown --dataset 'wmt'"):
        load_translation_data(dataset="wmt")


def test_error_unknown_extension(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("en,de\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"--train_file .*train\.csv: unknown file extension '\.csv'"):
        load_translation_data(train_file=str(path))
