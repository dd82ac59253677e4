"""Step 7, evaluate: base vs SL vs RL on the evaluation prompts.

The baseline step holds the evaluation prompts and the base model's answers; here SL and RL
answer the same prompts (greedy by default, so the stages are comparable), the reward model
scores every answer, refusals are counted (judge-free), and the judge, after being measured on
the calibration pairs, compares SL and RL with base and RL with SL in both presentation orders
(`caiflow.evaluation.evaluate_stages`). Output: `data/` (every answer, its refusal flag and
reward), `judgements/` (every comparison, both orders), `calibration/` (the judge on pairs with
a known answer), `plots/*.png`, `report.md` (also the `evaluate-report` Prefect artifact).
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from caiflow import plots, schemas
from caiflow.evaluation import evaluate_stages
from caiflow.plan import judge_question
from caiflow.report import render_report
from tasks.common import retry_scaled
from tasks.harness import StepContext, StepOutput


def run(ctx: StepContext) -> StepOutput:
    cfg = ctx.cfg
    rows = ctx.read("baseline")
    result = evaluate_stages(
        cfg,
        ctx.constitution,
        ctx.model,
        ctx.upstream,
        rows,
        retry_scaled(cfg.generation.batch_size),
        ctx.log,
        judge_question(cfg),
    )
    store, step, fp = ctx.store, ctx.step, ctx.fingerprint
    store.write_table(step, fp, result.answers, schemas.ANSWERS)
    store.write_table(step, fp, result.judgements, schemas.JUDGEMENTS, name="judgements")
    store.write_table(step, fp, result.calibration, schemas.CALIBRATION, name="calibration")
    pictures = draw(ctx, result)
    files = {title: path.relative_to(ctx.artifact_dir).as_posix() for title, path in pictures.items()}
    (ctx.artifact_dir / "report.md").write_text(
        render_report(result.metrics, result.examples, files), encoding="utf-8"
    )
    ctx.log.info("evaluate: report at %s", ctx.artifact_dir / "report.md")
    # The UI's copy carries the pictures inline (data URLs): a Prefect artifact cannot point at local files.
    inline = {
        title: "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        for title, path in pictures.items()
    }
    return StepOutput(
        rows=len(result.answers),
        metrics=result.metrics,
        params={
            "evaluate": cfg.evaluate.fingerprint_dict(),
            "constitution": ctx.constitution.content_hash,
            "seed": cfg.run.seed,
        },
        tables=[
            (
                "evaluate-answers",
                result.answers,
                "Every stage's answer to each eval prompt, refusal and reward",
            )
        ],
        markdown=[
            (
                "evaluate-report",
                render_report(result.metrics, result.examples, inline),
                "Verdict: refusal and over-refusal of SL and RL vs base, the judge's calibration, pictures",
            )
        ],
    )


def draw(ctx: StepContext, result) -> dict[str, Path]:
    """The report's pictures under plots/ (only those with something to show)."""
    folder = ctx.artifact_dir / "plots"
    answers, metrics = result.answers, result.metrics
    rewards = {s: answers.loc[answers["stage"] == s, "reward"].to_numpy() for s in metrics["stages"]}
    kinds = answers.loc[answers["stage"] == "base", "kind"].to_numpy()
    history = ctx.upstream["rl"].metrics.get("history") or []
    drawn = {
        "Refusal and over-refusal per stage": plots.refusal_plot(metrics["refusal"], folder / "refusal.png"),
        "Reward-model scores per stage": plots.rewards_plot(
            rewards, np.asarray(kinds), folder / "rewards.png"
        ),
        "RL reward, KL and length over steps": plots.rl_plot(history, folder / "rl.png"),
        "Elo ratings with 95% intervals": plots.elo_plot(metrics["elo"], folder / "elo.png"),
    }
    return {title: path for title, path in drawn.items() if path is not None}
