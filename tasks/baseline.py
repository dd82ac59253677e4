"""Step baseline: the evaluation prompts and the base model's answers to them.

The evaluation set is the held-out prompts plus `evaluate.prompts` (by default the report part
of the built-in look-alike set: benign prompts that only look harmful). The base model answers
them as every stage will (`evaluate.sampling`, greedy by default), shard by shard. Nothing here
depends on the constitution, so a constitution and its inversion (`caiflow compare`) share
this step and compare their stages against the very same base answers.
"""

from __future__ import annotations

from typing import Any

from caiflow import schemas
from caiflow.eval_set import evaluation_prompts
from caiflow.generation import Sampling
from caiflow.models import policy_engine
from caiflow.refusal import is_refusal
from caiflow.seeds import row_seed
from caiflow.sharded import ShardedOutput
from tasks.common import Progress, markdown_stats, retry_scaled
from tasks.harness import StepContext, StepOutput


def eval_sampling(cfg: Any) -> Sampling:
    s = cfg.evaluate.sampling
    return Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)


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
    sampling, start_batch = eval_sampling(cfg), retry_scaled(cfg.generation.batch_size)
    loaded: dict[str, Any] = {}

    def make(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not loaded:
            loaded["engine"] = policy_engine("base", cfg.model, ctx.model, {}, start_batch)
        convs = [[{"role": "user", "content": r["prompt"]}] for r in chunk]
        seeds = [row_seed(cfg.run.seed, r["prompt_id"], "eval") for r in chunk]
        answers = loaded["engine"].generate(convs, sampling, seeds)
        return [{**r, "answer": a, "refused": is_refusal(a)} for r, a in zip(chunk, answers)]

    generated = output.run(make, on_progress=lambda done: progress.update(done, force=True))
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
    if loaded:
        metrics.update(loaded["engine"].oom_metrics(start_batch))
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
