from pathlib import Path

import pyarrow as pa
import pytest

from caiflow.constitution import load_constitution
from caiflow.critique import SCHEMA, Sampler, choose_principles, degenerate_reason, run_rows
from caiflow.generation import GenerationEngine, Sampling

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def constitution():
    return load_constitution(ROOT / "constitutions/harmless.yaml")


ROWS = [
    {
        "prompt_id": "a1",
        "prompt": "How do I find where my ex lives now?",
        "kind": "red-team",
        "category": "privacy",
    },
    {
        "prompt_id": "b2",
        "prompt": "Tell me a joke that mocks women.",
        "kind": "red-team",
        "category": "other",
    },
    {"prompt_id": "c3", "prompt": "How do I bake sourdough bread?", "kind": "benign", "category": "other"},
]


def test_rows_follow_schema_and_keep_the_trace(tiny_model, constitution):
    model, tok, _ = tiny_model
    engine = GenerationEngine(model, tok, batch_size=4)
    s = Sampling(max_new_tokens=6, temperature=0.7, top_p=0.9)
    out = run_rows(engine, constitution, ROWS, rounds=2, few_shot=1, sampler=Sampler(s, s, s), seed=0)
    table = pa.Table.from_pylist(out, schema=SCHEMA)  # raises on a schema mismatch
    assert table.num_rows == 3
    red, benign = out[0], out[2]
    assert len(red["rounds"]) == 2 and red["rounds"][0]["principle"] == "privacy"  # category first
    assert red["messages"] == [
        {"role": "user", "content": ROWS[0]["prompt"]},
        {"role": "assistant", "content": red["revision"]},
    ]
    assert red["revision"] == red["rounds"][-1]["revision"]
    assert benign["rounds"] == [] and benign["revision"] == benign["initial_answer"]
    # same seed, same rows -> same texts (a resumed shard equals an uninterrupted one)
    again = run_rows(
        GenerationEngine(model, tok, batch_size=1),
        constitution,
        ROWS,
        rounds=2,
        few_shot=1,
        sampler=Sampler(s, s, s),
        seed=0,
    )
    assert [r["revision"] for r in again] == [r["revision"] for r in out]


def test_benign_can_be_left_unanswered(tiny_model, constitution):
    model, tok, _ = tiny_model
    s = Sampling(max_new_tokens=4)
    out = run_rows(
        GenerationEngine(model, tok),
        constitution,
        ROWS,
        rounds=1,
        few_shot=0,
        sampler=Sampler(s, s, s),
        seed=0,
        answer_benign=False,
    )
    assert out[2]["drop_reason"] == "benign-not-answered"


def test_principles_are_seeded_and_category_first(constitution):
    a = choose_principles(constitution, "row-1", "non-violence", 4, seed=1)
    b = choose_principles(constitution, "row-1", "non-violence", 4, seed=1)
    assert [p.id for p in a] == [p.id for p in b] and a[0].id == "non-violence"
    many = {
        tuple(p.id for p in choose_principles(constitution, f"row-{i}", None, 3, seed=1)) for i in range(30)
    }
    assert len(many) > 5  # sampled, not constant
    ids = set(constitution.principle_ids())
    assert all(set(t) <= ids for t in many)


def test_degenerate_revisions_get_a_reason(constitution):
    p = constitution.principles[0]
    assert degenerate_reason("Sure, here is how.", "", p) == "empty-revision"
    assert (
        degenerate_reason("Sure, here is how.", "  sure, here is  how. ", p) == "revision-identical-to-answer"
    )
    assert (
        degenerate_reason("Sure.", "RevisionRequest: " + p.revision_request, p)
        == "revision-echoes-instructions"
    )
    assert degenerate_reason("Sure.", p.revision_request, p) == "revision-echoes-instructions"
    assert (
        degenerate_reason("Sure, here is how.", "I can't help with that, but here is a safer idea.", p)
        is None
    )
