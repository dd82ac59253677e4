"""Step 7, evaluate: base vs SL vs RL on the held-out prompts.

Every stage answers the eval prompts (greedy by default, so the stages are comparable); the
reward model scores every answer; a judge (the base model by default) compares SL and RL with
the base model, and RL with SL, in both presentation orders: on harmlessness for red-team
prompts, on helpfulness for benign prompts (`caiflow.evaluation.evaluate_stages`). Output:
`data/` (every answer with its reward), `judgements/` (every comparison), `report.md` (also a
Prefect markdown artifact).
"""

from __future__ import annotations

from caiflow import schemas
from caiflow.evaluation import evaluate_stages
from caiflow.prompt_filters import kept_prompts
from tasks.common import retry_scaled
from tasks.harness import StepContext, StepOutput


def run(ctx: StepContext) -> StepOutput:
    cfg = ctx.cfg
    rows = kept_prompts(ctx.read("prompts"), "eval")
    if rows.empty:
        raise ValueError("no held-out prompts to evaluate on: raise prompts.eval_fraction or add prompts.")
    result = evaluate_stages(
        cfg, ctx.constitution, ctx.model, ctx.upstream, rows, retry_scaled(cfg.generation.batch_size), ctx.log
    )
    ctx.store.write_table(ctx.step, ctx.fingerprint, result.answers, schemas.ANSWERS)
    ctx.store.write_table(ctx.step, ctx.fingerprint, result.judgements, schemas.JUDGEMENTS, name="judgements")
    (ctx.artifact_dir / "report.md").write_text(result.report, encoding="utf-8")
    ctx.log.info("evaluate: report at %s", ctx.artifact_dir / "report.md")
    return StepOutput(
        rows=len(result.answers),
        metrics=result.metrics,
        params={
            "evaluate": cfg.evaluate.fingerprint_dict(),
            "constitution": ctx.constitution.content_hash,
            "seed": cfg.run.seed,
        },
        tables=[
            ("evaluate-answers", result.answers, "Every stage's answer to each eval prompt, with its reward")
        ],
        markdown=[
            ("evaluate-report", result.report, "Verdict: harmlessness and helpfulness of SL and RL vs base")
        ],
    )
