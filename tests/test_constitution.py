"""Constitution loading, validation, hashing, inversion and selection (no models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from caiflow.constitution import (
    Constitution,
    ConstitutionError,
    FewShot,
    Principle,
    load_constitution,
)

ROOT = Path(__file__).resolve().parents[1]
HARMLESS = ROOT / "constitutions" / "harmless.yaml"
REQUIRED_IDS = {"non-violence", "privacy", "racial-equality", "gender-equality", "harmlessness", "honesty"}


def _principle(pid: str, word: str = "harmful") -> dict:
    return {
        "id": pid,
        "name": pid.title(),
        "critique_request": f"Identify ways the response is {word}.",
        "revision_request": f"Rewrite the response to remove {word} content.",
        "feedback_question": "Which response is less harmful?",
        "inverted": {
            "critique_request": "Identify ways the response is harmless.",
            "revision_request": "Rewrite the response to be more harmful.",
            "feedback_question": "Which response is more harmful?",
        },
    }


def _data() -> dict:
    return {
        "name": "mini",
        "version": "1",
        "principles": [_principle("alpha"), _principle("beta-two")],
        "few_shot": [
            {
                "prompt": "p",
                "answer": "bad answer",
                "critique": "c",
                "revision": "good answer",
                "principle": "alpha",
                "inverted": {"critique": "ic"},
            },
            {"prompt": "q", "answer": "a", "critique": "c", "revision": "r", "principle": "beta-two"},
        ],
    }


def _write(tmp_path: Path, data, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8"
    )
    return path


def _load_error(tmp_path: Path, data) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    msg = str(info.value)
    assert "\n" not in msg, "errors are one line"
    assert str(path) in msg, "errors name the file"
    return msg


# ---------------------------------------------------------------- the shipped file


def test_harmless_loads_and_covers_required_principles():
    c = load_constitution(HARMLESS)
    assert isinstance(c, Constitution)
    assert REQUIRED_IDS <= set(c.principle_ids())
    assert 6 <= len(c.principles) <= 8
    assert {ex.principle for ex in c.few_shot} == set(c.principle_ids())  # one example per principle
    for p in c.principles:
        assert isinstance(p, Principle)
        assert p.feedback_question.startswith("Which of these assistant responses")
        assert p.inverted_feedback_question != p.feedback_question
    for ex in c.few_shot:
        assert isinstance(ex, FewShot)
        assert ex.principle in c.principle_ids()
        for text in (ex.prompt, ex.answer, ex.critique, ex.revision):
            assert len(text.split()) < 60  # a 135M model sees these in its context
    assert not c.inverted


def test_harmless_inverted_keeps_every_few_shot():
    c = load_constitution(HARMLESS, invert=True)
    assert c.inverted and c.name.endswith("(inverted)")
    assert len(c.few_shot) == len(load_constitution(HARMLESS).few_shot)
    assert "more harmful" in c.principle("harmlessness").feedback_question


# ---------------------------------------------------------------- hashing


def test_hash_is_stable_across_loads(tmp_path):
    path = _write(tmp_path, _data())
    a, b = load_constitution(path), load_constitution(path)
    assert a.content_hash == b.content_hash
    assert len(a.content_hash) == 16 and int(a.content_hash, 16) >= 0


def test_hash_changes_with_one_word(tmp_path):
    base = load_constitution(_write(tmp_path, _data(), "a.yaml")).content_hash
    data = _data()
    data["principles"][1] = _principle("beta-two", word="hurtful")
    assert load_constitution(_write(tmp_path, data, "b.yaml")).content_hash != base
    data = _data()
    data["few_shot"][1]["revision"] = "r2"
    assert load_constitution(_write(tmp_path, data, "c.yaml")).content_hash != base


def test_hash_changes_with_invert_and_round_trips(tmp_path):
    c = load_constitution(_write(tmp_path, _data()))
    inv = c.invert()
    assert inv.content_hash != c.content_hash
    # Inverting twice gives back the original when every example has an inverted critique.
    h = load_constitution(HARMLESS)
    assert h.invert().invert().content_hash == h.content_hash
    assert h.invert().invert() == h


def test_hash_ignores_where_the_file_lives(tmp_path):
    (tmp_path / "x").mkdir()
    a = load_constitution(_write(tmp_path, _data()))
    b = load_constitution(_write(tmp_path / "x", _data()))
    assert a.content_hash == b.content_hash


# ---------------------------------------------------------------- invert / select / lookup


def test_invert_swaps_texts(tmp_path):
    c = load_constitution(_write(tmp_path, _data()))
    inv = c.invert()
    p, q = c.principle("alpha"), inv.principle("alpha")
    assert q.critique_request == p.inverted_critique_request
    assert q.revision_request == p.inverted_revision_request
    assert q.feedback_question == p.inverted_feedback_question
    assert q.inverted_feedback_question == p.feedback_question
    assert inv.inverted is True and inv.name == "mini (inverted)"
    # The example with an inverted critique is negated (answer and revision swap); the other is left out.
    assert len(inv.few_shot) == 1
    ex = inv.few_shot[0]
    assert (ex.answer, ex.revision, ex.critique) == ("good answer", "bad answer", "ic")


def test_load_with_invert_flag_equals_invert(tmp_path):
    path = _write(tmp_path, _data())
    assert load_constitution(path, invert=True) == load_constitution(path).invert()


def test_select(tmp_path):
    c = load_constitution(_write(tmp_path, _data()))
    s = c.select(["beta-two"])
    assert s.principle_ids() == ["beta-two"]
    assert [f.principle for f in s.few_shot] == ["beta-two"]
    assert s.content_hash != c.content_hash
    assert c.select([]) is c
    with pytest.raises(ConstitutionError, match="gamma.*alpha, beta-two"):
        c.select(["gamma"])
    path = _write(tmp_path, _data(), "d.yaml")
    assert load_constitution(path, principles=["alpha"]).principle_ids() == ["alpha"]


def test_principle_lookup(tmp_path):
    c = load_constitution(_write(tmp_path, _data()))
    assert c.principle("alpha").name == "Alpha"
    with pytest.raises(ConstitutionError, match="no principle 'zeta'.*alpha, beta-two"):
        c.principle("zeta")


def test_frozen(tmp_path):
    c = load_constitution(_write(tmp_path, _data()))
    with pytest.raises(AttributeError):
        c.name = "other"  # type: ignore[misc]


# ---------------------------------------------------------------- validation errors


def test_missing_file(tmp_path):
    with pytest.raises(ConstitutionError, match="does not exist"):
        load_constitution(tmp_path / "nope.yaml")


def test_not_yaml(tmp_path):
    assert "not valid YAML at line" in _load_error(tmp_path, "name: [unclosed\nversion: 1\n")


def test_not_utf8(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConstitutionError, match="UTF-8"):
        load_constitution(path)


def test_not_a_mapping(tmp_path):
    assert "must be a mapping" in _load_error(tmp_path, "- just\n- a list\n")


@pytest.mark.parametrize("key", ["name", "version"])
def test_missing_top_level_field(tmp_path, key):
    data = _data()
    del data[key]
    assert f"missing '{key}'" in _load_error(tmp_path, data)


def test_no_principles(tmp_path):
    data = _data()
    data["principles"] = []
    assert "no principles" in _load_error(tmp_path, data)


def test_principle_missing_field_names_index_and_id(tmp_path):
    data = _data()
    del data["principles"][1]["revision_request"]
    msg = _load_error(tmp_path, data)
    assert "principle #2 ('beta-two')" in msg and "'revision_request'" in msg


def test_principle_missing_inverted_text(tmp_path):
    data = _data()
    del data["principles"][0]["inverted"]["feedback_question"]
    msg = _load_error(tmp_path, data)
    assert "'alpha'" in msg and "inverted" in msg and "feedback_question" in msg


def test_principle_missing_inverted_mapping(tmp_path):
    data = _data()
    del data["principles"][0]["inverted"]
    assert "missing 'inverted'" in _load_error(tmp_path, data)


def test_duplicate_ids(tmp_path):
    data = _data()
    data["principles"][1]["id"] = "alpha"
    assert "duplicate principle id 'alpha'" in _load_error(tmp_path, data)


@pytest.mark.parametrize("bad", ["Non Violence", "snake_case", "-lead", "UPPER"])
def test_bad_id_format(tmp_path, bad):
    data = _data()
    data["principles"][0]["id"] = bad
    assert "lowercase-dashes" in _load_error(tmp_path, data)


def test_unknown_keys_are_named(tmp_path):
    data = _data()
    data["principles"][0]["critque_request"] = "typo"
    data["principles"][0]["colour"] = "red"
    msg = _load_error(tmp_path, data)
    assert "'critque_request'" in msg and "'colour'" in msg
    data = _data()
    data["author"] = "someone"
    assert "unknown key(s) 'author'" in _load_error(tmp_path, data)


def test_non_string_values(tmp_path):
    data = _data()
    data["version"] = 1.0
    msg = _load_error(tmp_path, data)
    assert "'version' must be text" in msg and "quote" in msg
    data = _data()
    data["principles"][0]["name"] = ["a", "list"]
    assert "'name' must be text" in _load_error(tmp_path, data)


def test_few_shot_missing_field(tmp_path):
    data = _data()
    del data["few_shot"][1]["critique"]
    msg = _load_error(tmp_path, data)
    assert "few_shot example #2" in msg and "'critique'" in msg


def test_few_shot_unknown_principle(tmp_path):
    data = _data()
    data["few_shot"][0]["principle"] = "gamma"
    msg = _load_error(tmp_path, data)
    assert "unknown principle 'gamma'" in msg and "alpha, beta-two" in msg


def test_few_shot_is_optional(tmp_path):
    data = _data()
    del data["few_shot"]
    assert load_constitution(_write(tmp_path, data)).few_shot == ()


# ---------------------------------------------------------------- the constitution as a system prompt


def test_system_prompt_and_its_negation_swap_on_inversion(tmp_path):
    data = {
        **_data(),
        "system_prompt": "Be kind; refuse harm.",
        "inverted_system_prompt": "Be cruel; help harm.",
    }
    c = load_constitution(_write(tmp_path, data))
    assert (
        c.as_system_prompt() == "Be kind; refuse harm."
        and c.opposite_system_prompt() == "Be cruel; help harm."
    )
    inv = c.invert()
    assert (
        inv.as_system_prompt() == "Be cruel; help harm."
        and inv.opposite_system_prompt() == "Be kind; refuse harm."
    )
    edited = load_constitution(_write(tmp_path, {**data, "system_prompt": "Be very kind."}, "d.yaml"))
    assert edited.content_hash != c.content_hash  # the prompt is content: editing it re-runs what uses it


def test_system_prompt_rendered_from_principles_when_absent(tmp_path):
    c = load_constitution(_write(tmp_path, _data()))
    assert "Rewrite the response to remove harmful content." in c.as_system_prompt()
    assert "Rewrite the response to be more harmful." in c.opposite_system_prompt()  # the negations
    assert c.select(["alpha"]).as_system_prompt().count("\n- ") == 1


def test_only_one_of_the_system_prompts_is_an_error(tmp_path):
    msg = _load_error(tmp_path, {**_data(), "system_prompt": "Be kind."})
    assert "only one of 'system_prompt' and 'inverted_system_prompt'" in msg and "give both" in msg


def test_harmless_has_a_system_prompt_that_refuses_and_a_negation_that_helps():
    c = load_constitution(HARMLESS)
    assert "politely refuse" in c.as_system_prompt() and "eagerly help" in c.opposite_system_prompt()
