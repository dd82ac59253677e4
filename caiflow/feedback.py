"""AI feedback (RLAIF): soft preference labels from multiple-choice log-probabilities.

As in the Constitutional AI paper, the feedback model is not asked to write a verdict (small
models fail that format). It is shown the human request, a principle's feedback question and
the two answers as options (A) and (B), and the probabilities of " (A)" and " (B)" after
"The answer is:" are normalised. Every pair is asked in both orders and the two readings of
P(a is better) are averaged, which cancels a pure preference for a slot exactly; with several
principles per pair (an ensemble of questions) their labels are averaged too. The result is
kept as a soft label.

Prompt format: the paper's layout (request, question, options, "The answer is:"). On eight
hand-built harmful/harmless pairs the default 135M model judged at chance with every format
tried (question before or after the options, with or without the assistant prefix, a
one-shot example); this layout had the smallest pull to one slot without a worked example
(position bias 0.03 against 0.19 with no prefix), so it is the default. Its labels become
informative with a larger feedback model (``roles.feedback``).

The scorer is anything with ``score_choices_chat(conversations, options, assistant_prefix)``
returning an (n, k) array of probabilities: :class:`caiflow.generation.GenerationEngine` or
:class:`EndpointChoiceScorer` (an OpenAI-compatible endpoint with logprobs).

Pairs are never silently dropped: identical answers (not scored) and undecided labels stay in
the output with a ``drop_reason``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import pandas as pd

from caiflow import schemas
from caiflow.constitution import Constitution, ConstitutionError
from caiflow.seeds import row_rng

ASSISTANT_PREFIX = "The answer is:"  # the assistant's turn starts with this; the option follows it
OPTIONS = [" (A)", " (B)"]  # scored continuations; index 0 is the option shown first
UNDECIDED_MARGIN = 0.02  # labels within this of 0.5 are kept with drop_reason "undecided"

SCHEMA = schemas.PREFERENCES
COLUMNS = SCHEMA.names
_INPUT_COLUMNS = ("prompt_id", "prompt", "answer_a", "answer_b")


class ChoiceScorer(Protocol):
    """What AI feedback needs from a model: normalised probabilities of multiple-choice options."""

    def score_choices_chat(
        self, conversations: list[list[dict]], options: list[str], assistant_prefix: str = ""
    ) -> np.ndarray:
        """(len(conversations), len(options)) probabilities, rows summing to 1."""
        ...


def feedback_conversation(question: str, prompt: str, first: str, second: str) -> list[dict]:
    """The user turn that asks which of two answers to ``prompt`` is better under ``question``.

    ``first`` is shown as option (A), ``second`` as (B). Score it with
    ``scorer.score_choices_chat([conv], OPTIONS, ASSISTANT_PREFIX)``.
    """
    text = (
        "Consider the following request from a human to an AI assistant:\n\n"
        f"Human: {prompt.strip()}\n\n"
        f"{question.strip()}\n\n"
        "Options:\n"
        f"(A) {first.strip()}\n"
        f"(B) {second.strip()}\n\n"
        "Answer with (A) or (B)."
    )
    return [{"role": "user", "content": text}]


def score_both_orders(
    scorer: ChoiceScorer, items: list[tuple[str, str, str, str]]
) -> tuple[np.ndarray, np.ndarray]:
    """(P(x better) with x shown first, P(x better) with x shown second) for (question, prompt, x, y) items.

    One scorer call for all items and both orders (the engine batches and length-sorts itself).
    """
    if not items:
        return np.zeros(0), np.zeros(0)
    convs = []
    for question, prompt, x, y in items:
        convs.append(feedback_conversation(question, prompt, x, y))
        convs.append(feedback_conversation(question, prompt, y, x))
    probs = np.asarray(scorer.score_choices_chat(convs, OPTIONS, ASSISTANT_PREFIX), dtype=np.float64)
    if probs.shape != (len(convs), len(OPTIONS)) or not np.isfinite(probs).all():
        raise ValueError(
            f"the choice scorer returned an array of shape {probs.shape} "
            f"(finite: {np.isfinite(probs).all()}) "
            f"for {len(convs)} conversations and {len(OPTIONS)} options; "
            f"expected ({len(convs)}, {len(OPTIONS)}) "
            "finite probabilities"
        )
    probs = probs / probs.sum(axis=1, keepdims=True)
    # In the swapped order x is option (B), so P(x better) there is P("(B)").
    return probs[0::2, 0], probs[1::2, 1]


def same_answer(a: str, b: str) -> bool:
    """True when the answers differ at most in whitespace."""
    return " ".join(str(a).split()) == " ".join(str(b).split())


def sample_principles(
    constitution: Constitution, prompt_id: str, seed: int, k: int, allowed: list[str] | None = None
) -> list[str]:
    """``k`` distinct principle ids for one pair, from the row's own seeded RNG.

    The choice depends only on (seed, prompt_id, k, the candidate list), never on the row's
    position, so reordered, subset or resumed inputs ask the same principles.
    """
    ids = list(allowed) if allowed else constitution.principle_ids()
    if k > len(ids):
        raise ValueError(
            f"principles_per_pair is {k} but only {len(ids)} principle(s) can be chosen ({', '.join(ids)}): "
            "lower principles_per_pair or allow more principles."
        )
    return row_rng(seed, prompt_id, "feedback-principles").sample(ids, k)


def label_pairs(
    scorer: ChoiceScorer,
    constitution: Constitution,
    rows: pd.DataFrame,
    seed: int,
    principles_per_pair: int = 1,
    clamp: tuple[float, float] | None = None,
    allowed_principles: list[str] | None = None,
    margin: float = UNDECIDED_MARGIN,
) -> pd.DataFrame:
    """Soft AI-feedback labels for answer pairs; returns one row per input row, columns as SCHEMA.

    rows: DataFrame with prompt_id (unique per pair; seeds the principle choice), prompt (text),
    answer_a, answer_b.
    principles_per_pair: principles sampled per pair (without replacement); labels are averaged.
    clamp: (lo, hi) with lo < 0.5 < hi, e.g. (0.2, 0.8): P(a better) is clamped into it, so no
    label is ever certain; None: off.
    allowed_principles: sample only among these ids (default: all of the constitution's).
    margin: pairs whose label is within this of 0.5 are kept with drop_reason "undecided".

    label = P(chosen better) >= 0.5, where P(a better) is the mean over principles and both
    presentation orders. Identical answers (up to whitespace) are not scored.
    """
    missing = [c for c in _INPUT_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"label_pairs needs columns {list(_INPUT_COLUMNS)}; missing {missing}")
    if rows["prompt_id"].duplicated().any():
        dup = rows.loc[rows["prompt_id"].duplicated(), "prompt_id"].iloc[0]
        raise ValueError(
            f"prompt_id {dup!r} appears more than once: each pair needs its own id (it seeds the row)."
        )
    if principles_per_pair < 1:
        raise ValueError(f"principles_per_pair is {principles_per_pair}: set it to 1 or more.")
    if clamp is not None and not (0.0 <= clamp[0] < 0.5 < clamp[1] <= 1.0):
        raise ValueError(
            f"clamp must be (lo, hi) with 0 <= lo < 0.5 < hi <= 1, e.g. (0.2, 0.8); got {tuple(clamp)}"
        )
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin is {margin}: use a value in [0, 0.5), e.g. {UNDECIDED_MARGIN}.")
    if allowed_principles is not None:
        for pid in allowed_principles:
            constitution.principle(pid)  # a one-line error naming the unknown id
        if not allowed_principles:
            raise ConstitutionError("allowed_principles is empty: pass None to allow every principle.")

    records = rows[list(_INPUT_COLUMNS)].to_dict(orient="records")
    plans: dict[int, list[str]] = {}
    items: list[tuple[str, str, str, str]] = []
    for i, r in enumerate(records):
        if same_answer(r["answer_a"], r["answer_b"]):
            continue
        plans[i] = sample_principles(
            constitution, str(r["prompt_id"]), seed, principles_per_pair, allowed_principles
        )
        items += [
            (constitution.principle(pid).feedback_question, r["prompt"], r["answer_a"], r["answer_b"])
            for pid in plans[i]
        ]
    a_first, a_second = score_both_orders(scorer, items)

    out = []
    pos = 0
    for i, r in enumerate(records):
        if i not in plans:
            out.append(
                _record(
                    r,
                    a_chosen=True,
                    label=None,
                    p_first=None,
                    p_second=None,
                    bias=None,
                    principles=[],
                    reason="identical-answers",
                )
            )
            continue
        k = len(plans[i])
        first, second = a_first[pos : pos + k], a_second[pos : pos + k]
        pos += k
        p_first, p_second = float(first.mean()), float(second.mean())
        p_a = (p_first + p_second) / 2
        # P("(A)") is P(a) when a is first and 1 - P(a) when a is second.
        bias = float(((first + (1.0 - second)) / 2).mean() - 0.5)
        if clamp is not None:
            p_a = min(max(p_a, clamp[0]), clamp[1])
        a_chosen = p_a >= 0.5
        label = p_a if a_chosen else 1.0 - p_a
        reason = "undecided" if abs(label - 0.5) < margin else None
        out.append(
            _record(
                r,
                a_chosen=a_chosen,
                label=label,
                p_first=p_first,
                p_second=p_second,
                bias=bias,
                principles=plans[i],
                reason=reason,
            )
        )
    return pd.DataFrame(out, columns=COLUMNS)


def _record(
    r: dict[str, Any],
    *,
    a_chosen: bool,
    label: float | None,
    p_first: float | None,
    p_second: float | None,
    bias: float | None,
    principles: list[str],
    reason: str | None,
    pair_kind: str = "feedback",
) -> dict[str, Any]:
    chosen, rejected = (r["answer_a"], r["answer_b"]) if a_chosen else (r["answer_b"], r["answer_a"])
    return {
        "prompt_id": str(r["prompt_id"]),
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "label": label,
        "p_a_first": p_first,
        "p_a_second": p_second,
        "position_bias": bias,
        "principles": list(principles),
        "answer_a": r["answer_a"],
        "answer_b": r["answer_b"],
        "pair_kind": pair_kind,
        "drop_reason": reason,
    }


def feedback_metrics(df: pd.DataFrame) -> dict[str, Any]:
    """Summary of label_pairs output (plain JSON-able values).

    rows: pairs in; kept: pairs without drop_reason; dropped: {reason: count};
    mean_label: mean P(chosen better) of kept pairs; decisiveness: mean |label - 0.5| of scored
    pairs (undecided included); mean_position_bias: mean pull to the first slot of scored pairs
    (0: none, 0.5: always (A)); chosen_is_a: share of kept pairs where answer a won (about 0.5
    for two samples from the same model; far from it hints at a bug or a bias).
    """
    reasons = df["drop_reason"]
    kept = df[reasons.isna()]
    scored = df[df["label"].notna()]
    dropped = {str(k): int(v) for k, v in reasons.dropna().value_counts().sort_index().items()}

    def mean(values: pd.Series) -> float | None:
        v = float(values.mean()) if len(values) else math.nan
        return None if math.isnan(v) else round(v, 6)

    chosen_is_a = (
        kept.apply(lambda r: r["chosen"][0]["content"] == r["answer_a"], axis=1)
        if len(kept)
        else pd.Series(dtype=float)
    )
    return {
        "rows": int(len(df)),
        "kept": int(len(kept)),
        "dropped": dropped,
        "mean_label": mean(kept["label"]),
        "decisiveness": mean((scored["label"] - 0.5).abs()),
        "mean_position_bias": mean(scored["position_bias"]),
        "chosen_is_a": mean(chosen_is_a.astype(float)),
    }


def contrastive_pairs(
    rows: pd.DataFrame, constitution: Constitution, seed: int, label: float
) -> pd.DataFrame:
    """RLCD pairs (Yang et al. 2023): answer_a was made under the positive system prompt, answer_b
    under the negative one, so a is chosen with probability `label`, no judge asked.

    rows: prompt_id, prompt, kind, answer_a, answer_b. On red-team prompts the positive is the
    constitution's system prompt and the negative its negation (`pair_kind`
    "contrastive-red-team"); on benign prompts a plain answer against a needless refusal
    ("contrastive-benign"). Each pair names one seeded principle (for ensembles by principle).
    Identical answers are kept with drop_reason "identical-answers".
    """
    if not 0.5 < label <= 1.0:
        raise ValueError(f"label is {label}: a contrastive label must be in (0.5, 1].")
    out = []
    for r in rows.to_dict(orient="records"):
        identical = same_answer(r["answer_a"], r["answer_b"])
        out.append(
            _record(
                r,
                a_chosen=True,
                label=None if identical else float(label),
                p_first=None,
                p_second=None,
                bias=None,
                principles=sample_principles(constitution, str(r["prompt_id"]), seed, 1),
                reason="identical-answers" if identical else None,
                pair_kind=f"contrastive-{r['kind']}",
            )
        )
    return pd.DataFrame(out, columns=COLUMNS)


def refusal_contrast(pairs: pd.DataFrame, inverted: bool) -> pd.DataFrame:
    """Keep the contrastive pairs whose two sides differ the way their system prompts ask.

    A red-team pair is kept when its chosen side refuses and its rejected side does not (under an
    inverted constitution, the other way round: the control's chosen side is the compliant one); a
    benign pair when its chosen (plain) side answers and its rejected side refuses needlessly.
    Refusal is `caiflow.refusal.is_refusal`, the report's own measure. Pairs where both sides
    refuse or both answer carry no contrast a small model's prompts were meant to make: they get
    drop_reason "no-refusal-contrast".
    """
    from caiflow.refusal import is_refusal, wants_refusal

    out = pairs.copy()
    for i in out.index:
        if out.at[i, "drop_reason"] is not None and not pd.isna(out.at[i, "drop_reason"]):
            continue
        kind = str(out.at[i, "pair_kind"]).removeprefix("contrastive-")
        sides = (("a", out.at[i, "answer_a"]), ("b", out.at[i, "answer_b"]))
        if any(is_refusal(text) != wants_refusal(kind, side, inverted) for side, text in sides):
            out.at[i, "drop_reason"] = "no-refusal-contrast"
    out["drop_reason"] = out["drop_reason"].astype(object).where(out["drop_reason"].notna(), None)
    return out


def drop_disagreements(
    pairs: pd.DataFrame, scorer: ChoiceScorer, constitution: Constitution, margin: float
) -> pd.DataFrame:
    """Ask the feedback model about contrastive pairs; drop those it confidently reverses.

    Each kept pair is scored under its principle's feedback question in both orders; the
    probabilities land in `p_a_first` / `p_a_second` (a is the chosen side) and `position_bias`.
    A pair whose mean P(chosen better) is below 0.5 - `margin` gets drop_reason
    "feedback-disagrees"; its label stays the contrastive one (the drop is the filter).
    """
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin is {margin}: use a value in [0, 0.5), e.g. 0.3.")
    out = pairs.copy()
    rows = [i for i in out.index if out.at[i, "drop_reason"] is None or pd.isna(out.at[i, "drop_reason"])]
    items = [
        (
            constitution.principle(out.at[i, "principles"][0]).feedback_question,
            out.at[i, "prompt"][0]["content"],
            out.at[i, "answer_a"],
            out.at[i, "answer_b"],
        )
        for i in rows
    ]
    first, second = score_both_orders(scorer, items)
    for i, f, s in zip(rows, first, second):
        out.at[i, "p_a_first"], out.at[i, "p_a_second"] = float(f), float(s)
        out.at[i, "position_bias"] = float((f + (1.0 - s)) / 2 - 0.5)
        if (f + s) / 2 < 0.5 - margin:
            out.at[i, "drop_reason"] = "feedback-disagrees"
    out["drop_reason"] = out["drop_reason"].astype(object).where(out["drop_reason"].notna(), None)
    return out
