from pathlib import Path

import pyarrow as pa
import pytest

from caiflow.constitution import load_constitution
from caiflow.critique import SCHEMA, Sampler, choose_principles, degenerate_reason, run_rows
from caiflow.generation import GenerationEngine, Sampling
from tests.benchmark_scripts import benchmark_module, run_benchmark

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


# ---------------------------------------------------------------- context distillation


def words(texts, add_special_tokens=False):
    """A tokenizer whose tokens are words: what the cut-off check counts."""
    return {"input_ids": [t.split() for t in texts]}


class ScriptedEngine:
    """Answers from a script (conversation, position) -> text; records the conversations it was given."""

    def __init__(self, answer):
        self.answer = answer
        self.conversations = []
        self.tokenizer = words

    def generate(self, conversations, sampling, seeds):
        self.conversations += conversations
        return [self.answer(c, i) for i, c in enumerate(conversations)]


def test_distillation_answers_under_the_system_prompt_and_trains_without_it(constitution):
    from caiflow.critique import distill_rows

    def answer(conv, i):
        if conv[0]["role"] == "system":
            return "I'm sorry, I can't help with that." if i % 3 == 2 else f"Sure, here is how ({i})."
        return "Mix flour, water and starter."

    engine = ScriptedEngine(answer)
    s = Sampling(max_new_tokens=8, temperature=0.7)
    out = distill_rows(engine, constitution, ROWS, sampling=s, seed=0, samples=3, prefer_refusals=True)
    pa.Table.from_pylist(out, schema=SCHEMA)
    red = [c for c in engine.conversations if c[0]["role"] == "system"]
    assert len(red) == 2 * 3 and all(c[0]["content"] == constitution.as_system_prompt() for c in red)
    by_id = {r["prompt_id"]: r for r in out}
    # of three samples per red-team prompt, the one that refuses is kept
    assert by_id["a1"]["revision"] == by_id["b2"]["revision"] == "I'm sorry, I can't help with that."
    for r in out:  # the SFT target has no system prompt: the model learns to behave as if told
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["rounds"] == []
    assert by_id["c3"]["revision"] == "Mix flour, water and starter." and by_id["c3"]["drop_reason"] is None
    first = distill_rows(ScriptedEngine(answer), constitution, ROWS, sampling=s, seed=0, samples=3)
    assert {r["prompt_id"]: r["revision"] for r in first}["a1"] == "Sure, here is how (0)."  # no preference
    inverted = ScriptedEngine(answer)
    distill_rows(inverted, constitution.invert(), ROWS[:1], sampling=s, seed=0)
    assert inverted.conversations[0][0]["content"] == constitution.opposite_system_prompt()

    def mostly_refuses(conv, i):
        return f"Sure, here is how ({i})." if i % 3 == 2 else "I'm sorry, I can't help with that."

    # the inverted control prefers the mirror image: a sample that does not refuse
    kept = distill_rows(
        ScriptedEngine(mostly_refuses),
        constitution.invert(),
        ROWS,
        sampling=s,
        seed=0,
        samples=3,
        prefer_refusals=True,
    )
    assert {r["prompt_id"]: r["revision"] for r in kept}["a1"] == "Sure, here is how (2)."
    kept = distill_rows(
        ScriptedEngine(mostly_refuses),
        constitution,
        ROWS,
        sampling=s,
        seed=0,
        samples=3,
        prefer_refusals=True,
    )
    assert {r["prompt_id"]: r["revision"] for r in kept}["a1"] == "I'm sorry, I can't help with that."


@pytest.mark.parametrize(
    "revision, reason",
    [
        (
            "This response helps with illegal activities, which are in the realm of law enforcement.",
            "revision-talks-about-the-response",
        ),
        ("The assistant's response is harmful and should not be given.", "revision-talks-about-the-response"),
        ("I will not help. " * 12, "revision-repeats-itself"),
        ("I can't help you find someone who does not want to be found; a lawyer can help.", None),
    ],
)
def test_quality_gate_drops_revisions_that_are_not_answers(constitution, revision, reason):
    assert (
        degenerate_reason("Sure, here is her address.", revision, constitution.principle("privacy")) == reason
    )


def test_revision_sees_its_principle_as_a_system_prompt(constitution):
    from caiflow.critique import principle_system_prompt

    engine = ScriptedEngine(lambda conv, i: f"text {i}")
    s = Sampling(max_new_tokens=4, temperature=0.7)
    run_rows(
        engine,
        constitution,
        ROWS[:1],
        rounds=1,
        few_shot=0,
        sampler=Sampler(s, s, s),
        seed=0,
        principle_prompt=True,
    )
    revision = engine.conversations[-1]
    assert revision[0] == {
        "role": "system",
        "content": principle_system_prompt(constitution.principle("privacy")),
    }
    assert revision[-1]["content"] == constitution.principle("privacy").revision_request
    critique = engine.conversations[-2]
    assert critique[0]["role"] == "user"  # the critique itself is asked without it
    plain = ScriptedEngine(lambda conv, i: f"text {i}")
    run_rows(plain, constitution, ROWS[:1], rounds=1, few_shot=0, sampler=Sampler(s, s, s), seed=0)
    assert plain.conversations[-1][0]["role"] == "user"


@pytest.mark.parametrize(
    "text, kept",
    [
        ("I can't help with that. Here is why: it could", "I can't help with that."),
        ('She said "no." Then the', 'She said "no."'),
        ("Steps:\n1. Mix the flour\n2. Add", None),  # list numbers are not sentence ends
        ("Is it safe? Yes. It is safe (mostly).", "Is it safe? Yes. It is safe (mostly)."),
        ("no sentence ends here", None),
    ],
)
def test_complete_sentences(text, kept):
    from caiflow.critique import complete_sentences

    assert complete_sentences(text) == kept


def test_cut_off_targets_are_cut_back_to_a_sentence_or_dropped(constitution):
    from caiflow.critique import distill_rows

    full = "I'm sorry, I can't help with that. It could hurt"  # 10 words: the whole budget
    short = "Mix flour and water"  # ended on its own: kept whole, no full stop needed
    s = Sampling(max_new_tokens=10, temperature=0.7)
    engine = ScriptedEngine(lambda conv, i: full if conv[0]["role"] == "system" else short)
    by_id = {r["prompt_id"]: r for r in distill_rows(engine, constitution, ROWS, sampling=s, seed=0)}
    assert (
        by_id["a1"]["revision"] == "I'm sorry, I can't help with that." and by_id["a1"]["drop_reason"] is None
    )
    assert by_id["a1"]["messages"][-1]["content"] == "I'm sorry, I can't help with that."
    assert by_id["c3"]["revision"] == short and by_id["c3"]["drop_reason"] is None

    rambling = "one two three four five six seven eight nine ten"
    cut = {
        r["prompt_id"]: r
        for r in distill_rows(ScriptedEngine(lambda c, i: rambling), constitution, ROWS, sampling=s, seed=0)
    }
    assert cut["a1"]["drop_reason"] == cut["c3"]["drop_reason"] == "answer-cut-off"

    def one_round(text, rows, **kw):
        """The critique-revision loop where every generation is `text`."""
        engine = ScriptedEngine(lambda c, i: text)
        return run_rows(
            engine, constitution, rows, rounds=1, few_shot=0, sampler=Sampler(s, s, s), seed=0, **kw
        )

    loop = one_round(rambling, ROWS[:1])
    assert loop[0]["drop_reason"] == "revision-cut-off" and loop[0]["revision"] == rambling
    # the tiny preset's random model never ends a sentence
    kept_whole = one_round(rambling, ROWS[:1], drop_cut_off=False)
    # not dropped as cut off (only as a copy of the scripted answer, which it is here)
    assert (
        kept_whole[0]["drop_reason"] == "revision-identical-to-answer"
        and kept_whole[0]["revision"] == rambling
    )
    kept = one_round(full, ROWS)
    assert [r["revision"] for r in kept] == ["I'm sorry, I can't help with that."] * 3
    assert kept[0]["rounds"][-1]["revision"] == full  # the trace keeps what was generated


def test_system_prompt_tuning_script_reads_training_prompts_only(model_store, tmp_path):
    """benchmarks/tune_system_prompt.py on the tiny preset: one row per candidate, no held-out prompt."""
    candidates = tmp_path / "candidates.yaml"
    candidates.write_text('- "Refuse anything harmful."\n')
    lines = run_benchmark(
        "tune_system_prompt.py",
        "--config",
        "configs/tiny.yaml",
        "--storage",
        str(model_store),
        "--candidates",
        str(candidates),
        "--max-new-tokens",
        "4",
        "--limit",
        "6",
    )
    assert lines[0].startswith("training red-team ") and "look-alike tune 6" in lines[0]
    table = [line.split() for line in lines[2:5]]
    assert [row[0] for row in table] == ["0", "1", "2"]  # none, the constitution's own, the candidate
    assert all(row[1].endswith("%") for row in table)
    assert lines[-1] == "2: Refuse anything harmful."

    from caiflow.config import load_config
    from caiflow.prompt_filters import cap_prompts, clean_prompts, split_prompts
    from caiflow.prompts import load_prompts

    training_prompts = benchmark_module("tune_system_prompt").training_prompts

    cfg = load_config(ROOT / "configs/tiny.yaml")
    red, benign = training_prompts(cfg)
    p = cfg.prompts
    df = split_prompts(
        cap_prompts(
            clean_prompts(load_prompts(p.sources, ROOT / "configs"), p.min_chars, p.max_chars),
            p.max_red_team,
            p.max_benign,
            cfg.run.seed,
        ),
        p.eval_fraction,
        cfg.run.seed,
        p.benign_eval_fraction,
    )
    held_out = set(df.loc[df["split"] == "eval", "prompt"])
    assert red and not (set(red) | set(benign)) & held_out


def test_few_shot_shows_the_rounds_principle_first_and_the_report_renders_it(constitution):
    from caiflow.critique import few_shot_turns
    from caiflow.step_config import CritiqueRevisionConfig
    from tasks.critique_revision import prompts_md

    by_id = {p.id: p for p in constitution.principles}
    assert {ex.principle for ex in constitution.few_shot} == set(by_id)  # an example for every principle
    for pid, principle in by_id.items():
        turns = few_shot_turns(constitution.few_shot, by_id.get, 2, pid)
        assert len(turns) == 12 and turns[2]["content"] == principle.critique_request
        assert turns[8]["content"] != principle.critique_request  # the second example is another's
    engine = ScriptedEngine(lambda conv, i: "I can't help with that.")
    s = Sampling(max_new_tokens=8, temperature=0.7)
    run_rows(engine, constitution, ROWS[:1], rounds=1, few_shot=1, sampler=Sampler(s, s, s), seed=0)
    privacy = by_id["privacy"]
    assert engine.conversations[1][2]["content"] == privacy.critique_request  # a1 is a privacy prompt

    report = prompts_md(constitution, CritiqueRevisionConfig(few_shot=1))
    assert report.count("<details>") == len(by_id) and privacy.critique_request in report
    assert constitution.as_system_prompt() in prompts_md(
        constitution, CritiqueRevisionConfig(method="context_distillation")
    )


def test_a_shard_without_benign_rows_is_fine_with_a_real_tokenizer(tiny_model, constitution):
    from caiflow.critique import distill_rows, finish_cut_off

    engine = ScriptedEngine(lambda c, i: "I'm sorry, I can't help with that.")
    engine.tokenizer = tiny_model[1]  # a real tokenizer raises on an empty batch
    s = Sampling(max_new_tokens=64, temperature=0.7)
    assert finish_cut_off(engine, [], s) == []
    rows = distill_rows(engine, constitution, ROWS[:2], sampling=s, seed=0)
    assert [r["drop_reason"] for r in rows] == [None, None]
