"""Shared fixtures: tiny models built offline (see tiny_models.py) and a umask of 022 where files are checked."""

from __future__ import annotations

import os

import pytest

from tiny_models import tiny_model


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tiny_gpt2():
    return tiny_model("gpt2")


@pytest.fixture
def umask_022():
    """Run the test under umask 022, the common default, so file modes are predictable."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
