"""Shared fixtures: one temporary model store per test session."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Tests run offline and quietly: no hub lookups, no telemetry from the Prefect test server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The test Ray cluster (tests/ray_cluster.py) is one node: Ray then uses 127.0.0.1 for every address
# (its GCS, raylet and workers), instead of the machine's own network address. Read when ray is
# imported, so it is set before any test imports it; the head node inherits it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# What caiflow remembers about this machine (the measured products that decide `bf16_autocast: auto`)
# is kept for the session, not in the user's cache: set before any test module is imported (some
# resolve 'auto' when collected), and inherited by the runs the tests start as subprocesses.
os.environ["CAIFLOW_CACHE_DIR"] = tempfile.mkdtemp(prefix="caiflow-machine-cache-")

import pytest

from caiflow.models import TINY_MODEL, load_model_and_tokenizer, resolve_model

MACHINE_CACHE = Path(os.environ["CAIFLOW_CACHE_DIR"])


@pytest.fixture(scope="session", autouse=True)
def machine_cache() -> Iterator[Path]:
    """The session's machine cache (MACHINE_CACHE), removed at the end."""
    yield MACHINE_CACHE
    shutil.rmtree(MACHINE_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """A storage root shared by the session, so each model is built or dequantised once."""
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="session")
def default_model_store(tmp_path_factory) -> Path:
    """A storage root for the real default model alone, kept out of `model_store`.

    Tests copy `model_store`'s models into their own storage; with the dequantised default model
    (about 520 MB) in it, each copy would carry it too.
    """
    return tmp_path_factory.mktemp("default-model-storage")


@pytest.fixture(scope="session")
def tiny_model(model_store):
    """(model, tokenizer, resolved) for the tiny random Llama with the default model's tokenizer."""
    resolved = resolve_model(TINY_MODEL, model_store)
    model, tokenizer = load_model_and_tokenizer(resolved)
    return model, tokenizer, resolved
