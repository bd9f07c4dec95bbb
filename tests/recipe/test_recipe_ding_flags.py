"""The translation recipe hands its --ding_* flags to the data loader (none of them is dropped on the way)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "translation.py"


class Stop(Exception):
    """Raised by the stand-in loader: nothing after data loading needs to run."""


def test_ding_word_limits_reach_load_translation_data(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("recipe_translation_ding_flags", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    seen: dict = {}

    def loader(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(recipe, "load_translation_data", loader)
    with pytest.raises(Stop):
        recipe.main(["--ding_min_words", "2", "--ding_max_words", "6", "--ding_sentences_only",
                     "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none"])
    assert (seen["ding_min_words"], seen["ding_max_words"], seen["ding_sentences_only"]) == (2, 6, True)
