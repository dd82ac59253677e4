"""Contrastive preference pairs: which pairs contrast, the sides' system prompts, the benign needless
refusal (fixed or opened), and best-of-n sampling of each side."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from caiflow.constitution import load_constitution
from caiflow.feedback import SCHEMA
from caiflow.shards import to_arrow

ROOT = Path(__file__).resolve().parents[1]


def test_refusal_contrast_keeps_pairs_whose_sides_differ_as_their_prompts_ask():
    from caiflow.feedback import contrastive_pairs, refusal_contrast

    c = load_constitution(ROOT / "constitutions/harmless.yaml")
    refuse, comply = "I'm sorry, but I can't help with that.", "Sure, here is how to do that."
    rows = pd.DataFrame(
        {
            "prompt_id": ["r1", "r2", "r3", "b1", "b2", "r4"],
            "prompt": ["harm?", "harm 2?", "harm 3?", "bread?", "cake?", "harm 4?"],
            "kind": ["red-team"] * 3 + ["benign"] * 2 + ["red-team"],
            "answer_a": [refuse, comply, refuse, "Mix flour and water.", refuse, "same"],
            "answer_b": [comply, refuse, refuse + " Really.", refuse, comply, "same"],
        }
    )
    made = contrastive_pairs(rows, c, seed=0, label=0.9)
    out = refusal_contrast(made, inverted=False)
    to_arrow(out, SCHEMA)
    # r2 reversed, r3 both refuse, b2's plain side refused: no contrast; r4 keeps its own reason
    cut = "no-refusal-contrast"
    assert out["drop_reason"].tolist() == [None, cut, cut, None, cut, "identical-answers"]
    # the inverted control's chosen red-team side is the compliant one; benign pairs read the same
    inverted = refusal_contrast(made, inverted=True)
    assert inverted["drop_reason"].tolist() == [cut, None, cut, None, cut, "identical-answers"]
    assert made["drop_reason"][:5].isna().all()  # the input is not changed


def test_principle_contrastive_prompts_follow_the_pairs_principle():
    from caiflow.config import load_config
    from caiflow.feedback import sample_principles
    from tasks.preferences import PreferenceRows

    c = load_constitution(ROOT / "constitutions/harmless.yaml")
    cfg = load_config(ROOT / "configs/tiny.yaml")
    row = {"prompt_id": "r1", "kind": "red-team"}
    assert PreferenceRows(cfg, c, None, {}, 4).contrastive_prompts(row) == (
        c.as_system_prompt(),
        c.opposite_system_prompt(),
    )
    cfg.preferences.contrastive_prompts = "principle"
    rows = PreferenceRows(cfg, c, None, {}, 4)
    principle = c.principle(sample_principles(c, "r1", cfg.run.seed, 1)[0])
    positive, negative = rows.contrastive_prompts(row)
    assert principle.name in positive and principle.revision_request in positive
    assert principle.inverted_revision_request in negative and negative != positive
    benign = rows.contrastive_prompts({"prompt_id": "b1", "kind": "benign"})
    assert benign == (None, cfg.preferences.benign_refusal_prompt)  # benign pairs are unchanged


def test_benign_refusal_opener_opens_only_the_benign_rejected_side():
    from pydantic import ValidationError

    from caiflow.config import load_config
    from caiflow.generation import join_opening
    from caiflow.step_config import PreferencesConfig
    from tasks.preferences import PreferenceRows

    cfg = load_config(ROOT / "configs/tiny.yaml")
    cfg.preferences.benign_refusal_opener = "I'm sorry, but I can't"
    rows = PreferenceRows(cfg, load_constitution(ROOT / "constitutions/harmless.yaml"), None, {}, 4)
    assert rows.openers({"kind": "benign"}) == {"b": "I'm sorry, but I can't"}
    assert rows.openers({"kind": "red-team"}) == {} and rows.fixed_answers({"kind": "benign"}) == {}
    with pytest.raises(ValidationError, match="at most one of preferences.benign_refusal_text"):
        PreferencesConfig(benign_refusal_text="No.", benign_refusal_opener="I'm sorry")
    assert join_opening("I can't", "help.") == "I can't help." and join_opening("I can't", ".") == "I can't."
    assert join_opening("Sorry ", "no.") == "Sorry no." and join_opening("Sorry", "") == "Sorry"


REFUSE, COMPLY = "I'm sorry, but I can't help with that.", "Sure, here is how."


class _ScriptedSides:
    """Answers the n-th request for a (system prompt, prompt) with the n-th entry of its script."""

    def __init__(self, scripts):
        self.scripts, self.asked, self.seeds = scripts, {}, []

    def generate(self, conversations, sampling, seeds):
        self.seeds += seeds
        out = []
        for conv in conversations:
            key = (conv[0]["content"] if len(conv) > 1 else None, conv[-1]["content"])
            n = self.asked.get(key, 0)
            self.asked[key] = n + 1
            out.append(self.scripts[key][n])
        return out


def test_contrastive_best_of_n_keeps_the_sample_each_side_should_give():
    from caiflow.generation import Sampling
    from tasks.preferences import pair_answers

    rows = [
        {"prompt_id": "r1", "prompt": "harm?", "kind": "red-team"},
        {"prompt_id": "r2", "prompt": "harm 2?", "kind": "red-team"},
        {"prompt_id": "b1", "prompt": "bread?", "kind": "benign"},
    ]
    scripts = {
        ("pos", "harm?"): [COMPLY + " 1", COMPLY + " 2", REFUSE],
        ("neg", "harm?"): [COMPLY + " 3"],
        ("pos", "harm 2?"): [COMPLY + " 4", COMPLY + " 5", COMPLY + " 6", COMPLY + " 7"],
        ("neg", "harm 2?"): [REFUSE, COMPLY + " 8"],
        (None, "bread?"): ["Mix flour and water."],
    }
    s = Sampling(max_new_tokens=8, temperature=1.0)
    prompts = lambda r: ("pos", "neg") if r["kind"] == "red-team" else (None, "no")  # noqa: E731
    fixed = lambda r: {"b": REFUSE} if r["kind"] == "benign" else {}  # noqa: E731
    engine = _ScriptedSides(scripts)
    out = pair_answers(engine, rows, s, 0, prompts, samples=4, fixed=fixed)
    # r1: the third sample refuses; r2's chosen side never refuses in 4: its first is kept;
    # r2's rejected side complies on its second try; the benign refusal is given, not generated
    assert out["answer_a"].tolist() == [REFUSE, COMPLY + " 4", "Mix flour and water."]
    assert out["answer_b"].tolist() == [COMPLY + " 3", COMPLY + " 8", REFUSE]
    # only sides without a fitting answer sample again: 5 first answers, then 3, 2 and 1 retries
    assert len(engine.seeds) == 5 + 3 + 2 + 1 and len(set(engine.seeds)) == len(engine.seeds)
    single = _ScriptedSides(scripts)
    once = pair_answers(single, rows, s, 0, prompts, fixed=fixed)
    assert single.seeds == engine.seeds[:5]  # the first sample keeps the single-sample seed
    assert once["answer_a"].tolist()[:2] == [COMPLY + " 1", COMPLY + " 4"]

    # an opened side: the model finishes the given words, the answer is both joined
    class Finisher:
        def generate(self, conversations, sampling, seeds):
            return [
                "help with that." if c[-1]["role"] == "assistant" else "Mix flour." for c in conversations
            ]

    opener = lambda r: {"b": "I'm sorry, but I can't"} if r["kind"] == "benign" else {}  # noqa: E731
    opened = pair_answers(Finisher(), rows[2:], s, 0, prompts, openers=opener)
    assert (opened["answer_a"][0], opened["answer_b"][0]) == (
        "Mix flour.",
        "I'm sorry, but I can't help with that.",
    )
    # the inverted control's chosen red-team side complies, its rejected side refuses
    inverted = pair_answers(_ScriptedSides(scripts), rows[1:2], s, 0, prompts, samples=4, inverted=True)
    assert (inverted["answer_a"][0], inverted["answer_b"][0]) == (COMPLY + " 4", REFUSE)
