"""Shared fixtures: one temporary model store per test session."""

from __future__ import annotations

import os
from pathlib import Path

# Tests run offline and quietly: no hub lookups, no telemetry from the Prefect test server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

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
