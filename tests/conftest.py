"""Shared fixtures: tiny random models of every supported family, built once per session.

The models are never modified by the tests (hooks are always removed), so one instance per
family is shared by test_models.py and test_engine.py. Anything that needs a modified model
builds its own.
"""

from __future__ import annotations

import pytest
import torch

import moeaudit.models  # noqa: F401  (imports nnsight, which must precede transformers.models.*)
from moeaudit.tooling.testing import random_token_corpus, tiny_random_model

FAMILIES = ("olmoe", "qwen2_moe", "deepseek_v2", "qwen3_moe", "mixtral")


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for the module (tiny models: threads only add contention on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_cache():
    """``get(family)`` -> the shared tiny random model of ``family`` (seed 0)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = tiny_random_model(family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def corpus():
    """Three ragged random-token sequences (lengths 24, 21, 18)."""
    return random_token_corpus()


@pytest.fixture(scope="session")
def clean_cache(model_cache, corpus):
    """``get(family)`` -> the engine's clean pass of that family's model over ``corpus``."""
    from moeaudit.engine import clean_pass

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = clean_pass(model_cache(family), corpus, progress=False)
        return cache[family]

    return get


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def model(family, model_cache):
    return model_cache(family)


@pytest.fixture
def clean(family, clean_cache):
    return clean_cache(family)
