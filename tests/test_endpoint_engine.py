"""Generation through an endpoint, against a real HTTP server on 127.0.0.1 (tests/chat_server.py):
each row's seed and sampling reach the server, answers keep input order under concurrency, 429 and
5xx are retried, and token usage is counted. The llama.cpp run: tests/test_llama_server.py."""

import pytest

from caiflow.endpoint_engine import EndpointEngine
from caiflow.endpoint_scorer import EndpointError
from caiflow.generation import Sampling
from caiflow.step_config import OpenAIEndpointConfig
from tests.chat_server import ChatServer


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("CAIFLOW_TEST_KEY", "k")


def engine(server, **kw) -> EndpointEngine:
    ep = OpenAIEndpointConfig(
        base_url=server.base_url, model="gpt-4o-mini", api_key_env="CAIFLOW_TEST_KEY", **kw
    )
    return EndpointEngine(ep, backoff=0.01)


def test_rows_carry_their_seed_and_sampling_and_come_back_in_order(key):
    with ChatServer({"alpha": "privacy", "beta": "honesty"}) as server:
        eng = engine(server, max_concurrency=4)
        convs = [[{"role": "user", "content": f"Request: {w}"}] for w in ("alpha", "beta", "alpha", "x")]
        out = eng.generate(convs, Sampling(max_new_tokens=5, temperature=0.3, top_p=0.5), [7, 8, 9, 10])
        assert [o.split('"')[3] for o in out] == ["privacy", "honesty", "privacy", "other"]
        sent = sorted(server.requests, key=lambda r: r["seed"])
        assert [r["seed"] for r in sent] == [7, 8, 9, 10]
        assert {(r["max_tokens"], r["temperature"], r["top_p"]) for r in sent} == {(5, 0.3, 0.5)}
        assert eng.usage() == {"requests": 4, "prompt_tokens": 4, "completion_tokens": 4}


def test_429_and_500_are_retried_then_the_row_is_answered(key):
    with ChatServer() as server:
        server.script = ["429", "500"]
        eng = engine(server, max_concurrency=1, max_retries=3)
        assert len(eng.generate([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=4), [1])) == 1
        assert eng.usage()["requests"] == 3


def test_a_server_that_keeps_failing_gives_one_error_naming_it(key):
    with ChatServer() as server:
        server.script = ["500"] * 5
        eng = engine(server, max_concurrency=1, max_retries=2)
        with pytest.raises(EndpointError, match=r"failed 3 times generating .*check that the server is up"):
            eng.generate([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=4), [1])


def test_an_opened_answer_is_refused_before_any_request(key):
    with ChatServer() as server:
        eng = engine(server)
        opened = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I'm sorry, but"}]
        with pytest.raises(ValueError, match="cannot portably continue one"):
            eng.generate([opened], Sampling(max_new_tokens=4), [1])
        assert server.requests == []  # nothing was sent: the endpoint would have answered afresh
