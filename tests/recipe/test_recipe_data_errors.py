"""Data-file errors of nm_hf.data: one line naming the flag, the file and (where it applies) the line."""

from __future__ import annotations

import gzip
import json

import pytest

from nm_hf.data import load_text_data, load_translation_data


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "hf_cache")


def test_text_file_not_utf8(tmp_path, cache_dir):
    path = tmp_path / "train.txt"
    path.write_bytes("line one\nline two\nZürich\n".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        load_text_data(train_file=str(path), cache_dir=cache_dir)
    assert str(info.value) == (f"--train_file {path}: not UTF-8 text (byte 0xfc on line 3); convert it to UTF-8, "
                               "e.g. iconv -f latin1 -t utf-8")


def test_gzipped_text_file_not_utf8(tmp_path, cache_dir):
    path = tmp_path / "valid.txt.gz"
    with gzip.open(path, "wb") as handle:
        handle.write("ok\n\xe9t\xe9\n".encode("latin-1"))
    (tmp_path / "train.txt").write_text("some text\n" * 5, encoding="utf-8")
    with pytest.raises(ValueError, match=r"--validation_file .*valid.txt.gz: not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_text_data(train_file=str(tmp_path / "train.txt"), validation_file=str(path), cache_dir=cache_dir)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_text_files(tmp_path, cache_dir, content):
    (tmp_path / "train.txt").write_text("some text\n" * 5, encoding="utf-8")
    (tmp_path / "valid.txt").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_text_data(train_file=str(tmp_path / "train.txt"), validation_file=str(tmp_path / "valid.txt"),
                       cache_dir=cache_dir)
    assert str(info.value) == f"--validation_file {tmp_path / 'valid.txt'}: the file is empty (no text)"
    (tmp_path / "empty.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"--train_file .*empty.jsonl: the file is empty \(no JSON record\)"):
        load_text_data(train_file=str(tmp_path / "empty.jsonl"), cache_dir=cache_dir)


@pytest.mark.parametrize(("record", "message"), [
    ({"text": 5}, "'text' is int (5), not a string"),
    ({"text": None}, "'text' is null (None), not a string"),
    ({"text": ["a", "b"]}, "'text' is list (['a', 'b']), not a string"),
    ({"body": "x"}, "no 'text' key (keys found: ['body']); set --text_column"),
])
def test_json_lines_with_non_string_text_name_file_and_line(tmp_path, cache_dir, record, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_text_data(train_file=str(path), cache_dir=cache_dir)
    assert str(info.value) == f"--train_file {path}, line 3: {message}"


def test_hub_dataset_with_a_non_text_column(tmp_path, cache_dir):
    data = tmp_path / "numbers"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": i}) + "\n" for i in range(20)), encoding="utf-8")
    with pytest.raises(ValueError, match=r"--dataset_name .*numbers split 'train': column 'text' does not hold "
                                         r"text \(its type: .*int64.*\); set --text_column"):
        load_text_data(dataset_name=str(data), cache_dir=cache_dir)


def test_parallel_text_not_utf8_and_empty(tmp_path, cache_dir):
    (tmp_path / "train.en").write_text("a house\nthe cat\n", encoding="utf-8")
    (tmp_path / "train.de").write_bytes("ein Haus\ndie Katze f\xfcr\n".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        load_translation_data(train_file=str(tmp_path / "train.en"), cache_dir=cache_dir)
    assert str(info.value).startswith(f"--train_file {tmp_path / 'train.de'}: not UTF-8 text (byte 0xfc on line 2)")
    (tmp_path / "train.de").write_text("ein Haus\ndie Katze\n", encoding="utf-8")
    (tmp_path / "test.en").write_text("", encoding="utf-8")
    (tmp_path / "test.de").write_text("", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_translation_data(train_file=str(tmp_path / "train.en"), test_file=str(tmp_path / "test.en"),
                              cache_dir=cache_dir)
    assert str(info.value) == f"--test_file {tmp_path / 'test.en'}: the file is empty (no text)"


def test_translation_json_lines_not_utf8_and_empty(tmp_path, cache_dir):
    path = tmp_path / "train.jsonl"
    path.write_bytes((json.dumps({"translation": {"en": "a", "de": "b"}}) + "\n").encode()
                     + '{"translation": {"en": "x", "de": "\xe4"}}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"--train_file .*train.jsonl: not UTF-8 text \(byte 0xe4 on line 2\)"):
        load_translation_data(train_file=str(path), cache_dir=cache_dir)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"--train_file .*train.jsonl: the file is empty \(no JSON record\)"):
        load_translation_data(train_file=str(path), cache_dir=cache_dir)
