"""Step 4, preferences: AI-feedback preference pairs (RLAIF), written shard by shard.

For every training prompt the SL model samples two answers; a feedback model (the SL model as
in the original recipe, the base model, or an OpenAI-compatible endpoint with logprobs) is asked
a sampled principle's feedback question with options (A)/(B), in both orders, and the soft label
is the normalised probability, averaged. Output rows use TRL's preference columns (`prompt`,
`chosen`, `rejected`) plus the label, the principles, both raw probabilities and the position
bias; pairs with identical answers or an undecided label are kept with a `drop_reason`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from caiflow import schemas
from caiflow.feedback import feedback_metrics, label_pairs
from caiflow.generation import Sampling
from caiflow.models import choice_scorer, policy_engine
from caiflow.prompt_filters import kept_prompts
from caiflow.seeds import row_seed
from caiflow.sharded import ShardedOutput
from tasks.common import Progress, markdown_stats, retry_scaled
from tasks.harness import StepContext, StepOutput


def run(ctx: StepContext) -> StepOutput:
    cfg, p = ctx.cfg, ctx.cfg.preferences
    rows = kept_prompts(ctx.read("prompts"), "train", p.include_benign)
    records = rows[["prompt_id", "prompt", "kind"]].to_dict(orient="records")
    output = ShardedOutput(
        ctx.store, ctx.step, ctx.fingerprint, schemas.PREFERENCES, cfg.generation.shard_size, records
    )
    ctx.log.info(
        "preferences: %d train prompts, %d shard(s) to do, feedback from %s",
        len(records),
        len(output.pending),
        p.feedback_model,
    )
    progress = Progress("preferences-progress", len(records), "preference pairs")
    sampling = Sampling(
        max_new_tokens=p.sampling.max_new_tokens, temperature=p.sampling.temperature, top_p=p.sampling.top_p
    )
    start_batch = retry_scaled(cfg.generation.batch_size)
    loaded: dict[str, Any] = {}

    def make(chunk: list[dict[str, Any]]) -> pd.DataFrame:
        if not loaded:  # every pair depends on the SL model: load it once there is work
            loaded["engine"] = policy_engine("sl", cfg.model, ctx.model, ctx.upstream, start_batch)
            loaded["scorer"] = choice_scorer(
                p.feedback_model,
                p.openai,
                cfg.model,
                ctx.model,
                ctx.upstream,
                start_batch,
                engines={"sl": loaded["engine"]},
            )
        convs = [[{"role": "user", "content": r["prompt"]}] for r in chunk for _ in (0, 1)]
        seeds = [row_seed(cfg.run.seed, r["prompt_id"], f"pair-{side}") for r in chunk for side in "ab"]
        answers = loaded["engine"].generate(convs, sampling, seeds)
        pairs = pd.DataFrame(
            {
                "prompt_id": [r["prompt_id"] for r in chunk],
                "prompt": [r["prompt"] for r in chunk],
                "answer_a": answers[0::2],
                "answer_b": answers[1::2],
            }
        )
        return label_pairs(
            loaded["scorer"],
            ctx.constitution,
            pairs,
            seed=cfg.run.seed,
            principles_per_pair=p.principles_per_pair,
            clamp=tuple(p.clamp) if p.clamp else None,
            margin=p.undecided_margin,
        )

    # every pair depends on the SL model, so nothing is reused across runs; only shards that an
    # interrupted attempt at this same artifact left finished are taken as they are
    counts = output.run(make, on_progress=lambda done: progress.update(done, force=True))
    df = ctx.store.read_table(ctx.artifact_dir)
    metrics: dict[str, Any] = {**feedback_metrics(df), **counts}
    if loaded:
        metrics.update(loaded["engine"].oom_metrics(start_batch))
    return StepOutput(
        rows=len(df),
        metrics=metrics,
        params={
            "preferences": p.fingerprint_dict(),
            "constitution": ctx.constitution.content_hash,
            "seed": cfg.run.seed,
        },
        tables=[
            (
                "preferences-preview",
                df[["answer_a", "answer_b", "label", "position_bias", "drop_reason"]],
                "First preference pairs: both answers, P(chosen better), position bias",
            )
        ],
        markdown=[
            (
                "preferences-report",
                markdown_stats("AI-feedback preferences", metrics) + _examples(df),
                "Label statistics and examples",
            )
        ],
    )


def _examples(df: pd.DataFrame, n: int = 3) -> str:
    kept = df[df["drop_reason"].isna()]
    kept = kept.reindex((kept["label"] - 0.5).abs().sort_values(ascending=False).index).head(n)
    parts = ["\n## Most decided pairs\n"]
    for _, r in kept.iterrows():
        parts.append(
            f"**Prompt:** {r['prompt'][0]['content']}\n\n**Chosen** (p={r['label']:.2f}): "
            f"{r['chosen'][0]['content']}\n\n**Rejected:** {r['rejected'][0]['content']}\n\n---\n"
        )
    return "\n".join(parts)
