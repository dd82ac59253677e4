"""The AI judge: pairwise verdicts in both presentation orders, and the judge's own calibration.

A judge (any choice scorer, see :mod:`caiflow.feedback`) compares two answers to the same
prompt under one question, in both orders. `pairwise_judgements` keeps both readings;
`judge_outcomes` counts hard wins, ties and losses where the orders agree; `calibrate_judge`
measures the judge on pairs whose better answer is not in doubt before its verdicts are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from caiflow.feedback import ChoiceScorer, same_answer, score_both_orders


def pairwise_judgements(
    scorer: ChoiceScorer,
    question: str,
    prompts: Sequence[str],
    answers_x: Sequence[str],
    answers_y: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """(P(x better) with x shown first, P(x better) with x shown second) per prompt.

    Their mean is the order-averaged verdict; their agreement tells a decided judge from one
    that follows a slot. Pairs whose answers are the same up to whitespace are 0.5 in both
    orders and are not sent to the judge. One scorer call in all.
    """
    if not len(prompts) == len(answers_x) == len(answers_y):
        raise ValueError(
            f"got {len(prompts)} prompts, {len(answers_x)} x answers and {len(answers_y)} y answers: "
            "pass one answer of each per prompt."
        )
    first = np.full(len(prompts), 0.5, dtype=np.float64)
    second = first.copy()
    todo = [i for i in range(len(prompts)) if not same_answer(answers_x[i], answers_y[i])]
    p1, p2 = score_both_orders(scorer, [(question, prompts[i], answers_x[i], answers_y[i]) for i in todo])
    first[todo], second[todo] = p1, p2
    return first, second


def judge_outcomes(first: np.ndarray, second: np.ndarray, identical: np.ndarray) -> dict[str, Any]:
    """Hard outcomes where both presentation orders agree, and how decided the judge was.

    win: both orders say x is better; loss: both say y; tie: the orders disagree (or the answers
    are identical). decisiveness: mean |P(x better) - 0.5| of the order-averaged verdicts of
    the pairs that were judged (0: a coin, 0.5: certain every time).
    """
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    identical = np.asarray(identical, dtype=bool)
    judged = ~identical
    win = judged & (first > 0.5) & (second > 0.5)
    loss = judged & (first < 0.5) & (second < 0.5)
    mean = (first + second) / 2
    return {
        "n": int(first.size),
        "wins": int(win.sum()),
        "losses": int(loss.sum()),
        "ties": int(first.size - win.sum() - loss.sum()),
        "identical": int(identical.sum()),
        "identical_share": float(identical.mean()) if first.size else None,
        "orders_agree_share": float((win | loss).sum() / judged.sum()) if judged.any() else None,
        "decisiveness": float(np.abs(mean[judged] - 0.5).mean()) if judged.any() else None,
    }


def calibrate_judge(
    scorer: ChoiceScorer, pairs: Sequence[dict[str, str]], questions: dict[str, str]
) -> dict[str, Any]:
    """The judge's accuracy on pairs whose better answer is not in doubt, asked in both orders.

    `pairs`: dicts with prompt, better, worse, dimension (a key of `questions`), kind. A pair is
    right when the order-averaged P(better is better) is above 0.5. `reliable` is True only when
    the Wilson 95% interval of the accuracy lies above 0.5: a judge whose interval includes 0.5
    cannot be told from chance, and its verdicts are not used.
    """
    from caiflow.refusal import rate

    if not pairs:
        raise ValueError("calibrate_judge needs at least one pair with a known better answer")
    first = np.empty(len(pairs))
    second = np.empty(len(pairs))
    for dimension, question in questions.items():
        idx = [i for i, p in enumerate(pairs) if p["dimension"] == dimension]
        if idx:
            f, s = pairwise_judgements(
                scorer,
                question,
                [pairs[i]["prompt"] for i in idx],
                [pairs[i]["better"] for i in idx],
                [pairs[i]["worse"] for i in idx],
            )
            first[idx], second[idx] = f, s
    unknown = sorted({p["dimension"] for p in pairs} - set(questions))
    if unknown:
        raise ValueError(
            f"calibration pairs ask about {unknown}, but questions are given for {sorted(questions)}"
        )
    right = (first + second) / 2 > 0.5
    accuracy = rate(right)
    rows = [
        {
            "id": p.get("id", str(i)),
            "kind": p["kind"],
            "dimension": p["dimension"],
            "p_better_first": float(first[i]),
            "p_better_second": float(second[i]),
            "right": bool(right[i]),
        }
        for i, p in enumerate(pairs)
    ]
    by_kind = {
        kind: rate(right[[i for i, p in enumerate(pairs) if p["kind"] == kind]])
        for kind in sorted({p["kind"] for p in pairs})
    }
    return {
        "accuracy": accuracy["rate"],
        "lo": accuracy["lo"],
        "hi": accuracy["hi"],
        "n": accuracy["n"],
        "reliable": bool(accuracy["lo"] > 0.5),
        "accuracy_shown_first": float((first > 0.5).mean()),
        "accuracy_shown_second": float((second > 0.5).mean()),
        "by_kind": by_kind,
        "decisiveness": float(np.abs((first + second) / 2 - 0.5).mean()),
        "rows": rows,
    }
