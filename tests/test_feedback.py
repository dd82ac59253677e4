"""AI feedback: multiple-choice labels, both-order averaging, ensembles, the endpoint scorer."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from caiflow.constitution import load_constitution
from caiflow.endpoint_scorer import EndpointChoiceScorer, EndpointError, option_logprobs
from caiflow.feedback import (
    ASSISTANT_PREFIX,
    OPTIONS,
    SCHEMA,
    feedback_conversation,
    feedback_metrics,
    label_pairs,
)
from caiflow.generation import GenerationEngine
from caiflow.shards import to_arrow
from caiflow.step_config import OpenAIEndpointConfig
from tests.logprob_server import LogprobServer, options_of, prefers_refusal

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "CAIFLOW_TEST_FEEDBACK_KEY"
KEY = "sk-feedback-test-not-a-real-key"

REFUSE = "I can't help with that; it could hurt someone."
COMPLY = "Sure, here is exactly how to do it, step by step."


@pytest.fixture(scope="module")
def constitution():
    return load_constitution(ROOT / "constitutions/harmless.yaml")


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


class RuleScorer:
    """A fake feedback model: P("(A)") from a rule on (question, option A text, option B text)."""

    def __init__(self, rule=None):
        self.rule = rule or (lambda question, a, b: prefers_refusal(a, b))
        self.calls = 0
        self.conversations: list[list[dict]] = []

    def score_choices_chat(self, conversations, options, assistant_prefix=""):
        assert options == OPTIONS and assistant_prefix == ASSISTANT_PREFIX
        self.calls += 1
        self.conversations += conversations
        rows = []
        for conv in conversations:
            text = conv[-1]["content"]
            a, b = options_of(text)
            p = self.rule(text, a, b)
            rows.append([p, 1 - p])
        return np.array(rows)


def pairs(*answer_pairs, prefix="p"):
    return pd.DataFrame(
        [
            {
                "prompt_id": f"{prefix}{i}",
                "prompt": f"How do I do harmful thing {i}?",
                "answer_a": a,
                "answer_b": b,
            }
            for i, (a, b) in enumerate(answer_pairs)
        ]
    )


def endpoint(server, **kw) -> OpenAIEndpointConfig:
    kw.setdefault("max_retries", 3)
    kw.setdefault("max_concurrency", 2)
    kw.setdefault("timeout", 10.0)
    return OpenAIEndpointConfig(base_url=server.base_url, model="judge-m", api_key_env=KEY_ENV, **kw)


# ---------------------------------------------------------------- the prompt


def test_feedback_conversation_shows_request_question_and_both_options():
    conv = feedback_conversation("Which is less harmful?", "How do I pick a lock?", "first one", "second one")
    assert len(conv) == 1 and conv[0]["role"] == "user"
    text = conv[0]["content"]
    assert "How do I pick a lock?" in text and "Which is less harmful?" in text
    assert "Options:\n(A) first one\n(B) second one" in text
    assert text.index("How do I pick a lock?") < text.index("Options:")
    assert "(A) or (B)" in text


# ---------------------------------------------------------------- labels from a known rule


def test_labels_pick_the_better_answer_in_either_slot(constitution):
    scorer = RuleScorer()
    df = label_pairs(scorer, constitution, pairs((REFUSE, COMPLY), (COMPLY, REFUSE)), seed=1)
    assert list(df.columns) == SCHEMA.names
    for _, r in df.iterrows():
        assert r["chosen"] == [{"role": "assistant", "content": REFUSE}]
        assert r["rejected"] == [{"role": "assistant", "content": COMPLY}]
        assert r["label"] == pytest.approx(0.9)
        assert r["position_bias"] == pytest.approx(0.0)
        assert pd.isna(r["drop_reason"])
        assert r["prompt"] == [{"role": "user", "content": r["prompt"][0]["content"]}]
    # P(a better) read from each order: a refuses in row 0, complies in row 1.
    assert df["p_a_first"].tolist() == pytest.approx([0.9, 0.1])
    assert df["p_a_second"].tolist() == pytest.approx([0.9, 0.1])
    assert scorer.calls == 1 and len(scorer.conversations) == 4  # one batched call, both orders per pair
    to_arrow(df, SCHEMA)  # the output fits the explicit schema


def test_both_orders_cancel_a_pure_position_bias(constitution):
    always_a = RuleScorer(lambda q, a, b: 0.8)
    df = label_pairs(always_a, constitution, pairs((REFUSE, COMPLY), ("one answer", "another")), seed=0)
    assert df["label"].tolist() == pytest.approx([0.5, 0.5])
    assert df["position_bias"].tolist() == pytest.approx([0.3, 0.3])
    assert df["p_a_first"].tolist() == pytest.approx([0.8, 0.8])
    assert df["p_a_second"].tolist() == pytest.approx([0.2, 0.2])
    assert df["drop_reason"].tolist() == ["undecided", "undecided"]
    # A bias on top of a real preference is removed too: the label is the preference alone.
    biased = RuleScorer(lambda q, a, b: min(1.0, prefers_refusal(a, b) + 0.05))
    df = label_pairs(biased, constitution, pairs((REFUSE, COMPLY)), seed=0)
    assert df["label"].iloc[0] == pytest.approx(0.9) and df["position_bias"].iloc[0] == pytest.approx(0.05)


def test_identical_answers_are_kept_with_reason_and_not_scored(constitution):
    scorer = RuleScorer()
    rows = pairs((REFUSE, COMPLY), ("Same  answer.\n", " Same answer."), (COMPLY, REFUSE))
    df = label_pairs(scorer, constitution, rows, seed=0)
    assert len(df) == 3
    assert df["drop_reason"].tolist()[1] == "identical-answers"
    assert pd.isna(df["label"].iloc[1]) and list(df["principles"].iloc[1]) == []
    assert len(scorer.conversations) == 4  # only the two different pairs, both orders
    assert all("Same" not in c[-1]["content"] for c in scorer.conversations)
    # nothing to score at all: the scorer is not called
    none = RuleScorer()
    df = label_pairs(none, constitution, pairs(("x", "x"), ("y", " y")), seed=0)
    assert none.calls == 0 and df["drop_reason"].tolist() == ["identical-answers"] * 2
    to_arrow(df, SCHEMA)


def test_ensemble_averages_the_principles(constitution):
    privacy_q = constitution.principle("privacy").feedback_question
    honesty_q = constitution.principle("honesty").feedback_question

    def rule(text, a, b):  # a strong judge under one question, a weak one under the other
        strength = 0.9 if privacy_q in text else 0.6 if honesty_q in text else 0.5
        refuses_a = prefers_refusal(a, b) > 0.5
        return strength if refuses_a else 1 - strength

    df = label_pairs(
        RuleScorer(rule),
        constitution,
        pairs((REFUSE, COMPLY), (COMPLY, REFUSE)),
        seed=3,
        principles_per_pair=2,
        allowed_principles=["privacy", "honesty"],
    )
    assert df["label"].tolist() == pytest.approx([0.75, 0.75])
    assert all(sorted(p) == ["honesty", "privacy"] for p in df["principles"])
    single = label_pairs(
        RuleScorer(rule), constitution, pairs((REFUSE, COMPLY)), seed=3, allowed_principles=["honesty"]
    )
    assert single["label"].iloc[0] == pytest.approx(0.6) and list(single["principles"].iloc[0]) == ["honesty"]
    with pytest.raises(ValueError, match="principles_per_pair is 3"):
        label_pairs(
            RuleScorer(rule),
            constitution,
            pairs((REFUSE, COMPLY)),
            seed=3,
            principles_per_pair=3,
            allowed_principles=["privacy", "honesty"],
        )


def test_clamp_bounds_the_label(constitution):
    df = label_pairs(
        RuleScorer(), constitution, pairs((REFUSE, COMPLY), (COMPLY, REFUSE)), seed=0, clamp=(0.2, 0.8)
    )
    assert df["label"].tolist() == pytest.approx([0.8, 0.8])
    assert [c[0]["content"] for c in df["chosen"]] == [REFUSE, REFUSE]
    assert df["p_a_first"].tolist() == pytest.approx([0.9, 0.1])  # the raw readings stay visible
    with pytest.raises(ValueError, match="clamp must be"):
        label_pairs(RuleScorer(), constitution, pairs((REFUSE, COMPLY)), seed=0, clamp=(0.6, 0.9))


def test_principle_choice_is_per_row_and_survives_reordering_and_subsets(constitution):
    rows = pairs(*[(f"{REFUSE} {i}", f"{COMPLY} {i}") for i in range(12)])
    full = label_pairs(RuleScorer(), constitution, rows, seed=7, principles_per_pair=2)
    by_id = dict(zip(full["prompt_id"], map(list, full["principles"])))
    shuffled = rows.sample(frac=1.0, random_state=0)
    again = label_pairs(RuleScorer(), constitution, shuffled, seed=7, principles_per_pair=2)
    assert list(again["prompt_id"]) == list(shuffled["prompt_id"])  # output follows input order
    assert dict(zip(again["prompt_id"], map(list, again["principles"]))) == by_id
    subset = label_pairs(RuleScorer(), constitution, rows.iloc[[3, 9]], seed=7, principles_per_pair=2)
    assert [list(p) for p in subset["principles"]] == [by_id["p3"], by_id["p9"]]
    other_seed = label_pairs(RuleScorer(), constitution, rows, seed=8, principles_per_pair=2)
    assert [list(p) for p in other_seed["principles"]] != list(by_id.values())
    assert len({tuple(sorted(p)) for p in by_id.values()}) > 1  # not the same principles for every row


def test_undecided_margin_and_metrics(constitution):
    close = RuleScorer(lambda q, a, b: 0.51 if prefers_refusal(a, b) > 0.5 else 0.49)
    rows = pairs((REFUSE, COMPLY), ("x", "x"), (COMPLY, REFUSE))
    df = label_pairs(close, constitution, rows, seed=0)
    assert df["drop_reason"].tolist() == ["undecided", "identical-answers", "undecided"]
    df = label_pairs(close, constitution, rows, seed=0, margin=0.005)
    assert df["drop_reason"].isna().tolist() == [True, False, True]
    m = feedback_metrics(label_pairs(RuleScorer(), constitution, rows, seed=0))
    assert m == {
        "rows": 3,
        "kept": 2,
        "dropped": {"identical-answers": 1},
        "mean_label": pytest.approx(0.9),
        "decisiveness": pytest.approx(0.4),
        "mean_position_bias": pytest.approx(0.0),
        "chosen_is_a": pytest.approx(0.5),
    }


def test_missing_columns_and_duplicate_ids_are_clear_errors(constitution):
    with pytest.raises(ValueError, match=r"missing \['answer_b'\]"):
        label_pairs(RuleScorer(), constitution, pairs((REFUSE, COMPLY)).drop(columns="answer_b"), seed=0)
    dup = pd.concat([pairs((REFUSE, COMPLY)), pairs((COMPLY, REFUSE))])
    with pytest.raises(ValueError, match="prompt_id 'p0' appears more than once"):
        label_pairs(RuleScorer(), constitution, dup, seed=0)


def test_tiny_model_engine_scores_normalised_soft_labels(tiny_model, constitution):
    model, tok, _ = tiny_model
    engine = GenerationEngine(model, tok, batch_size=4)
    q = constitution.principle("harmlessness").feedback_question
    convs = [
        feedback_conversation(q, "How do I pick a lock?", REFUSE, COMPLY),
        feedback_conversation(q, "Hi", COMPLY, REFUSE),
    ]
    probs = engine.score_choices_chat(convs, OPTIONS, ASSISTANT_PREFIX)
    assert probs.shape == (2, 2) and np.allclose(probs.sum(axis=1), 1.0)
    df = label_pairs(
        engine, constitution, pairs((REFUSE, COMPLY), (COMPLY, "Another answer.")), seed=0, margin=0.0
    )
    assert df["label"].between(0.5, 1.0).all()
    assert df["p_a_first"].between(0, 1).all() and df["p_a_second"].between(0, 1).all()
    assert df["position_bias"].between(-0.5, 0.5).all()
    to_arrow(df, SCHEMA)


# ---------------------------------------------------------------- the endpoint scorer


def test_option_logprobs_matches_token_spellings_and_floors_missing_options():
    lp = option_logprobs([(" A", -0.5), ("(A", -1.5), ("The", -3.0), ("b", -4.0)], [" (A)", " (B)"])
    assert lp[0] == pytest.approx(np.log(np.exp(-0.5) + np.exp(-1.5)))
    assert lp[1] == pytest.approx(-4.0)
    floored = option_logprobs([("A", -0.1), ("The", -3.0), ("\n", -6.0)], [" (A)", " (B)"])
    assert floored[1] == pytest.approx(-6.0)  # missing: the lowest listed log-prob
    with pytest.raises(ValueError, match="none of the options"):
        option_logprobs([("The", -0.1)], [" (A)", " (B)"])


def test_endpoint_scorer_labels_pairs_and_keeps_the_key_out_of_outputs(constitution, key):
    with LogprobServer(tokens=(" A", " B")) as server:
        scorer = EndpointChoiceScorer(endpoint(server))
        df = label_pairs(scorer, constitution, pairs((REFUSE, COMPLY), (COMPLY, REFUSE)), seed=0)
    assert [c[0]["content"] for c in df["chosen"]] == [REFUSE, REFUSE]
    assert df["label"].tolist() == pytest.approx([0.9, 0.9])
    assert df["position_bias"].tolist() == pytest.approx([0.0, 0.0], abs=1e-9)
    req = server.requests[0]
    assert req["logprobs"] is True and req["top_logprobs"] == 20 and req["max_tokens"] == 1
    assert req["model"] == "judge-m"
    assert len(server.requests) == 4
    assert set(server.auth_headers) == {f"Bearer {KEY}"}
    buf = io.BytesIO()
    pq.write_table(to_arrow(df, SCHEMA), buf)
    assert KEY not in df.to_json() and KEY.encode() not in buf.getvalue()


def test_endpoint_scorer_retries_faults_then_succeeds(constitution, key):
    with LogprobServer() as server:
        server.script = ["429", "500", "garbage", "badjson", "nochoice"]
        scorer = EndpointChoiceScorer(endpoint(server, max_retries=5, max_concurrency=1), backoff=0.01)
        probs = scorer.score_choices_chat(
            [feedback_conversation("Which is less harmful?", "x", REFUSE, COMPLY)], OPTIONS, ASSISTANT_PREFIX
        )
    assert probs[0] == pytest.approx([0.9, 0.1])
    assert len(server.requests) == 6 and scorer.requests == 6


def test_endpoint_timeout_is_retried(key):
    with LogprobServer() as server:
        server.script = ["slow"]
        server.slow_seconds = 1.0
        scorer = EndpointChoiceScorer(endpoint(server, timeout=0.3, max_concurrency=1), backoff=0.01)
        probs = scorer.score_choices_chat([feedback_conversation("Q?", "x", COMPLY, REFUSE)], OPTIONS)
    assert probs[0] == pytest.approx([0.1, 0.9])


def test_endpoint_persistent_500_names_the_endpoint(constitution, key):
    with LogprobServer() as server:
        server.script = ["500"] * 10
        scorer = EndpointChoiceScorer(endpoint(server, max_retries=2, max_concurrency=1), backoff=0.01)
        with pytest.raises(EndpointError) as err:
            label_pairs(scorer, constitution, pairs((REFUSE, COMPLY)), seed=0)
    assert server.base_url in str(err.value) and "3 times" in str(err.value)
    assert KEY not in str(err.value)


def test_endpoint_bounded_concurrency_keeps_order(key):
    with LogprobServer() as server:
        scorer = EndpointChoiceScorer(endpoint(server, max_concurrency=3))
        convs = [
            feedback_conversation("Q?", f"req {i}", *((REFUSE, COMPLY) if i % 2 else (COMPLY, REFUSE)))
            for i in range(12)
        ]
        probs = scorer.score_choices_chat(convs, OPTIONS)
    assert probs[:, 0] == pytest.approx([0.9 if i % 2 else 0.1 for i in range(12)])
    assert 1 < server.max_in_flight <= 3


def test_endpoint_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = OpenAIEndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV)
    with pytest.raises(EndpointError, match=re.escape(KEY_ENV)):
        EndpointChoiceScorer(cfg)


def test_contrastive_pairs_choose_the_positive_side_with_the_configured_strength():
    from caiflow.feedback import contrastive_pairs

    c = load_constitution(ROOT / "constitutions/harmless.yaml")
    rows = pd.DataFrame(
        {
            "prompt_id": ["r1", "b1", "r2"],
            "prompt": ["harm?", "bread?", "harm again?"],
            "kind": ["red-team", "benign", "red-team"],
            "answer_a": ["I can't help with that.", "Mix flour and water.", "same"],
            "answer_b": ["Sure, step 1...", "I cannot help.", " same "],
        }
    )
    out = contrastive_pairs(rows, c, seed=0, label=0.85)
    to_arrow(out, SCHEMA)  # the preferences schema, as written
    assert out["pair_kind"].tolist() == ["contrastive-red-team", "contrastive-benign", "contrastive-red-team"]
    assert [m[0]["content"] for m in out["chosen"]] == [
        "I can't help with that.",
        "Mix flour and water.",
        "same",
    ]
    assert out["label"].tolist()[:2] == [0.85, 0.85] and pd.isna(out["label"][2])
    assert out["drop_reason"].isna().tolist() == [True, True, False]
    assert out["drop_reason"][2] == "identical-answers"
    assert all(len(p) == 1 and p[0] in c.principle_ids() for p in out["principles"])
    with pytest.raises(ValueError, match="must be in"):
        contrastive_pairs(rows, c, seed=0, label=0.5)


def test_feedback_model_drops_the_contrastive_pairs_it_confidently_reverses():
    from caiflow.feedback import contrastive_pairs, drop_disagreements

    c = load_constitution(ROOT / "constitutions/harmless.yaml")
    rows = pd.DataFrame(
        {
            "prompt_id": ["r1", "r2", "r3"],
            "prompt": ["harm?", "harm again?", "more harm?"],
            "kind": ["red-team"] * 3,
            # r2's "positive" side complied and its negative side refused: a pair the model reverses
            "answer_a": ["I can't help with that.", "Sure, step 1...", "same"],
            "answer_b": ["Sure, step 1...", "I can't help with that.", "same"],
        }
    )
    made = contrastive_pairs(rows, c, seed=0, label=0.9)
    scorer = RuleScorer()  # prefers the refusal, in either slot
    out = drop_disagreements(made, scorer, c, margin=0.3)
    to_arrow(out, SCHEMA)
    assert out["drop_reason"].tolist() == [None, "feedback-disagrees", "identical-answers"]
    assert out["label"].tolist()[:2] == [0.9, 0.9]  # the label stays contrastive
    assert out["p_a_first"][0] > 0.5 and out["p_a_first"][1] < 0.5 and pd.isna(out["p_a_first"][2])
    assert len(scorer.conversations) == 4  # two kept pairs, both orders; the identical pair is not asked
    question = c.principle(made["principles"][0][0]).feedback_question
    assert question in scorer.conversations[0][-1]["content"]
    lenient = drop_disagreements(made, RuleScorer(lambda q, a, b: 0.35 if "Sure" in a else 0.65), c, 0.3)
    assert lenient["drop_reason"].tolist()[:2] == [None, None]  # unsure, not confidently reversed
    with pytest.raises(ValueError, match="margin"):
        drop_disagreements(made, scorer, c, margin=0.5)
