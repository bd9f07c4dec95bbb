"""SparsityConfig: validation, frozen settings, strict dict form, method_args."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from nm_hf.config import SparsityConfig
from nm_hf.methods import available_methods
from nm_hf.record import config_from_record


@pytest.mark.parametrize("decay", [math.inf, -math.inf, math.nan, float("1e400")])
def test_non_finite_decay_is_refused(decay):
    with pytest.raises(ValueError, match="decay must be a finite number"):
        SparsityConfig(decay=decay)


def test_config_is_frozen_so_a_mutation_cannot_bypass_validation():
    config = SparsityConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n = 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.method = "bogus"
    changed = dataclasses.replace(config, n=1)  # the supported way, validated again
    assert changed.pattern == "1:4"
    with pytest.raises(ValueError, match="n <= m"):
        dataclasses.replace(config, n=7)


def test_from_dict_rejects_typos_with_a_suggestion():
    with pytest.raises(ValueError, match=r"'methd' \(did you mean 'method'\?\)"):
        SparsityConfig.from_dict({"n": 2, "m": 4, "methd": "ste"})
    with pytest.raises(ValueError, match="targeted_modules"):  # record keys are the record's business
        SparsityConfig.from_dict({"n": 2, "m": 4, "targeted_modules": ["a"]})


def test_round_trip_through_json_and_record():
    config = SparsityConfig(n=1, m=8, method="fixed", decay=0.0, decay_mode="decoupled",
                            target_modules=["q_proj"], exclude_modules=r".*\.0\..*")
    data = json.loads(json.dumps(config.to_dict()))
    assert SparsityConfig.from_dict(data) == config
    assert config_from_record({**data, "targeted_modules": ["x.q_proj"], "state": "finalized"}) == config


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError, match="did you mean 'sr-ste'") as info:
        SparsityConfig(method="srste")
    for name in available_methods():
        assert name in str(info.value)


def test_method_args_are_checked_by_the_method():
    with pytest.raises(ValueError, match="method 'sr-ste' has no argument"):
        SparsityConfig(method_args={"beta": 1.0})
    assert SparsityConfig(method_args={}).method_args == {}


@pytest.mark.parametrize("preset", ["all-linear", "all"])
def test_a_preset_as_exclude_modules_is_refused_when_the_config_is_built(preset):
    """It passed validation and then failed in sparsify as a regex that matched no layer."""
    with pytest.raises(ValueError, match=f"exclude_modules='{preset}': the presets select targets"):
        SparsityConfig(exclude_modules=preset)
