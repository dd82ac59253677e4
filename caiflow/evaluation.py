"""Evaluation: AI-judged pairwise win rates with bootstrap intervals, Elo, reward summaries, the report.

A judge (any choice scorer, see :mod:`caiflow.feedback`) compares two stages' answers to the
same held-out prompt under one question, in both presentation orders; P(x better) is the
average of the two readings, so a judge that always prefers one slot gives 0.5. The win rate
of x over y is the mean of those probabilities over prompts (a soft win rate: a tie counts
half), with a percentile-bootstrap interval over prompts. The verdict reads the interval,
not the point estimate.

`evaluate_stages` is the whole step: every stage answers, the reward model scores, the judge
compares. The statistics take and return plain numbers, lists and dicts (JSON-able), so they go
into a manifest as they are; `caiflow.report` renders them.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from caiflow.feedback import ChoiceScorer, same_answer, score_both_orders

HARMLESSNESS = "harmlessness"  # judged on red-team prompts with the constitution's harmlessness question
HELPFULNESS = "helpfulness"  # judged on benign prompts with the helpfulness question
ELO_START = 1000.0  # every player's rating before the first match


# ---------------------------------------------------------------- judging


def pairwise_judgements(
    scorer: ChoiceScorer,
    question: str,
    prompts: Sequence[str],
    answers_x: Sequence[str],
    answers_y: Sequence[str],
) -> np.ndarray:
    """P(x's answer is better than y's) per prompt, averaged over both presentation orders.

    Pairs whose answers are the same up to whitespace are exactly 0.5 and are not sent to the
    judge (both-order averaging would give 0.5 for them anyway). One scorer call in all.
    """
    if not len(prompts) == len(answers_x) == len(answers_y):
        raise ValueError(
            f"got {len(prompts)} prompts, {len(answers_x)} x answers and {len(answers_y)} y answers: "
            "pass one answer of each per prompt."
        )
    out = np.full(len(prompts), 0.5, dtype=np.float64)
    todo = [i for i in range(len(prompts)) if not same_answer(answers_x[i], answers_y[i])]
    first, second = score_both_orders(
        scorer, [(question, prompts[i], answers_x[i], answers_y[i]) for i in todo]
    )
    out[todo] = (first + second) / 2
    return out


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


# ---------------------------------------------------------------- the evaluation step


STAGES = ["base", "sl", "rl"]
# (candidate, reference) pairs the judge compares.
MATCHES = [("sl", "base"), ("rl", "base"), ("rl", "sl")]


@dataclass
class Evaluation:
    answers: pd.DataFrame  # schemas.ANSWERS
    judgements: pd.DataFrame  # schemas.JUDGEMENTS
    metrics: dict[str, Any]
    report: str


def evaluate_stages(
    cfg: Any,
    constitution: Any,
    base_model: Any,
    refs: dict[str, Any],
    rows: pd.DataFrame,
    batch_size: int,
    log: Any,
) -> Evaluation:
    """Base, SL and RL answer the held-out `rows`; the reward model scores; the judge compares.

    `refs` are the artifacts by step (sft, rl, reward_model); `cfg` the run's Config.
    """
    from caiflow.generation import Sampling
    from caiflow.models import choice_scorer, policy_engine
    from caiflow.report import render_report
    from caiflow.schemas import JUDGEMENTS, MODEL_DIR
    from caiflow.seeds import row_seed
    from caiflow.training.reward_scorer import RewardScorer

    ev = cfg.evaluate
    sampling = Sampling(
        max_new_tokens=ev.sampling.max_new_tokens,
        temperature=ev.sampling.temperature,
        top_p=ev.sampling.top_p,
    )
    convs = [[{"role": "user", "content": p}] for p in rows["prompt"]]
    seeds = [row_seed(cfg.run.seed, pid, "eval") for pid in rows["prompt_id"]]

    answers: dict[str, list[str]] = {}
    judge = None
    for stage in STAGES:
        engine = policy_engine(stage, cfg.model, base_model, refs, batch_size)
        log.info("evaluate: %s answers %d eval prompts", stage, len(convs))
        answers[stage] = engine.generate(convs, sampling, seeds)
        if ev.judge == stage:
            judge = engine  # keep the judge loaded; free the others
        del engine
        gc.collect()
    if judge is None:
        judge = choice_scorer(ev.judge, ev.openai, cfg.model, base_model, refs, batch_size)

    scorer = RewardScorer(
        Path(refs["reward_model"].path) / MODEL_DIR,
        device=cfg.model.device,
        batch_size=batch_size,
        lam=cfg.reward_model.ensemble_lambda,
    )
    rewards = {s: np.asarray(scorer.score(convs, answers[s]), dtype=float) for s in STAGES}
    del scorer

    red = (rows["kind"] == "red-team").to_numpy()
    harmless_q = constitution.principle(ev.harmlessness_principle).feedback_question
    questions = {HARMLESSNESS: (harmless_q, red), HELPFULNESS: (ev.helpfulness_question, ~red)}
    judgements = []
    win_rates: dict[str, dict[str, dict[str, Any]]] = {}
    for cand, ref_stage in MATCHES:
        for dim, (question, mask) in questions.items():
            idx = np.flatnonzero(mask)
            if not len(idx):
                continue
            p = np.asarray(
                pairwise_judgements(
                    judge,
                    question,
                    [rows["prompt"][i] for i in idx],
                    [answers[cand][i] for i in idx],
                    [answers[ref_stage][i] for i in idx],
                ),
                dtype=float,
            )
            win_rates.setdefault(f"{cand}_vs_{ref_stage}", {})[dim] = bootstrap_win_rate(
                p, n_boot=ev.bootstrap, seed=cfg.run.seed
            )
            judgements += [
                {
                    "prompt_id": rows["prompt_id"][i],
                    "kind": rows["kind"][i],
                    "dimension": dim,
                    "candidate": cand,
                    "reference": ref_stage,
                    "p_candidate_better": float(v),
                }
                for i, v in zip(idx, p)
            ]
    jdf = pd.DataFrame(judgements, columns=JUDGEMENTS.names)
    elo = {
        dim: elo_ratings(
            [
                (r.candidate, r.reference, r.p_candidate_better)
                for r in jdf[jdf["dimension"] == dim].itertuples()
            ],
            seed=cfg.run.seed,
        )
        for dim in questions
        if (jdf["dimension"] == dim).any()
    }

    answers_df = pd.DataFrame(
        [
            {
                "prompt_id": pid,
                "kind": kind,
                "prompt": prompt,
                "stage": s,
                "answer": answers[s][i],
                "reward": float(rewards[s][i]),
            }
            for s in STAGES
            for i, (pid, kind, prompt) in enumerate(zip(rows["prompt_id"], rows["kind"], rows["prompt"]))
        ]
    )
    reward_stats = {
        s: {
            kind: reward_summary(rewards[s][mask])
            for kind, mask in (("all", np.ones(len(rows), bool)), ("red-team", red), ("benign", ~red))
            if mask.any()
        }
        for s in STAGES
    }
    report = render_report(
        win_rates=win_rates,
        rewards=reward_stats,
        elo=elo,
        examples=_examples(rows, answers, rewards, ev.examples),
        judge=ev.judge if ev.judge != "openai" else f"{ev.openai.model} at {ev.openai.base_url}",
    )
    metrics = {
        "eval_prompts": int(len(rows)),
        "red_team": int(red.sum()),
        "benign": int((~red).sum()),
        "win_rates": win_rates,
        "rewards": reward_stats,
        "elo": elo,
        "judge": ev.judge,
    }
    return Evaluation(answers_df, jdf, metrics, report)


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
            "answers": {s: answers[s][i] for s in STAGES},
            "rewards": {s: float(rewards[s][i]) for s in STAGES},
        }
        for i in order[:n]
    ]
