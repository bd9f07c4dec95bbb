"""English-German example sentences from the Ding dictionary (Debian/Ubuntu package ``trans-de-en``).

The dictionary (``/usr/share/trans/de-en``, about 25 MB, GPL) has one entry per line::

    german side :: english side

Each side holds sub-entries separated by `` | ``, aligned by position between the two sides (the head
word, its plural, then idioms and example sentences); within a sub-entry, alternatives are separated by
``;``. Lines starting with ``#`` are comments. Many sub-entries are full example sentences
("Er lehnte die Leiter gegen die Wand." :: "He set the ladder against the wall."), which makes the file
a small, offline, freely licensed translation corpus (about 27,000 pairs with the defaults).

Cleaning, per sub-entry (see :func:`clean_ding_text`):

* annotations are removed: ``{m}``, ``{pl}``, ``{vt}`` (grammar), ``[med.]``, ``[coll.]``, ``[Br.]``
  (domain/register/region), ``<...>`` (alternative spellings/search keys), ``/HI/``-style abbreviation
  markers, and parenthesised text ``( ... )``. Parentheses are dropped (not kept without the brackets)
  because they hold explanations or optional words that the other side usually does not translate;
* the sub-entry is split on ``;`` *after* removing annotations (they may contain ``;`` themselves) and
  only the **first alternative** is kept on each side: the first alternatives are the canonical,
  mutually corresponding translations;
* whitespace is collapsed, and spaces left before punctuation by removed annotations are deleted.

Filtering (see :func:`parse_ding_line`): a line whose sides have different numbers of sub-entries is
dropped entirely (the alignment is unknown); a pair is kept only if

* both sides have between ``min_words`` (default 4) and ``max_words`` (default 50) words (a word is a
  whitespace token with a letter or digit) -- this keeps sentences and phrases, not head words;
* neither side contains ``/`` (word alternatives such as ``not/hardly`` or ``Anklang/Zustimmung`` cannot
  be resolved reliably), an ellipsis (``…``/``...``: fragments such as "It sounds crazy, but …"), the
  placeholder abbreviations ``sb.``/``sth.``/``jdn.``/``jdm.``/``jds.``/``etw.`` (dictionary templates,
  not natural text), or leftover brackets (unbalanced annotations);
* with ``sentences_only=True``: both sides also end in ``.``, ``!`` or ``?`` and the English side
  starts with a capital letter (about 16,000 pairs).

:func:`load_ding_pairs` removes exact duplicates (after cleaning, first occurrence kept) and
:func:`load_ding` splits by a stable MD5 hash of the English sentence (so one English sentence with two
German translations never straddles train and test, and pairs sharing a German sentence stay together too),
independent of file order and Python's hash seed.
"""

from __future__ import annotations

import os
import re

import datasets

from nm_hf.data._split import SplitSize, hash_split, linked_keys, resolve_size, stable_hash

DING_PATH = "/usr/share/trans/de-en"

INSTALL_HINT = (
    "The Ding English-German dictionary is the Debian/Ubuntu package 'trans-de-en'; install it with "
    "`sudo apt-get install trans-de-en` (it provides /usr/share/trans/de-en), or pass your own parallel "
    "data with --train_file (and --validation_file/--test_file), or a Hub dataset with --dataset_name."
)

# Innermost {...}, [...], <...>, (...) groups; applied repeatedly to remove nested ones.
_ANNOTATION = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]|<[^<>]*>|\([^()]*\)")
_HAS_BRACKET = re.compile(r"[{}\[\]<>()]")
# Whole-token abbreviation markers such as /HI/, /non-STEMI/.
_ABBREVIATION = re.compile(r"(?<!\S)/[^\s/]+/(?!\S)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:])")
_WHITESPACE = re.compile(r"\s+")
_PLACEHOLDER = re.compile(r"(?<![\w.])(?:sb|sth|jd|jdn|jdm|jds|etw)\.", re.IGNORECASE)
_WORD = re.compile(r"\S*[^\W_]\S*")  # a whitespace token containing a letter or digit


def clean_ding_text(text: str) -> str:
    """Clean one sub-entry side: drop annotations, keep the first ``;`` alternative, normalise spaces."""
    if _HAS_BRACKET.search(text) is not None:
        previous = None
        while previous != text:
            previous = text
            text = _ANNOTATION.sub(" ", text)
    if "/" in text:
        text = _ABBREVIATION.sub(" ", text)
    text = text.split(";", 1)[0]
    text = _WHITESPACE.sub(" ", text).strip()
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def count_words(text: str) -> int:
    """Number of whitespace tokens containing at least one letter or digit."""
    return len(_WORD.findall(text))


def _max_words_after_cleaning(raw: str) -> int:
    """Cheap upper bound of ``count_words(clean_ding_text(raw))``, to skip head words early."""
    head = raw.split(";", 1)[0]
    if _HAS_BRACKET.search(head) is None:
        # No bracket before the first ";": it separates alternatives and the first one is ``head``.
        return len(head.split())
    # Removing an annotation splits at most one token in two.
    return len(raw.split()) + raw.count("(") + raw.count("{") + raw.count("[") + raw.count("<")


def _acceptable(text: str, min_words: int, max_words: int | None, sentences_only: bool) -> bool:
    if not text or "/" in text or "…" in text or "..." in text:
        return False
    if _HAS_BRACKET.search(text) is not None:
        return False
    n = count_words(text)
    if n < min_words or (max_words is not None and n > max_words):
        return False
    if sentences_only and text[-1] not in ".!?":
        return False
    return _PLACEHOLDER.search(text) is None


def parse_ding_line(
    line: str, min_words: int = 4, max_words: int | None = 50, sentences_only: bool = False
) -> list[tuple[str, str]]:
    """Return the cleaned, filtered ``(english, german)`` sentence pairs of one dictionary line.

    Comment lines, lines without exactly one `` :: `` separator and lines whose sides have different
    sub-entry counts give ``[]``. See the module docstring for the cleaning and filtering rules.
    """
    if not line or line.startswith("#"):
        return []
    parts = line.rstrip("\r\n").split(" :: ")
    if len(parts) != 2:
        return []
    german_subs = parts[0].split("|")
    english_subs = parts[1].split("|")
    if len(german_subs) != len(english_subs):
        return []
    pairs: list[tuple[str, str]] = []
    for german_raw, english_raw in zip(german_subs, english_subs, strict=True):
        # Cleaning cannot add words (removing an annotation splits at most one token in two), so skip
        # sub-entries that are too short even before cleaning: most head words never reach the regexes.
        if (
            _max_words_after_cleaning(german_raw) < min_words
            or _max_words_after_cleaning(english_raw) < min_words
        ):
            continue
        german = clean_ding_text(german_raw)
        english = clean_ding_text(english_raw)
        if not _acceptable(german, min_words, max_words, sentences_only):
            continue
        if not _acceptable(english, min_words, max_words, sentences_only):
            continue
        if sentences_only and not english[0].isupper():
            continue
        pairs.append((english, german))
    return pairs


def _check_path(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Ding dictionary file not found: {path}. {INSTALL_HINT}")
    return path


def load_ding_pairs(
    path: str | os.PathLike[str] = DING_PATH,
    min_words: int = 4,
    max_words: int | None = 50,
    sentences_only: bool = False,
) -> list[dict[str, str]]:
    """Parse the whole dictionary into deduplicated ``{"en": ..., "de": ...}`` pairs, in file order.

    Takes about two seconds for the full 25 MB file; nothing is cached on disk.
    """
    path = _check_path(path)
    seen: set[tuple[str, str]] = set()
    out: list[dict[str, str]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            for pair in parse_ding_line(line, min_words, max_words, sentences_only):
                if pair not in seen:
                    seen.add(pair)
                    out.append({"en": pair[0], "de": pair[1]})
    return out


def split_ding_pairs(
    pairs: list[dict[str, str]], validation_size: SplitSize = 1500, test_size: SplitSize = 1500
) -> dict[str, list[dict[str, str]]]:
    """Split pairs into train/validation/test by the MD5 of the English side (file-order independent).

    Sizes are row counts (int) or fractions (float); equal English sentences stay in one split, and so do
    equal German ones (pairs linked through a shared sentence are keyed by the group's first English
    sentence, `linked_keys`), so a split can be a few rows larger than asked. Every split is in hash order, so taking its first N rows
    (``max_train_samples``) is an unbiased sample rather than the alphabetical start of the dictionary.
    """
    ordered = sorted(pairs, key=lambda p: (stable_hash(p["en"]), p["en"], p["de"]))
    n = len(ordered)
    sizes = {
        "test": resolve_size(test_size, n, "test_size"),
        "validation": resolve_size(validation_size, n, "validation_size"),
    }
    rest, carved = hash_split(linked_keys([p["en"] for p in ordered], [p["de"] for p in ordered]), sizes)
    return {
        "train": [ordered[i] for i in rest],
        "validation": [ordered[i] for i in carved["validation"]],
        "test": [ordered[i] for i in carved["test"]],
    }


def load_ding(
    path: str | os.PathLike[str] = DING_PATH,
    min_words: int = 4,
    max_words: int | None = 50,
    sentences_only: bool = False,
    validation_size: SplitSize = 1500,
    test_size: SplitSize = 1500,
) -> datasets.DatasetDict:
    """Ding example sentences as a ``datasets.DatasetDict`` (train/validation/test, column ``translation``).

    Each row is ``{"translation": {"en": ..., "de": ...}}``, the same layout as the Hub's wmt14 de-en, so
    the recipes treat Ding, local files and Hub data alike. Raises ``FileNotFoundError`` with install
    instructions when the dictionary is missing.
    """
    pairs = load_ding_pairs(path, min_words=min_words, max_words=max_words, sentences_only=sentences_only)
    if not pairs:
        raise ValueError(
            f"No sentence pairs found in {os.fspath(path)} (min_words={min_words}, max_words={max_words})"
        )
    splits = split_ding_pairs(pairs, validation_size=validation_size, test_size=test_size)
    features = datasets.Features({"translation": datasets.Translation(languages=["de", "en"])})
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict({"translation": rows}, features=features)
            for name, rows in splits.items()
        }
    )
