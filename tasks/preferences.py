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
from prefect import task

from caiflow.config import Config
from caiflow.constitution import Constitution
from caiflow.faults import kill_point
from caiflow.feedback import SCHEMA, feedback_metrics, label_pairs
from caiflow.generation import Sampling
from caiflow.models import ResolvedModel
from caiflow.seeds import row_seed
from caiflow.store import ArtifactRef, Store
from tasks.common import (
    Progress,
    attempt,
    choice_scorer,
    locked,
    logger,
    markdown_stats,
    policy_engine,
    publish_markdown,
    publish_table,
    retry_scaled,
    task_options,
)

STEP = "preferences"


def train_prompts(store: Store, prompts_ref: ArtifactRef, split: str, include_benign: bool = True) -> pd.DataFrame:
    """Kept prompts of one split, in a fixed order (by prompt id), so shards are stable."""
    prompts = store.read_table(prompts_ref)
    rows = prompts[prompts["drop_reason"].isna() & (prompts["split"] == split)]
    if not include_benign:
        rows = rows[rows["kind"] == "red-team"]
    return rows.sort_values("prompt_id", kind="stable").reset_index(drop=True)


@locked(STEP)
def run_preferences(cfg: Config, constitution: Constitution, model: ResolvedModel, storage: str, fingerprint: str,
                    inputs: dict[str, str], prompts_ref: ArtifactRef, sft_ref: ArtifactRef) -> ArtifactRef:
    """The step's logic, callable without Prefect."""
    store = Store(storage)
    done = store.load_ref(STEP, fingerprint)
    if done is not None:
        return done
    log = logger()
    p = cfg.preferences
    rows = train_prompts(store, prompts_ref, "train", p.include_benign)
    records = rows[["prompt_id", "prompt", "kind"]].to_dict(orient="records")
    writer = store.shard_writer(STEP, fingerprint, SCHEMA, cfg.generation.shard_size)
    writer.remove_stale(len(records))
    pending = writer.pending(len(records))
    log.info("preferences: %d train prompts, %d shard(s) to do, feedback from %s", len(records), len(pending),
             p.feedback_model)
    progress = Progress("preferences-progress", len(records), "preference pairs")
    done_rows = len(records) - sum(stop - start for _, start, stop in pending)
    progress.update(done_rows)

    engine = scorer = None
    if pending:
        refs = {"sft": sft_ref}
        batch = retry_scaled(cfg.generation.batch_size)
        engine = policy_engine("sl", cfg, model, store, refs, batch)
        scorer = choice_scorer(p.feedback_model, p.openai, cfg, model, store, refs, batch, engines={"sl": engine})
    sampling = Sampling(max_new_tokens=p.sampling.max_new_tokens, temperature=p.sampling.temperature,
                        top_p=p.sampling.top_p)
    for index, start, stop in pending:
        chunk = records[start:stop]
        convs = [[{"role": "user", "content": r["prompt"]}] for r in chunk for _ in (0, 1)]
        seeds = [row_seed(cfg.run.seed, r["prompt_id"], f"pair-{side}") for r in chunk for side in "ab"]
        answers = engine.generate(convs, sampling, seeds)
        pairs = pd.DataFrame({"prompt_id": [r["prompt_id"] for r in chunk],
                              "prompt": [r["prompt"] for r in chunk],
                              "answer_a": answers[0::2], "answer_b": answers[1::2]})
        labelled = label_pairs(scorer, constitution, pairs, seed=cfg.run.seed,
                               principles_per_pair=p.principles_per_pair,
                               clamp=tuple(p.clamp) if p.clamp else None, margin=p.undecided_margin)
        writer.write(index, labelled)
        kill_point(f"{STEP}:shard:{index}")
        done_rows += stop - start
        progress.update(done_rows, force=True)

    df = store.read_table(store.artifact_dir(STEP, fingerprint))
    metrics: dict[str, Any] = feedback_metrics(df)
    # every pair depends on the SL model, so nothing is reused across runs; only shards that an
    # interrupted attempt at this same artifact left finished are taken as they are
    generated = sum(stop - start for _, start, stop in pending)
    metrics.update(rows_generated=generated, rows_reused=len(records) - generated)
    if engine is not None:
        metrics.update(oom_backoffs=engine.backoffs, final_batch_size=engine.batch_size, task_attempt=attempt(),
                       start_batch_size=retry_scaled(cfg.generation.batch_size))
    ref = store.finalize(STEP, fingerprint, rows=len(df), metrics=metrics, inputs=inputs,
                         params={"preferences": p.fingerprint_dict(), "constitution": constitution.content_hash,
                                 "seed": cfg.run.seed})
    publish_table("preferences-preview", df[["answer_a", "answer_b", "label", "position_bias", "drop_reason"]],
                  "First preference pairs: both answers, P(chosen better), position bias")
    publish_markdown("preferences-report", markdown_stats("AI-feedback preferences", metrics) + _examples(df),
                     "Label statistics and examples")
    log.info("preferences: %s", metrics)
    return ref


def _examples(df: pd.DataFrame, n: int = 3) -> str:
    kept = df[df["drop_reason"].isna()]
    kept = kept.reindex((kept["label"] - 0.5).abs().sort_values(ascending=False).index).head(n)
    parts = ["\n## Most decided pairs\n"]
    for _, r in kept.iterrows():
        parts.append(f"**Prompt:** {r['prompt'][0]['content']}\n\n**Chosen** (p={r['label']:.2f}): "
                     f"{r['chosen'][0]['content']}\n\n**Rejected:** {r['rejected'][0]['content']}\n\n---\n")
    return "\n".join(parts)


@task(**task_options(STEP, tags=["gpu"]))
def preferences_task(cfg: Config, constitution: Constitution, model: ResolvedModel, storage: str, step: str,
                     fingerprint: str, inputs: dict[str, str], prompts_ref: ArtifactRef,
                     sft_ref: ArtifactRef) -> ArtifactRef:
    return run_preferences(cfg, constitution, model, storage, fingerprint, inputs, prompts_ref, sft_ref)
