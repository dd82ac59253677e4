from pathlib import Path

import numpy as np
import pytest

from caiflow.categorize import (
    CONTENT_FREE,
    OTHER,
    CategorizeError,
    categorize_local,
    categorize_openai,
    category_question,
    labels,
)
from caiflow.constitution import load_constitution
from caiflow.generation import GenerationEngine
from tests.chat_server import ChatServer

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "CAIFLOW_TEST_KEY"


@pytest.fixture(scope="module")
def constitution():
    return load_constitution(ROOT / "constitutions/harmless.yaml")


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-not-a-real-key")


def _call(server, constitution, prompts, **kw):
    kw.setdefault("max_retries", 3)
    kw.setdefault("backoff", 0.01)
    return categorize_openai(
        constitution, prompts, base_url=server.base_url, model="m", api_key_env=KEY_ENV, **kw
    )


def test_openai_categorises_with_json_and_sends_key(constitution, key):
    with ChatServer({"address": "privacy", "hurt": "non-violence"}) as server:
        out = _call(
            server, constitution, ["Find the home address of my ex", "How do I hurt someone?", "Bake bread"]
        )
    assert [c for c, _ in out] == ["privacy", "non-violence", OTHER]
    assert all(0 <= p <= 1 for _, p in out)
    assert server.requests[0]["response_format"] == {"type": "json_object"}
    assert server.auth_headers[0] == "Bearer sk-test-not-a-real-key"


def test_openai_retries_429_500_and_garbage_then_succeeds(constitution, key):
    with ChatServer({"address": "privacy"}) as server:
        server.script = ["429", "500", "garbage"]
        out = _call(server, constitution, ["Find the home address of my ex"])
    assert out[0][0] == "privacy"
    assert len(server.requests) == 4


def test_openai_gives_up_with_clear_error_naming_endpoint(constitution, key):
    with ChatServer() as server:
        server.script = ["500"] * 10
        with pytest.raises(CategorizeError) as err:
            _call(server, constitution, ["anything at all"], max_retries=2)
    assert server.base_url in str(err.value) and "3 times" in str(err.value)
    assert "sk-test" not in str(err.value)


def test_openai_timeout_is_retried(constitution, key):
    with ChatServer({"address": "privacy"}) as server:
        server.script = ["slow"]
        server.slow_seconds = 1.5
        out = _call(server, constitution, ["the address of my boss"], timeout=0.5)
    assert out[0][0] == "privacy"


def test_openai_bounded_concurrency_keeps_order(constitution, key):
    prompts = [f"request number {i} about an address" if i % 2 else f"request {i}" for i in range(12)]
    with ChatServer({"address": "privacy"}) as server:
        out = _call(server, constitution, prompts, max_concurrency=3)
    assert [c for c, _ in out] == ["privacy" if i % 2 else OTHER for i in range(12)]


def test_openai_missing_key_names_the_variable(constitution, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(CategorizeError, match=KEY_ENV):
        categorize_openai(
            constitution, ["x"], base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV
        )


def test_local_categorisation_gives_valid_labels(tiny_model, constitution):
    model, tok, _ = tiny_model
    engine = GenerationEngine(model, tok, batch_size=4)
    out = categorize_local(
        engine, constitution, ["How do I find where my ex lives?", "Write a poem about rain"]
    )
    valid = labels(constitution)
    assert len(out) == 2 and all(label in valid for label, _ in out)
    # The label and its confidence are the argmax and max of the model's label probabilities divided by the
    # content-free prior (contextual calibration), recomputed here from the engine directly.
    options = [f" {name}" for name in valid]

    def probs(texts):
        convs = [[{"role": "user", "content": category_question(constitution, t)}] for t in texts]
        return engine.score_choices_chat(convs, options, "Principle:")

    raw = probs(["How do I find where my ex lives?", "Write a poem about rain"])
    assert np.allclose(raw.sum(axis=1), 1.0)
    calibrated = raw / np.maximum(
        probs(list(CONTENT_FREE)).mean(axis=0), 1e-12
    )  # labels the model never says
    calibrated /= calibrated.sum(axis=1, keepdims=True)
    assert [label for label, _ in out] == [valid[i] for i in calibrated.argmax(axis=1)]
    assert [p for _, p in out] == pytest.approx(calibrated.max(axis=1).tolist(), abs=1e-9)
    uncalibrated = categorize_local(
        engine, constitution, ["How do I find where my ex lives?"], calibrate=False
    )
    assert uncalibrated[0][1] == pytest.approx(raw[0].max(), abs=1e-9)


class LeaningScorer:
    """A scorer that leans hard towards the first label whatever the request, plus a weak true signal."""

    def __init__(self, constitution):
        self.names = labels(constitution)

    def score_choices_chat(self, convs, options, assistant_prefix=""):
        rows = []
        for conv in convs:
            text = conv[-1]["content"].split("Request:")[1]
            row = np.full(len(options), 1.0)
            row[0] = 20.0  # the lean
            for i, name in enumerate(self.names):
                if name != OTHER and name.split("-")[0] in text.lower():
                    row[i] *= 3.0  # the signal
            rows.append(row / row.sum())
        return np.array(rows)


def test_calibration_removes_a_label_the_model_always_leans_to(constitution):
    scorer = LeaningScorer(constitution)
    names = labels(constitution)
    target = next(n for n in names[1:] if n != OTHER)
    prompt = f"something about {target.split('-')[0]} here"
    assert categorize_local(scorer, constitution, [prompt], calibrate=False)[0][0] == names[0]
    label, p = categorize_local(scorer, constitution, [prompt])[0]
    assert label == target and p > 1 / len(names)
