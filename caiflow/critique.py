"""The critique-revision loop (SL-CAI data): answer, then N rounds of critique and revision.

For each red-team prompt the model answers, critiques its answer under a principle, and
revises it; the revision of the last round is the SFT target. Principles are chosen per row
with a seeded RNG: round 1 uses the prompt's categorised principle when the constitution has
it (that is what categorisation is for), later rounds sample uniformly. Benign prompts are
answered plainly, to mix helpfulness data into SFT.

Degenerate revisions are kept with a ``drop_reason``, never silently removed. A target that used
its whole token budget was cut off mid-thought: it is cut back to its last complete sentence (an SFT
target that stops mid-sentence teaches the model to stop there), or dropped as cut off when it has
none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from caiflow import schemas
from caiflow.constitution import Constitution, FewShot, Principle
from caiflow.generation import GenerationEngine, Sampling
from caiflow.seeds import row_rng, row_seed

SCHEMA = schemas.SL_DATA

# Phrases that show the model copied the instructions instead of answering.
_ECHO_MARKERS = (
    "critiquerequest",
    "revisionrequest",
    "critique request",
    "revision request",
    "please rewrite",
)


@dataclass(frozen=True)
class Sampler:
    answer: Sampling
    critique: Sampling
    revision: Sampling


def few_shot_turns(
    examples: tuple[FewShot, ...], principle_of, n: int, principle: str | None = None
) -> list[dict[str, str]]:
    """The first `n` examples as chat turns, those of `principle` (the round's) first: the model
    sees how that principle is critiqued and applied before it is asked to."""
    ordered = sorted(examples, key=lambda ex: ex.principle != principle) if principle else examples
    turns: list[dict[str, str]] = []
    for ex in ordered[:n]:
        p = principle_of(ex.principle)
        turns += [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.answer},
            {"role": "user", "content": p.critique_request if p else ""},
            {"role": "assistant", "content": ex.critique},
            {"role": "user", "content": p.revision_request if p else ""},
            {"role": "assistant", "content": ex.revision},
        ]
    return turns


def choose_principles(
    constitution: Constitution, prompt_id: str, category: str | None, rounds: int, seed: int
) -> list[Principle]:
    """The principle for each round: the category first (when known), then seeded samples."""
    ids = constitution.principle_ids()
    chosen: list[Principle] = []
    for r in range(rounds):
        if r == 0 and category in ids:
            chosen.append(constitution.principle(category))
        else:
            chosen.append(constitution.principle(row_rng(seed, prompt_id, f"principle-{r}").choice(ids)))
    return chosen


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


# A revision that talks about the answer instead of giving one ("This response helps with
# illegal activities..."): what small models write when asked to revise.
_META_TALK = re.compile(
    r"^(the|this|my|your|that|the assistant's|the previous|the original|the above) "
    r"(last |previous |original |assistant's )?(response|answer|reply|revision)\b"
)


def principle_system_prompt(principle: Principle) -> str:
    """One principle as a system prompt for the revision step (its negation in an inverted constitution)."""
    return (
        f"You revise answers so that they follow one principle, {principle.name}: "
        f"{principle.revision_request}"
    )


def repeats_itself(text: str, n: int = 4, share: float = 0.5) -> bool:
    """True when more than `share` of the text's word n-grams are repeats (a looping answer)."""
    words = _norm(text).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) >= 8 and 1 - len(set(grams)) / len(grams) > share


# A sentence ends at . ! ? or an ellipsis (not a list number such as "1."), maybe closed by a
# quote or bracket, before a space or the end.
_SENTENCE_END = re.compile(r"(?<![\d])[.!?\u2026][\"'\u201d\u2019)\]]*(?=\s|$)")


def complete_sentences(text: str) -> str | None:
    """`text` up to the end of its last complete sentence, or None when it has none."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].rstrip() if ends else None


def finish_cut_off(
    engine: GenerationEngine, texts: list[str], sampling: Sampling, drop: bool = True
) -> list[str | None]:
    """Each text, cut back to its last full sentence when it filled `sampling.max_new_tokens`.

    None marks a cut-off text with no complete sentence. Texts that ended on their own (EOS) are
    kept whole, whatever their last character; with `drop` False a cut-off text with no complete
    sentence is kept whole too. Token counts are the text's re-encoding, which
    is within a token or two of what was generated; one token of slack covers that. An endpoint
    engine (no tokenizer here) keeps every text whole.
    """
    if not texts:
        return []
    if getattr(engine, "tokenizer", None) is None:  # an endpoint: no token counts here, texts kept whole
        return list(texts)
    counts = [len(ids) for ids in engine.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    cut = [complete_sentences(t) if n >= sampling.max_new_tokens - 1 else t for t, n in zip(texts, counts)]
    return cut if drop else [c if c is not None else t for c, t in zip(cut, texts)]


def degenerate_reason(initial: str, revision: str, principle: Principle | None) -> str | None:
    """Why a revision (or distilled answer) is unusable as SFT target, or None when it is fine."""
    if not revision.strip():
        return "empty-revision"
    if _norm(revision) == _norm(initial) and principle is not None:
        return "revision-identical-to-answer"
    low = _norm(revision)
    request = _norm(principle.revision_request) if principle is not None else ""
    if any(m in low for m in _ECHO_MARKERS) or (len(request) > 20 and request[:40] in low):
        return "revision-echoes-instructions"
    if _META_TALK.match(low):
        return "revision-talks-about-the-response"
    if repeats_itself(revision):
        return "revision-repeats-itself"
    return None


def run_rows(
    engine: GenerationEngine,
    constitution: Constitution,
    rows: list[dict[str, Any]],
    *,
    rounds: int,
    few_shot: int,
    sampler: Sampler,
    seed: int,
    answer_benign: bool = True,
    principle_prompt: bool = False,
    drop_cut_off: bool = True,
) -> list[dict[str, Any]]:
    """Answer, critique and revise a batch of prompt rows; returns records matching SCHEMA.

    With `principle_prompt` the revision request comes with the round's principle as a system prompt.

    rows: dicts with prompt_id, prompt, kind ('red-team' | 'benign') and category.
    All rows of one stage go to the engine together, so batching is across prompts.
    """
    by_id = {p.id: p for p in constitution.principles}
    shots = {pid: few_shot_turns(constitution.few_shot, by_id.get, few_shot, pid) for pid in by_id}
    work = [r for r in rows if r["kind"] == "red-team" or answer_benign]

    answers = engine.generate(
        [[{"role": "user", "content": r["prompt"]}] for r in work],
        sampler.answer,
        [row_seed(seed, r["prompt_id"], "answer") for r in work],
    )
    state = {r["prompt_id"]: {"answer": a, "current": a, "rounds": []} for r, a in zip(work, answers)}
    red = [r for r in work if r["kind"] == "red-team"]
    plans = {
        r["prompt_id"]: choose_principles(constitution, r["prompt_id"], r.get("category"), rounds, seed)
        for r in red
    }

    for k in range(rounds):
        convs, seeds_c = [], []
        for r in red:
            p = plans[r["prompt_id"]][k]
            convs.append(
                shots[p.id]
                + [
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": state[r["prompt_id"]]["current"]},
                    {"role": "user", "content": p.critique_request},
                ]
            )
            seeds_c.append(row_seed(seed, r["prompt_id"], f"critique-{k}"))
        critiques = engine.generate(convs, sampler.critique, seeds_c) if red else []
        for conv, r, c in zip(convs, red, critiques):
            p = plans[r["prompt_id"]][k]
            conv += [{"role": "assistant", "content": c}, {"role": "user", "content": p.revision_request}]
        if principle_prompt:  # the revision sees its principle as a system prompt (principle-conditioned)
            revision_convs = [
                [{"role": "system", "content": principle_system_prompt(plans[r["prompt_id"]][k])}] + conv
                for r, conv in zip(red, convs)
            ]
        else:
            revision_convs = convs
        revisions = (
            engine.generate(
                revision_convs,
                sampler.revision,
                [row_seed(seed, r["prompt_id"], f"revision-{k}") for r in red],
            )
            if red
            else []
        )
        for r, c, v in zip(red, critiques, revisions):
            p = plans[r["prompt_id"]][k]
            st = state[r["prompt_id"]]
            st["rounds"].append(
                {
                    "principle": p.id,
                    "critique_request": p.critique_request,
                    "critique": c,
                    "revision_request": p.revision_request,
                    "revision": v,
                }
            )
            if v.strip():  # an empty revision keeps the previous answer for the next round
                st["current"] = v

    # the SFT targets: the last revision of a red-team row, the plain answer of a benign one
    targets = {
        r["prompt_id"]: state[r["prompt_id"]]["rounds"][-1]["revision"]
        if r["kind"] == "red-team"
        else state[r["prompt_id"]]["answer"]
        for r in work
    }
    budgets = {r["prompt_id"]: sampler.revision if r["kind"] == "red-team" else sampler.answer for r in work}
    finished = {}
    for budget in {id(b): b for b in budgets.values()}.values():
        ids = [pid for pid, b in budgets.items() if b is budget]
        finished.update(zip(ids, finish_cut_off(engine, [targets[i] for i in ids], budget, drop_cut_off)))
    records = []
    for r in rows:
        st = state.get(r["prompt_id"])
        if st is None:
            records.append(_record(r, "", [], "", "benign-not-answered"))
            continue
        if r["kind"] == "red-team":
            raw = st["rounds"][-1]["revision"]
            last = finished[r["prompt_id"]]
            reason = (
                degenerate_reason(st["answer"], last, plans[r["prompt_id"]][-1])
                if last is not None
                else "revision-cut-off"
            )
            records.append(_record(r, st["answer"], st["rounds"], last if last is not None else raw, reason))
        else:
            answer = finished[r["prompt_id"]]
            reason = "empty-answer" if not st["answer"].strip() else None if answer else "answer-cut-off"
            final = answer if answer is not None else st["answer"]
            records.append(_record(r, st["answer"], [], final, reason))
    return records


def _record(
    row: dict[str, Any], initial: str, rounds: list[dict], final: str, reason: str | None
) -> dict[str, Any]:
    return {
        "prompt_id": row["prompt_id"],
        "prompt": row["prompt"],
        "kind": row["kind"],
        "category": row.get("category"),
        "initial_answer": initial,
        "rounds": rounds,
        "revision": final,
        "messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": final}],
        "drop_reason": reason,
    }


def distill_rows(
    engine: GenerationEngine,
    constitution: Constitution,
    rows: list[dict[str, Any]],
    *,
    sampling: Sampling,
    seed: int,
    samples: int = 1,
    prefer_refusals: bool = False,
    answer_benign: bool = True,
    drop_cut_off: bool = True,
) -> list[dict[str, Any]]:
    """Context distillation: answer red-team prompts under the constitution as a system prompt.

    The SFT target (`messages`) is the prompt without the system prompt and the answer, so the
    model learns to behave as if it had been told. `samples` answers per red-team prompt (per-row
    seeds); the first usable one is kept, or with `prefer_refusals` the first usable one that
    refuses (`caiflow.refusal.is_refusal`) when any does; under an inverted constitution, its
    mirror image: the first usable one that does not refuse (so the control picks as the
    constitution does, toward its own system prompt). Benign prompts are answered plainly, as
    in the critique-revision loop. Records match SCHEMA (no rounds; `initial_answer` is the kept
    answer).
    """
    from caiflow.refusal import is_refusal, wants_refusal

    system = constitution.as_system_prompt()
    red = [r for r in rows if r["kind"] == "red-team"]
    benign = [r for r in rows if r["kind"] != "red-team" and answer_benign]
    convs = [
        [{"role": "system", "content": system}, {"role": "user", "content": r["prompt"]}]
        for r in red
        for _ in range(samples)
    ]
    seeds = [row_seed(seed, r["prompt_id"], f"distill-{k}") for r in red for k in range(samples)]
    answers = engine.generate(convs, sampling, seeds) if red else []
    plain = (
        engine.generate(
            [[{"role": "user", "content": r["prompt"]}] for r in benign],
            sampling,
            [row_seed(seed, r["prompt_id"], "answer") for r in benign],
        )
        if benign
        else []
    )
    # (text, drop reason) of each sample: cut back to full sentences, or dropped as cut off
    judged = [
        (fin, degenerate_reason("", fin, None)) if fin is not None else (raw, "answer-cut-off")
        for raw, fin in zip(answers, finish_cut_off(engine, answers, sampling, drop_cut_off))
    ]
    kept: dict[str, tuple[str, str | None]] = {}
    for i, r in enumerate(red):
        options = judged[i * samples : (i + 1) * samples]
        usable = [text for text, why in options if why is None]
        # the kept answer plays the chosen side of a red-team pair: it refuses (the control: complies)
        wanted = [
            text
            for text in usable
            if is_refusal(text) == wants_refusal("red-team", "a", constitution.inverted)
        ]
        if prefer_refusals and wanted:
            kept[r["prompt_id"]] = (wanted[0], None)
        else:
            kept[r["prompt_id"]] = (usable[0], None) if usable else options[0]
    for r, raw, fin in zip(benign, plain, finish_cut_off(engine, plain, sampling, drop_cut_off)):
        reason = "empty-answer" if not raw.strip() else None if fin else "answer-cut-off"
        kept[r["prompt_id"]] = (fin if fin is not None else raw, reason)
    records = []
    for r in rows:
        if r["prompt_id"] not in kept:
            records.append(_record(r, "", [], "", "benign-not-answered"))
            continue
        answer, reason = kept[r["prompt_id"]]
        records.append(_record(r, answer, [], answer, reason))
    return records
