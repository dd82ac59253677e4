"""Step 7, evaluate: base vs SL vs RL on the held-out prompts.

Every stage answers the eval prompts (greedy by default, so the stages are comparable); the
reward model scores every answer; a judge (the base model by default) compares SL and RL with
the base model, and RL with SL, in both presentation orders: on harmlessness for red-team
prompts, on helpfulness for benign prompts. Win rates carry a bootstrap 95% interval; Elo
ratings summarise all comparisons. Output: `data/` (every answer with its reward),
`judgements/` (every comparison), `report.md` (also a Prefect markdown artifact).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from prefect import task

from caiflow.config import Config
from caiflow.constitution import Constitution
from caiflow.evaluation import bootstrap_win_rate, elo_ratings, pairwise_judgements, render_report, reward_summary
from caiflow.generation import Sampling
from caiflow.models import ResolvedModel
from caiflow.seeds import row_seed
from caiflow.store import ArtifactRef, Store
from caiflow.training.reward import RewardScorer
from tasks.common import (
    choice_scorer,
    locked,
    logger,
    policy_engine,
    publish_markdown,
    publish_table,
    retry_scaled,
    task_options,
)
from tasks.preferences import train_prompts

STEP = "evaluate"
STAGES = ["base", "sl", "rl"]
# (candidate, reference) pairs the judge compares.
MATCHES = [("sl", "base"), ("rl", "base"), ("rl", "sl")]

ANSWERS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("kind", pa.string()), ("prompt", pa.string()), ("stage", pa.string()),
    ("answer", pa.string()), ("reward", pa.float64()),
])
JUDGEMENTS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("kind", pa.string()), ("dimension", pa.string()), ("candidate", pa.string()),
    ("reference", pa.string()), ("p_candidate_better", pa.float64()),
])


@locked(STEP)
def run_evaluate(cfg: Config, constitution: Constitution, model: ResolvedModel, storage: str, fingerprint: str,
                 inputs: dict[str, str], prompts_ref: ArtifactRef, sft_ref: ArtifactRef, reward_ref: ArtifactRef,
                 rl_ref: ArtifactRef) -> ArtifactRef:
    """The step's logic, callable without Prefect."""
    store = Store(storage)
    done = store.load_ref(STEP, fingerprint)
    if done is not None:
        return done
    log = logger()
    ev = cfg.evaluate
    rows = train_prompts(store, prompts_ref, "eval")
    if rows.empty:
        raise ValueError("no held-out prompts to evaluate on: raise prompts.eval_fraction or add prompts.")
    refs = {"sft": sft_ref, "rl": rl_ref}
    batch = retry_scaled(cfg.generation.batch_size)
    sampling = Sampling(max_new_tokens=ev.sampling.max_new_tokens, temperature=ev.sampling.temperature,
                        top_p=ev.sampling.top_p)
    convs = [[{"role": "user", "content": p}] for p in rows["prompt"]]
    seeds = [row_seed(cfg.run.seed, pid, "eval") for pid in rows["prompt_id"]]

    answers: dict[str, list[str]] = {}
    judge = None
    for stage in STAGES:
        engine = policy_engine(stage, cfg, model, store, refs, batch)
        log.info("evaluate: %s answers %d eval prompts", stage, len(convs))
        answers[stage] = engine.generate(convs, sampling, seeds)
        if ev.judge == stage:
            judge = engine  # keep the judge loaded; free the others
        del engine
        gc.collect()
    if judge is None:
        judge = choice_scorer(ev.judge, ev.openai, cfg, model, store, refs, batch)

    scorer = RewardScorer(Path(reward_ref.path) / "model", device=cfg.model.device, batch_size=batch,
                          lam=cfg.reward_model.ensemble_lambda)
    rewards = {s: np.asarray(scorer.score(convs, answers[s]), dtype=float) for s in STAGES}
    del scorer

    red = (rows["kind"] == "red-team").to_numpy()
    harmless_q = constitution.principle(ev.harmlessness_principle).feedback_question
    questions = {"harmlessness": (harmless_q, red), "helpfulness": (ev.helpfulness_question, ~red)}
    judgements = []
    win_rates: dict[str, dict[str, dict[str, Any]]] = {}
    for cand, ref_stage in MATCHES:
        for dim, (question, mask) in questions.items():
            idx = np.flatnonzero(mask)
            if not len(idx):
                continue
            p = np.asarray(pairwise_judgements(judge, question, [rows["prompt"][i] for i in idx],
                                               [answers[cand][i] for i in idx],
                                               [answers[ref_stage][i] for i in idx]), dtype=float)
            win_rates.setdefault(f"{cand}_vs_{ref_stage}", {})[dim] = bootstrap_win_rate(
                p, n_boot=ev.bootstrap, seed=cfg.run.seed)
            judgements += [{"prompt_id": rows["prompt_id"][i], "kind": rows["kind"][i], "dimension": dim,
                            "candidate": cand, "reference": ref_stage, "p_candidate_better": float(v)}
                           for i, v in zip(idx, p)]
    jdf = pd.DataFrame(judgements, columns=JUDGEMENTS_SCHEMA.names)
    elo = {dim: elo_ratings([(r.candidate, r.reference, r.p_candidate_better)
                             for r in jdf[jdf["dimension"] == dim].itertuples()], seed=cfg.run.seed)
           for dim in questions if (jdf["dimension"] == dim).any()}

    answers_df = pd.DataFrame([
        {"prompt_id": pid, "kind": kind, "prompt": prompt, "stage": s, "answer": answers[s][i],
         "reward": float(rewards[s][i])}
        for s in STAGES for i, (pid, kind, prompt) in enumerate(zip(rows["prompt_id"], rows["kind"], rows["prompt"]))
    ])
    reward_stats = {s: {kind: reward_summary(rewards[s][mask]) for kind, mask in
                        (("all", np.ones(len(rows), bool)), ("red-team", red), ("benign", ~red)) if mask.any()}
                    for s in STAGES}
    report = render_report(
        win_rates=win_rates, rewards=reward_stats, elo=elo,
        examples=_examples(rows, answers, rewards, ev.examples),
        judge=ev.judge if ev.judge != "openai" else f"{ev.openai.model} at {ev.openai.base_url}",
    )

    base = store.artifact_dir(STEP, fingerprint)
    store.write_table(STEP, fingerprint, answers_df, ANSWERS_SCHEMA)
    store.write_table(STEP, fingerprint, jdf, JUDGEMENTS_SCHEMA, name="judgements")
    (base / "report.md").write_text(report, encoding="utf-8")
    metrics = {"eval_prompts": int(len(rows)), "red_team": int(red.sum()), "benign": int((~red).sum()),
               "win_rates": win_rates, "rewards": reward_stats, "elo": elo, "judge": ev.judge}
    ref = store.finalize(STEP, fingerprint, rows=len(answers_df), metrics=metrics, inputs=inputs,
                         params={"evaluate": ev.fingerprint_dict(), "constitution": constitution.content_hash,
                                 "seed": cfg.run.seed})
    publish_table("evaluate-answers", answers_df, "Every stage's answer to each eval prompt, with its reward")
    publish_markdown("evaluate-report", report, "Verdict: harmlessness and helpfulness of SL and RL vs base")
    log.info("evaluate: report at %s", base / "report.md")
    return ref


def _examples(rows: pd.DataFrame, answers: dict[str, list[str]], rewards: dict[str, np.ndarray],
              n: int) -> list[dict[str, Any]]:
    """A few red-team prompts (then benign ones) with every stage's answer and reward."""
    order = list(np.flatnonzero(rows["kind"].to_numpy() == "red-team")) + \
        list(np.flatnonzero(rows["kind"].to_numpy() != "red-team"))
    return [{"prompt": rows["prompt"][i], "kind": rows["kind"][i],
             "answers": {s: answers[s][i] for s in STAGES},
             "rewards": {s: float(rewards[s][i]) for s in STAGES}} for i in order[:n]]


@task(**task_options(STEP, tags=["gpu"]))
def evaluate_task(cfg: Config, constitution: Constitution, model: ResolvedModel, storage: str, step: str,
                  fingerprint: str, inputs: dict[str, str], prompts_ref: ArtifactRef, sft_ref: ArtifactRef,
                  reward_ref: ArtifactRef, rl_ref: ArtifactRef) -> ArtifactRef:
    return run_evaluate(cfg, constitution, model, storage, fingerprint, inputs, prompts_ref, sft_ref, reward_ref,
                        rl_ref)
