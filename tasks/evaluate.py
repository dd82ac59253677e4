"""Step 7, evaluate: base vs SL vs RL on the evaluation prompts.

The baseline step holds the evaluation prompts and the base model's answers; here the base model
prompted with the constitution (the reference arm, `evaluate.prompted_reference`), SL and RL
answer the same prompts (greedy by default, so the stages are comparable), stage by stage and
shard by shard like every generation step (`tasks/shards.py`: in this process, or on Ray actors
with `generation.executor.kind: ray`, one model loaded per actor and stage). Each stage's shards
are a resume point under the artifact's `work/<stage>/` (a killed evaluate redoes at most one
shard). Then, here, the reward model scores every answer, refusals are counted (judge-free), and
the judge, after being measured on the calibration pairs, compares SL and RL with base and RL
with SL in both presentation orders (`caiflow.evaluation.evaluate_stages`). Output: `data/`
(every answer, its refusal flag and reward), `judgements/` (every comparison, both orders),
`calibration/` (the judge on pairs with a known answer), `plots/*.png`, `report.md` (also the
`evaluate-report` Prefect artifact).
"""

from __future__ import annotations

import base64
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from caiflow import plots, schemas
from caiflow.config import Config
from caiflow.eval_set import eval_sampling
from caiflow.evaluation import PROMPTED, answering_stages, evaluate_stages
from caiflow.faults import free_accelerator_memory
from caiflow.models import ResolvedModel, policy_engine
from caiflow.plan import judge_question
from caiflow.report import render_report
from caiflow.seeds import row_seed
from caiflow.sharded import ShardedOutput
from tasks.common import Progress, retry_scaled
from tasks.harness import StepContext, StepOutput
from tasks.shards import run_shards


class StageAnswers:
    """Evaluation prompt records -> one stage's answers (`prompted`: the base model under `system`, the
    constitution as system prompt). Loads the model on first use; picklable before that, so a Ray actor
    builds it once and keeps it for every shard of the stage."""

    def __init__(
        self,
        cfg: Config,
        stage: str,
        model: ResolvedModel,
        refs: dict[str, Any],
        batch_size: int,
        system: str | None = None,
    ):
        self.cfg, self.stage, self.model, self.refs = cfg, stage, model, refs
        self.batch_size, self.system = batch_size, system
        self.engine: Any = None

    def __call__(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cfg = self.cfg
        if self.engine is None:
            engine_stage = "base" if self.stage == PROMPTED else self.stage
            self.engine = policy_engine(
                engine_stage, cfg.model, self.model, self.refs, self.batch_size, cfg.generation
            )
        system = [{"role": "system", "content": self.system}] if self.system else []
        convs = [system + [{"role": "user", "content": r["prompt"]}] for r in chunk]
        # the same seed for a prompt in every stage and in baseline: the stages differ by model only
        seeds = [row_seed(cfg.run.seed, r["prompt_id"], "eval") for r in chunk]
        answers = self.engine.generate(convs, eval_sampling(cfg), seeds)
        return [{"prompt_id": r["prompt_id"], "answer": a} for r, a in zip(chunk, answers)]

    def metrics(self) -> dict[str, Any]:
        """The engine's out-of-memory back-off, when it ran here."""
        return self.engine.engine_metrics(self.batch_size) if self.engine else {}


def stage_answers(
    ctx: StepContext, rows: pd.DataFrame, batch_size: int
) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Every stage's answers to the evaluation `rows`, in their order, by stage in report order (base's from
    the baseline step); and per generated stage, rows generated or found done and the engine's metrics."""
    cfg = ctx.cfg
    records = [{"prompt_id": pid, "prompt": p} for pid, p in zip(rows["prompt_id"], rows["prompt"])]
    stages = answering_stages(cfg.evaluate)
    answers, report = {"base": rows["answer"].tolist()}, {}
    progress = Progress("evaluate-progress", len(records) * len(stages), "evaluation answers")
    for i, stage in enumerate(stages):
        output = ShardedOutput(
            ctx.store,
            ctx.step,
            ctx.fingerprint,
            schemas.STAGE_ANSWERS,
            cfg.generation.shard_size,
            records,
            part=stage,
        )
        system = ctx.constitution.as_system_prompt() if stage == PROMPTED else None
        factory = partial(StageAnswers, cfg, stage, ctx.model, ctx.upstream, batch_size, system)
        ctx.log.info(
            "evaluate: %s answers %d prompts (%d shard(s) to make)", stage, len(records), len(output.pending)
        )

        def on_progress(done: int, before: int = i * len(records)) -> None:
            progress.update(before + done, force=True)

        counts, maker = run_shards(ctx, output, factory, batch_size, on_progress=on_progress)
        report[stage] = {**counts, **(maker.metrics() if maker is not None else {})}
        del maker  # one stage's model at a time (on Ray, the actors dropped theirs)
        free_accelerator_memory()
        answers[stage] = output.read()["answer"].tolist()
    return answers, report


def run(ctx: StepContext) -> StepOutput:
    cfg = ctx.cfg
    rows = ctx.read("baseline")
    batch_size = retry_scaled(cfg.generation.batch_size)
    answers, generation = stage_answers(ctx, rows, batch_size)
    result = evaluate_stages(
        cfg,
        ctx.constitution,
        ctx.model,
        ctx.upstream,
        rows,
        answers,
        batch_size,
        ctx.log,
        judge_question(cfg),
    )
    # per stage: rows generated here or found in finished shards, and the engine's out-of-memory back-off
    result.metrics["generation"] = generation
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
