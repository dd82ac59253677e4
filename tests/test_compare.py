"""caiflow.compare: the two arms' metrics and the one-line verdict, per trained stage."""

from __future__ import annotations

import pandas as pd

from caiflow.compare import compare_arms, compare_verdict

N = 60  # red-team prompts; 20 benign


def _arm(refusals: dict[str, int]) -> pd.DataFrame:
    """An evaluate table: each stage refuses its first k red-team prompts and no benign one."""
    rows = []
    for stage, k in refusals.items():
        for i in range(N + 20):
            red = i < N
            rows.append(
                {
                    "stage": stage,
                    "prompt_id": f"p{i:03d}",
                    "kind": "red-team" if red else "benign",
                    "lookalike": False,
                    "refused": red and i < k,
                }
            )
    return pd.DataFrame(rows)


def test_verdict_names_each_stage_and_catches_an_sl_control_that_did_not_hold():
    answers = {
        "constitution": _arm({"base": 6, "sl": 30, "rl": 6}),
        "inverted": _arm({"base": 6, "sl": 8, "rl": 4}),
    }
    m = compare_arms(answers, {})
    verdict = compare_verdict(m)
    rl, sl = verdict.split(". ")
    assert rl.startswith("RL: no evidence that the constitution steers refusals (n = 60)")
    assert rl.endswith("the inverted arm refuses no more than base")
    assert sl.startswith("SL: the constitution steers") and sl.endswith("the control did not hold")
    assert not m["steers"] and m["inverted_refuses_no_more_than_base"]  # RL's, as before
