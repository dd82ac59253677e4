"""Step 2, critique_revision: SL-CAI data from the train prompts, written shard by shard.

Rows are processed in a fixed order (by prompt id) in shards of ``generation.shard_size``;
each finished shard is a complete Parquet file, so after a crash only unfinished shards are
redone, and per-row seeds make the resumed output identical to an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pyarrow as pa
from prefect import task

from caiflow.config import Config, SamplingConfig
from caiflow.constitution import Constitution
from caiflow.faults import kill_point
from caiflow.critique import SCHEMA, Sampler, run_rows
from caiflow.generation import GenerationEngine, Sampling
from caiflow.models import ResolvedModel, load_model_and_tokenizer
from caiflow.plan import STEP_VERSIONS
from caiflow.store import ArtifactRef, Store
from caiflow.store import fingerprint as fingerprint_of
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

    context = row_context(cfg, constitution, model)
    reusable = reusable_rows(store, context, records)
    writer = store.shard_writer(STEP, fingerprint, SCHEMA, cfg.generation.shard_size)
    writer.remove_stale(len(records))
    pending = writer.pending(len(records))
    log.info("critique-revision: %d train prompts, %d shard(s) to do of %d, %d row(s) reusable from earlier runs",
             len(records), len(pending), len(writer.shard_ranges(len(records))), len(reusable))
    progress = Progress("critique-revision-progress", len(records), "critique-revision rows")
    done_rows = len(records) - sum(stop - start for _, start, stop in pending)
    progress.update(done_rows)
    engine = None
    generated = reused = 0
    if any(r["prompt_id"] not in reusable for _, start, stop in pending for r in records[start:stop]):
        model_obj, tok = load_model_and_tokenizer(model, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)
        engine = GenerationEngine(model_obj, tok, batch_size=retry_scaled(cfg.generation.batch_size))
    sampler = Sampler(_sampling(c.answer), _sampling(c.critique), _sampling(c.revision))
    for index, start, stop in pending:
        chunk = records[start:stop]
        todo = [r for r in chunk if r["prompt_id"] not in reusable]
        made = run_rows(engine, constitution, todo, rounds=c.rounds, few_shot=c.few_shot, sampler=sampler,
                        seed=cfg.run.seed, answer_benign=c.answer_benign) if todo else []
        by_id = {**reusable, **{r["prompt_id"]: r for r in made}}
        out = [by_id[r["prompt_id"]] for r in chunk]
        generated, reused = generated + len(todo), reused + len(chunk) - len(todo)
        writer.write(index, out)
        kill_point(f"{STEP}:shard:{index}")
        done_rows += stop - start
        progress.update(done_rows, force=True)

    df = store.read_table(store.artifact_dir(STEP, fingerprint))
    metrics = sl_metrics(df)
    metrics.update(rows_generated=generated, rows_reused=reused)
    if engine is not None:
        metrics.update(oom_backoffs=engine.backoffs, final_batch_size=engine.batch_size, task_attempt=attempt(),
                       start_batch_size=retry_scaled(cfg.generation.batch_size))
    ref = store.finalize(STEP, fingerprint, rows=len(df), metrics=metrics, inputs=inputs,
                         params={"critique_revision": c.fingerprint_dict(), "constitution": constitution.content_hash,
                                 "model": model.identity, "seed": cfg.run.seed, "row_context": context})
    publish_table("critique-revision-preview", df[["kind", "prompt", "initial_answer", "revision", "drop_reason"]],
                  "First SL-CAI rows: prompt, initial answer, final revision")
    publish_markdown("critique-revision-report", markdown_stats("Critique-revision", metrics) + examples_md(df),
                     "Statistics and before/after examples")
    log.info("critique-revision: %s", metrics)
    return ref


def row_context(cfg: Config, constitution: Constitution, model: ResolvedModel) -> str:
    """What a row's output depends on besides the row itself: the same for runs whose prompt sets differ."""
    return fingerprint_of("critique_revision-rows", STEP_VERSIONS[STEP], config=cfg.critique_revision.fingerprint_dict(),
                          constitution=constitution.content_hash, model=model.identity, model_dtype=cfg.model.dtype,
                          seed=cfg.run.seed)


def reusable_rows(store: Store, context: str, records: list[dict]) -> dict[str, dict]:
    """Rows of earlier finished artifacts made under the same row context, for the same prompt.

    Per-row seeds make a row's output a function of the row and the context alone, so a row
    generated by an earlier run (say, before 10 prompts were added) is exactly what this run
    would generate: the nightly regeneration only generates for new or changed prompts.
    """
    wanted = {r["prompt_id"]: r for r in records}
    found: dict[str, dict] = {}
    for step, fp in store.iter_artifacts():
        manifest = store.manifest(step, fp) if step == STEP else None
        if not manifest or (manifest.get("params") or {}).get("row_context") != context:
            continue
        if not store.is_complete(step, fp):
            continue
        table = pa.Table.from_pandas(store.read_table(store.artifact_dir(step, fp)), preserve_index=False)
        for row in table.to_pylist():  # plain Python values: nulls stay None, lists stay lists
            want = wanted.get(row["prompt_id"])
            if want and all(row[k] == want[k] for k in ("prompt", "kind", "category")):
                found[row["prompt_id"]] = row
    return found


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
