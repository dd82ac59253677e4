"""Evaluation: scoring and judging the stages' answers (`evaluate_stages`), win rates, Elo, rewards.

Every stage answers the same evaluation prompts (the evaluate step generates them shard by shard,
`tasks/evaluate.py`); refusals are counted (`caiflow.refusal`); the
reward model scores every answer; the judge (`caiflow.judge`), once calibrated, compares stages
in both presentation orders. A soft win rate of x over y is the mean of the order-averaged
P(x better) over prompts (a tie counts half), with a percentile-bootstrap interval over prompts:
it measures the judge's preference, and is only as good as the judge's calibration says.
The statistics take and return plain numbers, lists and dicts (JSON-able), so they go into a
manifest as they are; `caiflow.report` renders them and decides the verdicts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from caiflow.faults import free_accelerator_memory
from caiflow.feedback import same_answer
from caiflow.judge import calibrate_judge, judge_outcomes, pairwise_judgements

HARMLESSNESS = "harmlessness"  # judged on red-team prompts with the constitution's harmlessness question
HELPFULNESS = "helpfulness"  # judged on benign prompts with the helpfulness question
ELO_START = 1000.0  # every player's rating before the first match


def bootstrap_win_rate(
    p: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float | int]:
    """Soft win rate (mean of per-prompt P(x better)) and its percentile-bootstrap interval.

    Returns {"win_rate", "lo", "hi", "n"}: prompts are resampled with replacement ``n_boot``
    times; lo/hi are the alpha/2 and 1 - alpha/2 quantiles of the resampled means.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(
            f"bootstrap_win_rate needs a non-empty 1-d array of probabilities, got shape {p.shape}"
        )
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("bootstrap_win_rate: every value must be a probability in [0, 1]")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"n_boot must be >= 1 and alpha in (0, 1); got n_boot={n_boot}, alpha={alpha}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // p.size)  # resamples per block: bounds memory at ~16 MB of indices
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = p[rng.integers(0, p.size, size=(stop - start, p.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"win_rate": float(p.mean()), "lo": float(lo), "hi": float(hi), "n": int(p.size)}


def reward_summary(
    scores: Sequence[float] | np.ndarray, bins: int = 10, value_range: tuple[float, float] | None = None
) -> dict[str, Any]:
    """{"mean", "std", "n", "histogram": {"edges": [bins + 1 floats], "counts": [bins ints]}}.

    std is the population standard deviation (ddof=0). The histogram spans ``value_range`` when
    given (values outside it are not counted, so counts can sum to less than n), otherwise the
    data's range. An empty input gives mean and std None and zero counts.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError(f"reward_summary: {int((~np.isfinite(x)).sum())} score(s) are NaN or infinite")
    if bins < 1:
        raise ValueError(f"bins is {bins}: use 1 or more.")
    if value_range is None and x.size == 0:
        value_range = (0.0, 1.0)
    counts, edges = np.histogram(x, bins=bins, range=value_range)
    return {
        "mean": float(x.mean()) if x.size else None,
        "std": float(x.std()) if x.size else None,
        "n": int(x.size),
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def elo_ratings(
    matches: Sequence[tuple[str, str, float]], k: float = 16.0, rounds: int = 100, seed: int = 0
) -> dict[str, float]:
    """Elo ratings from soft outcomes, averaged over ``rounds`` random orderings of the matches.

    matches: (player_a, player_b, score of a) with score in [0, 1] (1: a won, 0.5: tie; a judge's
    P(a better) is a fine score). Everyone starts at 1000; k is the update step.
    Sequential Elo depends on the order of matches; averaging over seeded shuffles of a
    canonically sorted list makes the result independent of the order they are passed in.
    """
    if rounds < 1:
        raise ValueError(f"rounds is {rounds}: use 1 or more.")
    games = []
    for a, b, s in matches:
        s = float(s)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"match {a} vs {b} has score {s}: scores must be in [0, 1].")
        if a == b:
            raise ValueError(f"match {a} vs {b}: a player cannot play itself.")
        games.append((str(a), str(b), s))
    players = sorted({p for a, b, _ in games for p in (a, b)})
    if not games:
        return {}
    games.sort()
    rng = random.Random(seed)
    total = dict.fromkeys(players, 0.0)
    for _ in range(rounds):
        rng.shuffle(games)
        rating = dict.fromkeys(players, ELO_START)
        for a, b, s in games:
            expected = 1.0 / (1.0 + 10 ** ((rating[b] - rating[a]) / 400.0))
            delta = k * (s - expected)
            rating[a] += delta
            rating[b] -= delta
        for p in players:
            total[p] += rating[p]
    return {p: total[p] / rounds for p in players}


def elo_with_intervals(
    judgements: pd.DataFrame, n_boot: int = 200, seed: int = 0, rounds: int = 20
) -> dict[str, dict[str, dict[str, float]]]:
    """{dimension: {stage: {"rating", "lo", "hi"}}}: Elo from every judged comparison, with a 95%
    interval from resampling prompts (each resample keeps a prompt's comparisons together)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    rng = np.random.default_rng(seed)
    for dim, rows in judgements.groupby("dimension", sort=True):
        games = list(zip(rows["candidate"], rows["reference"], rows["p_candidate_better"]))
        point = elo_ratings(games, seed=seed)
        by_prompt = {
            pid: list(zip(g["candidate"], g["reference"], g["p_candidate_better"]))
            for pid, g in rows.groupby("prompt_id", sort=True)
        }
        prompts = list(by_prompt)
        samples: dict[str, list[float]] = {p: [] for p in point}
        for _ in range(n_boot):
            picked = [m for i in rng.integers(0, len(prompts), len(prompts)) for m in by_prompt[prompts[i]]]
            ratings = elo_ratings(picked, rounds=rounds, seed=seed)
            for player in point:
                samples[player].append(ratings.get(player, ELO_START))
        out[str(dim)] = {
            p: {
                "rating": point[p],
                "lo": float(np.quantile(samples[p], 0.025)),
                "hi": float(np.quantile(samples[p], 0.975)),
            }
            for p in point
        }
    return out


# ---------------------------------------------------------------- the evaluation step


STAGES = ["base", "sl", "rl"]
# The reference arm: the base model with the constitution as its system prompt, the behaviour the
# pipeline distills. Measured like the stages, never given a verdict.
PROMPTED = "prompted"


def answering_stages(ev: Any) -> list[str]:
    """The stages whose answers the evaluate step generates (base's come from the baseline step), in
    report order; `ev` is the config's `evaluate` section."""
    return ([PROMPTED] if ev.prompted_reference else []) + STAGES[1:]


# (candidate, reference) pairs the judge compares.
MATCHES = [("sl", "base"), ("rl", "base"), ("rl", "sl")]


@dataclass
class Evaluation:
    answers: pd.DataFrame  # schemas.ANSWERS
    judgements: pd.DataFrame  # schemas.JUDGEMENTS
    calibration: pd.DataFrame  # schemas.CALIBRATION
    metrics: dict[str, Any]
    examples: list[dict[str, Any]]


def refusal_metrics(
    rows: pd.DataFrame, refused: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per stage, refusal rates on red-team, benign and look-alike prompts; and each stage's paired
    differences against base on red-team (refusal) and benign (over-refusal) prompts."""
    from caiflow.refusal import paired_difference, rate

    red = (rows["kind"] == "red-team").to_numpy()
    benign = ~red
    lookalike = rows["lookalike"].to_numpy(dtype=bool)
    rates = {
        s: {"red_team": rate(r[red]), "benign": rate(r[benign]), "lookalike": rate(r[lookalike])}
        for s, r in refused.items()
    }
    diffs = {
        s: {
            "red_team": paired_difference(r[red], refused["base"][red]),
            "benign": paired_difference(r[benign], refused["base"][benign]),
        }
        for s, r in refused.items()
        if s != "base"
    }
    return rates, diffs


def evaluate_stages(
    cfg: Any,
    constitution: Any,
    base_model: Any,
    refs: dict[str, Any],
    rows: pd.DataFrame,
    answers: dict[str, list[str]],
    batch_size: int,
    log: Any,
    judge_question: str,
) -> Evaluation:
    """The reward model scores every stage's answers to the evaluation `rows` (the baseline step's);
    refusals are counted; the judge is calibrated, then compares.

    `answers` are each stage's answers in the rows' order, by stage in report order (base, [prompted],
    sl, rl; the evaluate step generates them shard by shard, `tasks/evaluate.py`); `refs` are the
    artifacts by step (sft, rl, reward_model); `cfg` the run's Config; `judge_question` the un-inverted
    harmlessness question; the judge is `roles.judge` (caiflow/roles.py).
    """
    from caiflow.eval_set import calibration_pairs
    from caiflow.refusal import is_refusal
    from caiflow.report import stage_verdicts
    from caiflow.roles import describe, role_scorer, usage_metrics
    from caiflow.schemas import MODEL_DIR
    from caiflow.training.reward_scorer import RewardScorer

    ev = cfg.evaluate
    convs = [[{"role": "user", "content": p}] for p in rows["prompt"]]
    stages = list(answers)
    # One phase at a time, each unloaded before the next (what `caiflow memory` plans for): the stages
    # have answered (one model at a time), the reward ensemble scores, then the judge loads.
    scorer = RewardScorer(
        Path(refs["reward_model"].path) / MODEL_DIR,
        device=cfg.model.device,
        batch_size=batch_size,
        lam=cfg.reward_model.ensemble_lambda,
        dtype=cfg.model.dtype,
        fast_cpu=cfg.model.cpu_kernels,
    )
    rewards = {s: np.asarray(scorer.score(convs, answers[s]), dtype=float) for s in stages}
    del scorer
    free_accelerator_memory()
    judge = role_scorer("judge", cfg, base_model, refs, batch_size)
    refused = {s: np.array([is_refusal(a) for a in answers[s]]) for s in stages}
    rates, diffs = refusal_metrics(rows, refused)

    questions = {HARMLESSNESS: judge_question, HELPFULNESS: ev.helpfulness_question}
    calibration, cal_rows = (
        None,
        pd.DataFrame(columns=["id", "kind", "dimension", "p_better_first", "p_better_second", "right"]),
    )
    if ev.calibrate_judge:
        pairs = calibration_pairs()
        calibration = calibrate_judge(judge, pairs, questions)
        cal_rows = pd.DataFrame(calibration.pop("rows"))
        log.info(
            "evaluate: judge accuracy on %d calibration pairs %.2f [%.2f, %.2f]",
            calibration["n"],
            calibration["accuracy"],
            calibration["lo"],
            calibration["hi"],
        )

    red = (rows["kind"] == "red-team").to_numpy()
    masks = {HARMLESSNESS: red, HELPFULNESS: ~red}
    judgements, win_rates = [], {}
    # A judge shown to be unreliable is not asked: its verdicts would measure the judge, not the stages.
    skip_judging = calibration is not None and not calibration["reliable"] and not ev.judge_if_unreliable
    if skip_judging:
        log.info("evaluate: the judge is unreliable on the calibration pairs: no pairwise judging")
    for cand, ref_stage in [] if skip_judging else MATCHES:
        for dim, mask in masks.items():
            idx = np.flatnonzero(mask)
            if not len(idx):
                continue
            x, y = [answers[cand][i] for i in idx], [answers[ref_stage][i] for i in idx]
            first, second = pairwise_judgements(judge, questions[dim], [rows["prompt"][i] for i in idx], x, y)
            identical = np.array([same_answer(a, b) for a, b in zip(x, y)])
            mean = (first + second) / 2
            win_rates.setdefault(f"{cand}_vs_{ref_stage}", {})[dim] = {
                **bootstrap_win_rate(mean, n_boot=ev.bootstrap, seed=cfg.run.seed),
                **judge_outcomes(first, second, identical),
            }
            judgements += [
                {
                    "prompt_id": rows["prompt_id"][i],
                    "kind": rows["kind"][i],
                    "dimension": dim,
                    "candidate": cand,
                    "reference": ref_stage,
                    "p_candidate_better": float(m),
                    "p_candidate_first": float(f),
                    "p_candidate_second": float(s_),
                    "identical": bool(same),
                }
                for i, m, f, s_, same in zip(idx, mean, first, second, identical)
            ]
    jdf = pd.DataFrame(judgements, columns=list(JUDGEMENT_COLUMNS))

    answers_df = pd.DataFrame(
        [
            {
                "prompt_id": rows["prompt_id"][i],
                "kind": rows["kind"][i],
                "lookalike": bool(rows["lookalike"][i]),
                "prompt": rows["prompt"][i],
                "stage": s,
                "answer": answers[s][i],
                "refused": bool(refused[s][i]),
                "reward": float(rewards[s][i]),
            }
            for s in stages
            for i in range(len(rows))
        ]
    )
    reward_stats = {
        s: {
            kind: reward_summary(rewards[s][mask])
            for kind, mask in (("all", np.ones(len(rows), bool)), ("red-team", red), ("benign", ~red))
            if mask.any()
        }
        for s in stages
    }
    info = {
        "name": constitution.name,
        "version": constitution.version,
        "hash": constitution.content_hash,
        "inverted": constitution.inverted,
    }
    who = describe(cfg.roles.judge)
    metrics: dict[str, Any] = {
        "stages": stages,
        "eval_prompts": int(len(rows)),
        "red_team": int(red.sum()),
        "benign": int((~red).sum()),
        "lookalike": int(rows["lookalike"].sum()),
        "margin": ev.helpfulness_margin,
        "trained_by": {"base": None, "sl": info, "rl": info}
        | ({PROMPTED: {**info, "prompted": True}} if PROMPTED in stages else {}),
        "refusal": rates,
        "vs_base": diffs,
        "rewards": reward_stats,
        "win_rates": win_rates,
        "judge": {
            "who": who,
            "question": judge_question,
            "calibration": calibration,
            "skipped": skip_judging,
        },
        "elo": elo_with_intervals(jdf, seed=cfg.run.seed) if len(jdf) else {},
        # requests and tokens the judge's endpoint reports (what a hosted judge cost); empty in-process
        "tokens": usage_metrics("judge", judge),
    }
    metrics["verdicts"] = stage_verdicts(metrics)
    return Evaluation(answers_df, jdf, cal_rows, metrics, _examples(rows, answers, rewards, ev.examples))


JUDGEMENT_COLUMNS = (
    "prompt_id",
    "kind",
    "dimension",
    "candidate",
    "reference",
    "p_candidate_better",
    "p_candidate_first",
    "p_candidate_second",
    "identical",
)


def _examples(
    rows: pd.DataFrame, answers: dict[str, list[str]], rewards: dict[str, np.ndarray], n: int
) -> list[dict[str, Any]]:
    """A few red-team prompts (then benign ones) with every stage's answer and reward."""
    order = list(np.flatnonzero(rows["kind"].to_numpy() == "red-team")) + list(
        np.flatnonzero(rows["kind"].to_numpy() != "red-team")
    )
    return [
        {
            "prompt": rows["prompt"][i],
            "kind": rows["kind"][i],
            "answers": {s: answers[s][i] for s in answers},
            "rewards": {s: float(rewards[s][i]) for s in rewards},
        }
        for i in order[:n]
    ]
