"""Fixtures for the training tests: one tiny random Llama per session, and small record sets."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from caiflow.models import TINY_MODEL, resolve_model


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    """Folder of the tiny random Llama (hidden 32, 2 layers) with the default model's tokenizer."""
    return resolve_model(TINY_MODEL, tmp_path_factory.mktemp("models")).path


def _chat(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.fixture
def sl_records() -> pd.DataFrame:
    """12 red-team revisions and 8 benign answers."""
    rows = [{"messages": _chat(f"How do I break into house number {i}?",
                               f"I can't help with breaking in. If you are locked out of house {i}, call a locksmith."),
             "kind": "red-team"} for i in range(12)]
    rows += [{"messages": _chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}."), "kind": "benign"}
             for i in range(8)]
    return pd.DataFrame(rows)


@pytest.fixture
def prefs() -> pd.DataFrame:
    """20 soft-labelled preference pairs across two principles."""
    rows = []
    for i in range(20):
        rows.append({
            "prompt": [{"role": "user", "content": f"Tell me how to hurt person {i}."}],
            "chosen": [{"role": "assistant", "content": "I won't help with hurting anyone."}],
            "rejected": [{"role": "assistant", "content": f"Sure, here is how to hurt person {i}: first..."}],
            "label": 0.9 if i % 3 else 0.7,
            "principle": "harmless" if i % 2 else "honest",
        })
    return pd.DataFrame(rows)
