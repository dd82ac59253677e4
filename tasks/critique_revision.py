"""Step 2, critique_revision: SL-CAI data from the train prompts, written shard by shard.

Rows are processed in a fixed order (by prompt id) in shards of ``generation.shard_size``;
each finished shard is a complete Parquet file, so after a crash only unfinished shards are
redone, and per-row seeds make the resumed output identical to an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import task

from caiflow.config import Config, SamplingConfig
from caiflow.constitution import Constitution
from caiflow.faults import kill_point
from caiflow.critique import SCHEMA, Sampler, run_rows
from caiflow.generation import GenerationEngine, Sampling
from caiflow.models import ResolvedModel, load_model_and_tokenizer
from caiflow.store import ArtifactRef, Store
from tasks.common import (
    locked,
    logger,
    markdown_stats,
    Progress,
    attempt,
    publish_markdown,
    publish_table,
    retry_scaled,
    task_options,
)

STEP = "critique_revision"


def _sampling(s: SamplingConfig) -> Sampling:
    return Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)


@locked(STEP)
def run_critique_revision(cfg: Config, constitution: Constitution, model: ResolvedModel, storage: str,
                          fingerprint: str, inputs: dict[str, str], prompts_ref: ArtifactRef) -> ArtifactRef:
    """The step's logic, callable without Prefect."""
    store = Store(storage)
    done = store.load_ref(STEP, fingerprint)
    if done is not None:
        return done
    log = logger()
    c = cfg.critique_revision
    prompts = store.read_table(prompts_ref)
    rows = prompts[prompts["drop_reason"].isna() & (prompts["split"] == "train")]
    rows = rows.sort_values("prompt_id", kind="stable")[["prompt_id", "prompt", "kind", "category"]]
    records = rows.to_dict(orient="records")

    writer = store.shard_writer(STEP, fingerprint, SCHEMA, cfg.generation.shard_size)
    writer.remove_stale(len(records))
    pending = writer.pending(len(records))
    log.info("critique-revision: %d train prompts, %d shard(s) to do of %d", len(records), len(pending),
             len(writer.shard_ranges(len(records))))
    progress = Progress("critique-revision-progress", len(records), "critique-revision rows")
    done_rows = len(records) - sum(stop - start for _, start, stop in pending)
    progress.update(done_rows)
    engine = None
    if pending:
        model_obj, tok = load_model_and_tokenizer(model, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)
        engine = GenerationEngine(model_obj, tok, batch_size=retry_scaled(cfg.generation.batch_size))
    sampler = Sampler(_sampling(c.answer), _sampling(c.critique), _sampling(c.revision))
    for index, start, stop in pending:
        out = run_rows(engine, constitution, records[start:stop], rounds=c.rounds, few_shot=c.few_shot,
                       sampler=sampler, seed=cfg.run.seed, answer_benign=c.answer_benign)
        writer.write(index, out)
        kill_point(f"{STEP}:shard:{index}")
        done_rows += stop - start
        progress.update(done_rows, force=True)

    df = store.read_table(store.artifact_dir(STEP, fingerprint))
    metrics = sl_metrics(df)
    if engine is not None:
        metrics.update(oom_backoffs=engine.backoffs, final_batch_size=engine.batch_size, task_attempt=attempt(),
                       start_batch_size=retry_scaled(cfg.generation.batch_size))
    ref = store.finalize(STEP, fingerprint, rows=len(df), metrics=metrics, inputs=inputs,
                         params={"critique_revision": c.fingerprint_dict(), "constitution": constitution.content_hash,
                                 "model": model.identity, "seed": cfg.run.seed})
    publish_table("critique-revision-preview", df[["kind", "prompt", "initial_answer", "revision", "drop_reason"]],
                  "First SL-CAI rows: prompt, initial answer, final revision")
    publish_markdown("critique-revision-report", markdown_stats("Critique-revision", metrics) + examples_md(df),
                     "Statistics and before/after examples")
    log.info("critique-revision: %s", metrics)
    return ref


def sl_metrics(df: pd.DataFrame) -> dict[str, Any]:
    red = df[df["kind"] == "red-team"]
    kept = df[df["drop_reason"].isna()]
    out: dict[str, Any] = {
        "rows": int(len(df)),
        "red_team": int(len(red)),
        "benign": int((df["kind"] == "benign").sum()),
        "usable_for_sft": int(len(kept)),
        "mean_answer_chars": round(float(df["initial_answer"].str.len().mean() or 0), 1),
        "mean_revision_chars": round(float(red["revision"].str.len().mean() or 0), 1) if len(red) else 0.0,
    }
    for reason, n in df["drop_reason"].dropna().value_counts().items():
        out[f"dropped_{reason}"] = int(n)
    return out


def examples_md(df: pd.DataFrame, n: int = 3) -> str:
    red = df[(df["kind"] == "red-team") & df["drop_reason"].isna()].head(n)
    parts = ["\n## Before / after\n"]
    for _, r in red.iterrows():
        parts.append(
            f"**Prompt:** {r['prompt']}\n\n**Initial answer:** {r['initial_answer']}\n\n"
            + "".join(f"**Critique ({x['principle']}):** {x['critique']}\n\n" for x in r["rounds"])
            + f"**Revision:** {r['revision']}\n\n---\n"
        )
    return "\n".join(parts)


@task(**task_options("critique_revision", tags=["gpu"]))
def critique_revision_task(cfg: Config, constitution: Constitution, model: ResolvedModel, storage: str, step: str,
                           fingerprint: str, inputs: dict[str, str], prompts_ref: ArtifactRef) -> ArtifactRef:
    return run_critique_revision(cfg, constitution, model, storage, fingerprint, inputs, prompts_ref)
