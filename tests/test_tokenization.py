"""Offline tokenizers: round trip, eos post-processing, save_pretrained + AutoTokenizer reload."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from nm_hf.data.ding import load_ding_pairs
from nm_hf.tokenization import train_causal_lm_tokenizer, train_translation_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "ding_sample.txt"


@pytest.fixture(scope="module")
def pairs():
    return load_ding_pairs(FIXTURE)


@pytest.fixture(scope="module")
def mt_tokenizer(pairs):
    texts = [p[lang] for p in pairs for lang in ("en", "de")] * 3
    return train_translation_tokenizer(texts, vocab_size=500, min_frequency=1)


def test_translation_special_token_ids(mt_tokenizer):
    assert (mt_tokenizer.pad_token_id, mt_tokenizer.eos_token_id, mt_tokenizer.unk_token_id) == (0, 1, 2)
    assert mt_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]


def test_translation_eos_appended_to_inputs_and_labels(mt_tokenizer):
    enc = mt_tokenizer("I need the book by Monday.", text_target="Ich brauche das Buch bis Montag.")
    assert enc["input_ids"][-1] == 1 and enc["input_ids"].count(1) == 1
    assert enc["labels"][-1] == 1 and enc["labels"].count(1) == 1
    assert set(enc) == {"input_ids", "attention_mask", "labels"}
    batch = mt_tokenizer(["kurz", "ein viel längerer Satz"], padding=True)
    assert batch["input_ids"][0][-1] == 0  # padded on the right with <pad>
    assert all(
        ids[sum(mask) - 1] == 1 for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    )


@pytest.mark.parametrize(
    "text",
    [
        "Der Fall liegt mehr als fünfzehn Jahre zurück.",
        "Größere Übel, schöne Äpfel und Öl: «Straße»!",
        "He is absolutely determined to go and there’s just no reasoning with him.",
        "Zwei  Leerzeichen, Komma,Punkt.",
    ],
)
def test_translation_round_trip(mt_tokenizer, text):
    ids = mt_tokenizer(text)["input_ids"]
    assert mt_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert mt_tokenizer.unk_token_id not in ids


def test_translation_save_and_reload(mt_tokenizer, tmp_path):
    mt_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    src, tgt = "Er lehnte die Leiter gegen die Wand.", "He set the ladder against the wall."
    assert reloaded(src, text_target=tgt) == mt_tokenizer(src, text_target=tgt)
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.unk_token_id) == (0, 1, 2)
    assert len(reloaded) == len(mt_tokenizer)
    assert reloaded.decode(reloaded(src)["input_ids"], skip_special_tokens=True) == src


def test_translation_accepts_a_generator(pairs):
    tokenizer = train_translation_tokenizer((p["de"] for p in pairs), vocab_size=300, min_frequency=1)
    assert tokenizer("Die Leiter")["input_ids"][-1] == tokenizer.eos_token_id


def test_causal_lm_tokenizer_round_trip_and_reload(tmp_path, pairs):
    texts = [p["en"] + "\n" for p in pairs] + ["def f(x):\n    return x\n"] * 5
    tokenizer = train_causal_lm_tokenizer(texts, vocab_size=400)
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    text = "def g(y):\n    return y  # ünïcödé 🙂 «»\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.eos_token_id not in ids  # GPT-2 style: nothing added automatically
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids
    assert (reloaded.eos_token_id, reloaded.pad_token_id, reloaded.bos_token_id) == (0, 1, 0)
    assert reloaded.model_input_names == ["input_ids", "attention_mask"]
