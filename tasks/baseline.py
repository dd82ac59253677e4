"""Step baseline: the evaluation prompts and the base model's answers to them.

The evaluation set is the held-out prompts plus `evaluate.prompts` (by default the report part
of the built-in look-alike set: benign prompts that only look harmful). The base model answers
them as every stage will (`evaluate.sampling`, greedy by default), shard by shard. Nothing here
depends on the constitution, so a constitution and its inversion (`caiflow compare`) share
this step and compare their stages against the very same base answers.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from caiflow import schemas
from caiflow.config import Config
from caiflow.eval_set import eval_sampling, evaluation_prompts
from caiflow.models import ResolvedModel, policy_engine
from caiflow.refusal import is_refusal
from caiflow.seeds import row_seed
from caiflow.sharded import ShardedOutput
from tasks.common import Progress, markdown_stats, retry_scaled
from tasks.harness import StepContext, StepOutput
from tasks.shards import run_shards


class BaseAnswers:
    """Evaluation prompt records -> the base model's answers. Loads the model on first use; picklable
    before that, so a Ray actor builds it once and keeps it."""

    def __init__(self, cfg: Config, model: ResolvedModel, batch_size: int):
        self.cfg, self.model, self.batch_size = cfg, model, batch_size
        self.engine: Any = None

    def __call__(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cfg = self.cfg
        if self.engine is None:
            self.engine = policy_engine("base", cfg.model, self.model, {}, self.batch_size, cfg.generation)
        convs = [[{"role": "user", "content": r["prompt"]}] for r in chunk]
        seeds = [row_seed(cfg.run.seed, r["prompt_id"], "eval") for r in chunk]
        answers = self.engine.generate(convs, eval_sampling(cfg), seeds)
        return [{**r, "answer": a, "refused": is_refusal(a)} for r, a in zip(chunk, answers)]

    def metrics(self) -> dict[str, Any]:
        """The engine's out-of-memory back-off, when it ran here."""
        return self.engine.engine_metrics(self.batch_size) if self.engine else {}


def run(ctx: StepContext) -> StepOutput:
    cfg = ctx.cfg
    rows, counts = evaluation_prompts(ctx.read("prompts"), cfg)
    if rows.empty:
        raise ValueError(
            "no evaluation prompts: raise prompts.eval_fraction, or add sources under evaluate.prompts."
        )
    records = rows.to_dict(orient="records")
    output = ShardedOutput(
        ctx.store, ctx.step, ctx.fingerprint, schemas.BASELINE, cfg.generation.shard_size, records
    )
    progress = Progress("baseline-progress", len(records), "base model answers")
    start_batch = retry_scaled(cfg.generation.batch_size)
    factory = partial(BaseAnswers, cfg, ctx.model, start_batch)
    generated, maker = run_shards(
        ctx, output, factory, start_batch, on_progress=lambda done: progress.update(done, force=True)
    )
    df = ctx.store.read_table(ctx.artifact_dir)
    red, benign = df[df["kind"] == "red-team"], df[df["kind"] == "benign"]
    metrics: dict[str, Any] = {
        **counts,
        **generated,
        "prompts": len(df),
        "red_team": len(red),
        "benign": len(benign),
        "lookalike": int(df["lookalike"].sum()),
        "base_refuses_red_team": round(float(red["refused"].mean()), 4) if len(red) else None,
        "base_refuses_benign": round(float(benign["refused"].mean()), 4) if len(benign) else None,
    }
    if maker is not None:
        metrics.update(maker.metrics())
    return StepOutput(
        rows=len(df),
        metrics=metrics,
        params={
            "evaluate_sampling": cfg.evaluate.sampling.fingerprint_dict(),
            "model": ctx.model.identity,
            "seed": cfg.run.seed,
        },
        tables=[
            (
                "baseline-preview",
                df[["kind", "lookalike", "prompt", "answer", "refused"]],
                "Evaluation prompts and the base model's answers",
            )
        ],
        markdown=[
            ("baseline-report", markdown_stats("Baseline", metrics), "Evaluation set and base refusals")
        ],
    )
