"""Shared fixtures: one temporary model store per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from caiflow.models import TINY_MODEL, load_model_and_tokenizer, resolve_model


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """A storage root shared by the session, so each model is built or dequantised once."""
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="session")
def tiny_model(model_store):
    """(model, tokenizer, resolved) for the tiny random Llama with the default model's tokenizer."""
    resolved = resolve_model(TINY_MODEL, model_store)
    model, tokenizer = load_model_and_tokenizer(resolved)
    return model, tokenizer, resolved
