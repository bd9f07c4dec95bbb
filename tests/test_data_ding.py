"""Ding dictionary parser: cleaning rules, filtering, dedup and the deterministic split."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from nm_hf.data._split import stable_hash
from nm_hf.data.ding import (
    DING_PATH,
    clean_ding_text,
    load_ding,
    load_ding_pairs,
    parse_ding_line,
    split_ding_pairs,
)

FIXTURE = Path(__file__).parent / "fixtures" / "ding_sample.txt"


def test_comment_and_headword_lines_give_nothing():
    assert parse_ding_line("# Version :: devel 2023-01-30\n") == []
    assert parse_ding_line("Aalsuppe {f} [cook.] | Aalsuppen {pl} :: eel soup | eel soups\n") == []
    assert parse_ding_line("") == []
    assert parse_ding_line("no separator on this line at all\n") == []


def test_example_sentences_are_aligned_by_position():
    line = (
        "Montag {m} /Mo/ | Ostermontag {m} [relig.] | Pfingstmontag {m} [relig.] | "
        "Ich brauche das Buch bis Montag. :: Monday /Mon/ | Easter Monday | Pentecost Monday; Whit Monday [Br.] | "
        "I need the book by Monday.\n"
    )
    assert parse_ding_line(line) == [("I need the book by Monday.", "Ich brauche das Buch bis Montag.")]


def test_unequal_subentry_counts_drop_the_line():
    line = "Das ist ein langer Beispielsatz hier. | Noch ein ganzer Satz steht hier. :: This is a long example sentence here."
    assert parse_ding_line(line) == []


def test_empty_sides_are_dropped():
    assert parse_ding_line(" :: This English side has no German side at all.\n") == []
    assert parse_ding_line("Dieser deutsche Satz hat keine Übersetzung. :: \n") == []


def test_annotations_are_removed_and_spacing_fixed():
    assert clean_ding_text("Herzindex {m} /HI/ [med.]") == "Herzindex"
    assert (
        clean_ding_text("Er hat sich (gestern) das Bein gebrochen. [med.]")
        == "Er hat sich das Bein gebrochen."
    )
    assert clean_ding_text("She arrived on time (as always (almost)).") == "She arrived on time."
    assert (
        clean_ding_text("Das Programm braucht viel Speicherplatz. <Speicher>")
        == "Das Programm braucht viel Speicherplatz."
    )
    assert clean_ding_text("  viel   Platz\t hier ") == "viel Platz hier"


def test_first_alternative_is_kept_and_semicolons_inside_brackets_do_not_split():
    line = (
        "einigermaßen {adv} | Er war einigermaßen zufrieden mit allem.; Er war halbwegs zufrieden mit allem. :: "
        "reasonably | He was reasonably happy with everything.; He was fairly happy with everything."
    )
    assert parse_ding_line(line) == [
        ("He was reasonably happy with everything.", "Er war einigermaßen zufrieden mit allem.")
    ]
    line = (
        "Er lehnte die Leiter gegen die Wand. (an der Hauswand; draußen) :: "
        "He set the ladder against the wall. (outside; on the house wall)"
    )
    assert parse_ding_line(line) == [
        ("He set the ladder against the wall.", "Er lehnte die Leiter gegen die Wand.")
    ]


def test_templates_fragments_and_slash_alternatives_are_dropped():
    assert parse_ding_line("jdm. etw. angedeihen lassen {vt} :: to provide sb. with sth.") == []
    assert parse_ding_line("Es klingt verrückt, aber … :: It sounds crazy, but …") == []
    line = "Gewalt anwenden/ausüben bei allen Leuten :: to use violence against all people"
    assert parse_ding_line(line) == []


def test_word_limits_and_sentences_only():
    line = "Das wird Gerede geben. :: Tongues will wag."
    assert parse_ding_line(line) == []  # 3 English words < min_words=4
    assert parse_ding_line(line, min_words=3) == [("Tongues will wag.", "Das wird Gerede geben.")]
    long = "Die Strafe, die man ihm aufgebrummt hat, war nicht gerechtfertigt. :: The punishment he received was not warranted."
    assert parse_ding_line(long, max_words=5) == []
    phrase = "die erhitzten Gemüter abkühlen [übtr.] :: to pour oil on troubled waters [fig.]"
    assert parse_ding_line(phrase) == [("to pour oil on troubled waters", "die erhitzten Gemüter abkühlen")]
    assert parse_ding_line(phrase, sentences_only=True) == []


def test_fixture_pairs_are_clean_and_deduplicated():
    pairs = load_ding_pairs(FIXTURE)
    keys = [(p["en"], p["de"]) for p in pairs]
    assert len(keys) == len(set(keys)) == 30
    # "I need the book by Monday." occurs in two lines of the fixture but is kept once.
    assert keys.count(("I need the book by Monday.", "Ich brauche das Buch bis Montag.")) == 1
    # One English sentence with two German translations: both kept.
    assert sum(en == "I was just about to leave." for en, _ in keys) == 2
    for en, de in keys:
        for text in (en, de):
            assert not set(text) & set("{}[]<>()/…"), text
            assert text == text.strip() and "  " not in text
    assert ("He broke his leg.", "Er hat sich das Bein gebrochen.") in keys


def test_split_is_deterministic_disjoint_and_order_independent():
    pairs = load_ding_pairs(FIXTURE)
    first = split_ding_pairs(pairs, validation_size=4, test_size=5)
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    second = split_ding_pairs(shuffled, validation_size=4, test_size=5)
    assert first == second
    assert len(first["validation"]) >= 4 and len(first["test"]) >= 5
    as_sets = {name: {(p["en"], p["de"]) for p in rows} for name, rows in first.items()}
    assert sum(len(s) for s in as_sets.values()) == len(pairs)
    assert not as_sets["train"] & as_sets["validation"]
    assert not as_sets["train"] & as_sets["test"]
    assert not as_sets["validation"] & as_sets["test"]
    # Same English sentence -> same split (no leakage of a source sentence into evaluation).
    splits_of_leave = {
        name for name, rows in first.items() for p in rows if p["en"] == "I was just about to leave."
    }
    assert len(splits_of_leave) == 1


def test_pairs_sharing_a_german_sentence_stay_in_one_split():
    """Dictionary synonyms: two English entries with one German translation. Keyed by the English side
    alone, about 4 percent of the demo's test targets were training targets too."""
    pairs = [{"en": f"sentence number {i}", "de": f"Satz Nummer {i}"} for i in range(40)]
    linked = [("to feel well", "sich gut fühlen"), ("to feel good", "sich gut fühlen"),
              ("to feel good", "sich wohl fühlen"), ("to be comfortable", "sich wohl fühlen")]
    pairs += [{"en": en, "de": de} for en, de in linked]
    for seed in range(20):  # whatever the hash order puts where, the linked pairs go together
        shuffled = pairs[:]
        random.Random(seed).shuffle(shuffled)
        splits = split_ding_pairs(shuffled, validation_size=0.3, test_size=0.3)
        where = {name for name, rows in splits.items() for p in rows if "fühlen" in p["de"]}
        assert len(where) == 1, where
        german = {name: {p["de"] for p in rows} for name, rows in splits.items()}
        assert german["train"].isdisjoint(german["test"]) and german["train"].isdisjoint(german["validation"])


def test_carved_file_splits_share_no_target_sentence(tmp_path):
    from nm_hf.data.translation import load_translation_data

    en = [f"sentence number {i}" for i in range(40)] + [f"phrase {g}, variant {v}" for g in range(20) for v in range(3)]
    de = [f"Satz Nummer {i}" for i in range(40)] + [f"Ausdruck {g}" for g in range(20) for _ in range(3)]
    (tmp_path / "train.en").write_text("\n".join(en) + "\n", encoding="utf-8")
    (tmp_path / "train.de").write_text("\n".join(de) + "\n", encoding="utf-8")
    data = load_translation_data(train_file=str(tmp_path / "train"), validation_size=20, test_size=20,
                                 cache_dir=str(tmp_path / "cache"))
    german = {name: {p["de"] for p in data[name]["translation"]} for name in data}
    assert german["train"].isdisjoint(german["test"]) and german["train"].isdisjoint(german["validation"])


def test_split_is_pinned_and_independent_of_python_hash_seed():
    # MD5-based, so these values are the same in every process (Python's own str hash is salted per run).
    assert stable_hash("I need the book by Monday.") == 5102373589371319067
    splits = split_ding_pairs(load_ding_pairs(FIXTURE), validation_size=3, test_size=3)
    assert [p["en"] for p in splits["test"]] == [
        "I was packed off to hospital.",
        "The speech lacked coherence.",
        "The bone broke in two places.",
    ]
    assert [p["en"] for p in splits["validation"]] == [
        "How are you? – Very well, thanks.",
        "to have a dinner engagement",
        "Are you on for dinner tonight?",
    ]


def test_load_ding_dataset_dict():
    dsd = load_ding(FIXTURE, validation_size=3, test_size=0.1)
    assert list(dsd) == ["train", "validation", "test"]
    assert dsd["train"].column_names == ["translation"]
    assert sum(len(ds) for ds in dsd.values()) == 30
    row = dsd["validation"][0]["translation"]
    assert set(row) == {"en", "de"} and row["en"] and row["de"]


def test_missing_file_says_how_to_install(tmp_path):
    missing = tmp_path / "de-en"
    with pytest.raises(FileNotFoundError, match=r"apt-get install trans-de-en") as info:
        load_ding_pairs(missing)
    assert str(missing) in str(info.value) and "--train_file" in str(info.value)


@pytest.mark.skipif(not os.path.exists(DING_PATH), reason="Debian package trans-de-en not installed")
def test_real_dictionary_gives_tens_of_thousands_of_pairs():
    dsd = load_ding(validation_size=1500, test_size=1500)
    assert len(dsd["train"]) > 15000
    assert 1500 <= len(dsd["validation"]) < 1600 and 1500 <= len(dsd["test"]) < 1600
