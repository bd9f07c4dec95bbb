"""load_text_data (pydoc, .txt, .jsonl, Hub-style directory), group_texts and tokenize_and_group."""

from __future__ import annotations

import gzip
import json

import pytest

from nm_hf.data.text import (
    group_texts,
    iter_texts,
    load_pydoc_paragraphs,
    load_stdlib_docstrings,
    load_text_data,
    tokenize_and_group,
)
from nm_hf.tokenization import train_causal_lm_tokenizer

LINES = [f"Line {i} of a small document about sparse networks." for i in range(50)]


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "hf_cache")


def test_pydoc_default_is_deterministic_and_disjoint():
    paragraphs = load_pydoc_paragraphs()
    assert len(paragraphs) > 1000 and sum(len(p["text"]) for p in paragraphs) > 300_000
    first = load_text_data()
    second = load_text_data()
    assert list(first) == ["train", "validation", "test"]
    assert first["validation"]["text"] == second["validation"]["text"]
    assert first["train"].column_names == ["text"]
    sizes = [len(first[s]) for s in ("train", "validation", "test")]
    assert sum(sizes) == len(paragraphs) and min(sizes) > 50
    small = load_text_data(max_train_samples=10, max_eval_samples=3)
    assert [len(small[s]) for s in ("train", "validation", "test")] == [10, 3, 3]
    assert small["train"]["text"] == first["train"]["text"][:10]


def test_pydoc_splits_share_no_text():
    """pydoc topics repeat paragraphs of one another (specialnames/customization): the id split alone put
    about 40 percent of the test paragraphs verbatim into the training split."""
    texts = [row["text"] for row in load_pydoc_paragraphs()]
    assert len(texts) == len(set(texts))
    data = load_text_data(dataset="pydoc")
    train = set(data["train"]["text"])
    assert train.isdisjoint(data["validation"]["text"]) and train.isdisjoint(data["test"]["text"])
    assert set(data["validation"]["text"]).isdisjoint(data["test"]["text"])


def test_stdlib_docstrings_skip_tests_short_repeated_and_broken_files(tmp_path):
    long_doc = "Return the number of widgets in the box, counting the spare ones too."
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "pkg" / "widgets.py").write_text(
        '"""Widgets: small parts that the rest of this package is built from."""\n'
        f"class Box:\n    {long_doc!r}\n    def count(self):\n        'Too short to keep.'\n"
        f"    async def fill(self):\n        {long_doc!r}\n"
    )
    (tmp_path / "pkg" / "tests" / "helpers.py").write_text(f'"""{long_doc} (test helper)"""\n')
    (tmp_path / "test_widgets.py").write_text(f'"""{long_doc} (a test module)"""\n')
    (tmp_path / "broken.py").write_text('print "python 2 syntax with a docstring-like string of many words"\n')
    rows = load_stdlib_docstrings(tmp_path)
    assert [row["id"] for row in rows] == ["pkg.widgets", "pkg.widgets.Box"]  # fill's docstring repeats Box's
    assert rows[1]["text"] == long_doc + "\n\n"
    with pytest.raises(FileNotFoundError, match="--dataset python_docs"):
        load_stdlib_docstrings(tmp_path / "missing")


def test_python_docs_is_pydoc_plus_the_stdlib_docstrings():
    data = load_text_data(dataset="python_docs")
    pydoc = load_text_data(dataset="pydoc")
    sizes = {split: len(data[split]) for split in data}
    assert sizes["train"] > 3 * len(pydoc["train"]) and min(sizes.values()) > 200
    assert set(data["validation"]["text"]).isdisjoint(data["train"]["text"])
    assert sum(len(text.split()) for text in data["train"]["text"]) > 200_000


def test_txt_files_plain_and_gz(tmp_path, cache_dir):
    (tmp_path / "train.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    (tmp_path / "valid.txt.gz").write_bytes(gzip.compress(b"first line\nsecond line\n"))
    dsd = load_text_data(
        train_file=tmp_path / "train.txt",
        validation_file=str(tmp_path / "valid.txt.gz"),
        test_size=5,
        cache_dir=cache_dir,
    )
    assert [len(dsd[s]) for s in ("train", "validation", "test")] == [45, 2, 5]
    assert dsd["validation"]["text"] == ["first line\n", "second line\n"]  # keep_linebreaks, like run_clm
    assert sorted(t.strip() for s in ("train", "test") for t in dsd[s]["text"]) == sorted(LINES)


def test_max_test_samples_overrides_max_eval_samples_for_test(tmp_path, cache_dir):
    (tmp_path / "train.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    files = {"train_file": tmp_path / "train.txt", "validation_size": 10, "test_size": 10, "cache_dir": cache_dir}
    dsd = load_text_data(max_eval_samples=2, max_test_samples=7, **files)
    assert [len(dsd[s]) for s in ("validation", "test")] == [2, 7]
    dsd = load_text_data(max_eval_samples=3, **files)  # without it, --max_eval_samples limits test too
    assert [len(dsd[s]) for s in ("validation", "test")] == [3, 3]


def test_jsonl_with_custom_text_column(tmp_path, cache_dir):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(LINES)), encoding="utf-8"
    )
    dsd = load_text_data(train_file=str(path), text_column="body", cache_dir=cache_dir)
    assert dsd["train"].column_names == ["text"]
    assert sum(len(dsd[s]) for s in dsd) == 50 and len(dsd["validation"]) >= 1 and len(dsd["test"]) >= 1
    with pytest.raises(
        ValueError, match=r"--train_file .*docs\.jsonl, line 1: no 'text' key.*\['body', 'n'\].*--text_column"
    ):
        load_text_data(train_file=str(path), cache_dir=cache_dir)


def test_hub_code_path_with_a_local_dataset_directory(tmp_path, cache_dir):
    hub = tmp_path / "my_wikitext"
    hub.mkdir()
    for split, lines in (("train", LINES[:40]), ("validation", LINES[40:45]), ("test", LINES[45:])):
        (hub / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8"
        )
    dsd = load_text_data(dataset_name=str(hub), cache_dir=cache_dir)
    assert [len(dsd[s]) for s in ("train", "validation", "test")] == [40, 5, 5]


def test_errors_name_file_or_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--train_file: file not found: .*nothere\.txt"):
        load_text_data(train_file=str(tmp_path / "nothere.txt"))
    (tmp_path / "data.csv").write_text("a\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"--validation_file .*data\.csv: unknown file extension '\.csv'"):
        (tmp_path / "t.txt").write_text("a\n", encoding="utf-8")
        load_text_data(train_file=str(tmp_path / "t.txt"), validation_file=str(tmp_path / "data.csv"))
    with pytest.raises(ValueError, match="Unknown --dataset 'wiki'"):
        load_text_data(dataset="wiki")
    with pytest.raises(ValueError, match="--train_file is required"):
        load_text_data(test_file=str(tmp_path / "t.txt"))


def test_group_texts_drops_the_remainder():
    examples = {
        "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
        "attention_mask": [[1, 1, 1], [1, 1], [1, 1, 1, 1]],
    }
    out = group_texts(examples, block_size=4)
    assert out["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert out["labels"] == out["input_ids"] and out["labels"][0] is not out["input_ids"][0]
    assert out["attention_mask"] == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert group_texts({"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}, 4)["input_ids"] == []


def test_tokenize_and_group_blocks():
    dsd = load_text_data(max_train_samples=200, max_eval_samples=40)
    tokenizer = train_causal_lm_tokenizer(iter_texts(dsd), vocab_size=600)
    blocks = tokenize_and_group(dsd, tokenizer, block_size=32, add_eos=True)
    for split in ("train", "validation", "test"):
        assert blocks[split].column_names == ["input_ids", "attention_mask", "labels"]
        assert len(blocks[split]) > 0
        assert all(len(ids) == 32 for ids in blocks[split]["input_ids"])
    row = blocks["train"][0]
    assert row["labels"] == row["input_ids"] and set(row["attention_mask"]) == {1}
    n_eos = sum(ids.count(tokenizer.eos_token_id) for ids in blocks["train"]["input_ids"])
    assert n_eos > 0
    text = "".join(dsd["train"]["text"])
    assert tokenizer.decode(blocks["train"][0]["input_ids"], skip_special_tokens=True) in text
