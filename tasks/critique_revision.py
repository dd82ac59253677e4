"""Step 2, critique_revision: SL-CAI data from the train prompts, written shard by shard.

`critique_revision.method` picks how: the paper's critique-revision loop (`caiflow.critique.run_rows`)
or context distillation (`caiflow.critique.distill_rows`: answers under the constitution as a
system prompt, trained on without it).

Rows are processed in a fixed order (by prompt id) in shards of ``generation.shard_size``
(`caiflow.sharded`): after a crash only unfinished shards are redone, and rows an earlier run
made under the same settings are reused, so the nightly regeneration only generates for new
or changed prompts.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pandas as pd

from caiflow import schemas
from caiflow.config import Config
from caiflow.constitution import Constitution
from caiflow.critique import Sampler, distill_rows, few_shot_turns, principle_system_prompt, run_rows
from caiflow.generation import Sampling
from caiflow.models import ResolvedModel
from caiflow.plan import critique_row_context
from caiflow.prompt_filters import kept_prompts
from caiflow.refusal import is_refusal
from caiflow.roles import role_identity, teacher_engine, usage_metrics
from caiflow.sharded import ShardedOutput, reusable_rows
from caiflow.step_config import SamplingConfig
from tasks.common import Progress, markdown_stats, retry_scaled
from tasks.harness import StepContext, StepOutput
from tasks.shards import run_shards


def _sampling(s: SamplingConfig) -> Sampling:
    return Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)


def run(ctx: StepContext) -> StepOutput:
    cfg, c = ctx.cfg, ctx.cfg.critique_revision
    rows = kept_prompts(ctx.read("prompts"), "train")
    records = rows[["prompt_id", "prompt", "kind", "category"]].to_dict(orient="records")

    teacher = role_identity(cfg.roles.teacher, cfg.run.storage)
    context = critique_row_context(cfg, ctx.constitution.content_hash, ctx.model.identity, teacher)
    reusable = reusable_rows(ctx.store, ctx.step, context, records, match=("prompt", "kind", "category"))
    output = ShardedOutput(
        ctx.store, ctx.step, ctx.fingerprint, schemas.SL_DATA, cfg.generation.shard_size, records
    )
    ctx.log.info(
        "critique-revision: %d train prompts, %d shard(s) to do of %d, %d row(s) reusable from earlier runs",
        len(records),
        len(output.pending),
        output.total_shards,
        len(reusable),
    )
    progress = Progress("critique-revision-progress", len(records), "critique-revision rows")
    start_batch = retry_scaled(cfg.generation.batch_size)
    factory = partial(CritiqueRows, cfg, ctx.constitution, ctx.model, start_batch)
    on_progress = lambda done: progress.update(done, force=True)  # noqa: E731
    counts, maker = run_shards(ctx, output, factory, start_batch, reusable, on_progress)
    df = ctx.store.read_table(ctx.artifact_dir)
    metrics = {**sl_metrics(df), **counts, **(maker.metrics() if maker else {})}
    return StepOutput(
        rows=len(df),
        metrics=metrics,
        params={
            "critique_revision": c.fingerprint_dict(),
            "constitution": ctx.constitution.content_hash,
            "model": ctx.model.identity,
            "teacher": teacher,
            "seed": cfg.run.seed,
            "row_context": context,
        },
        tables=[
            (
                "critique-revision-preview",
                df[["kind", "prompt", "initial_answer", "revision", "drop_reason"]],
                "First SL-CAI rows: prompt, initial answer, final revision",
            )
        ],
        markdown=[
            (
                "critique-revision-report",
                markdown_stats("Critique-revision", metrics)
                + prompts_md(ctx.constitution, c)
                + examples_md(df),
                "Statistics and before/after examples",
            )
        ],
    )


class CritiqueRows:
    """Train prompt records -> SL-CAI rows. Loads the model on first use; picklable before that, so a Ray
    actor can build it from its settings and keep it (and the model) for every shard it makes."""

    def __init__(self, cfg: Config, constitution: Constitution, model: ResolvedModel, batch_size: int):
        self.cfg, self.constitution, self.model, self.batch_size = cfg, constitution, model, batch_size
        c = cfg.critique_revision
        self.sampler = Sampler(_sampling(c.answer), _sampling(c.critique), _sampling(c.revision))
        self.engine: Any = None  # a GenerationEngine, or an EndpointEngine when the teacher is an endpoint

    def __call__(self, todo: list[dict[str, Any]]) -> list[dict[str, Any]]:
        cfg, c = self.cfg, self.cfg.critique_revision
        if self.engine is None:  # loaded (or connected) only when some row is not reusable
            self.engine = teacher_engine(cfg, self.model, self.batch_size)
        if c.method == "context_distillation":
            return distill_rows(
                self.engine,
                self.constitution,
                todo,
                sampling=self.sampler.answer,
                seed=cfg.run.seed,
                samples=c.samples_per_prompt,
                prefer_refusals=c.prefer_refusals,
                answer_benign=c.answer_benign,
                drop_cut_off=c.drop_cut_off,
            )
        return run_rows(
            self.engine,
            self.constitution,
            todo,
            rounds=c.rounds,
            few_shot=c.few_shot,
            sampler=self.sampler,
            seed=cfg.run.seed,
            answer_benign=c.answer_benign,
            principle_prompt=c.principle_system_prompt,
            drop_cut_off=c.drop_cut_off,
        )

    def metrics(self) -> dict[str, Any]:
        """The engine's out-of-memory back-off, or the teacher endpoint's requests and tokens, when it ran
        here."""
        if self.engine is None:
            return {}
        return {**self.engine.engine_metrics(self.batch_size), **usage_metrics("teacher", self.engine)}


def sl_metrics(df: pd.DataFrame) -> dict[str, Any]:
    red = df[df["kind"] == "red-team"]
    kept = df[df["drop_reason"].isna()]
    red_kept = kept[kept["kind"] == "red-team"]
    out: dict[str, Any] = {
        "rows": int(len(df)),
        "red_team": int(len(red)),
        "benign": int((df["kind"] == "benign").sum()),
        "usable_for_sft": int(len(kept)),
        "mean_answer_chars": round(float(df["initial_answer"].str.len().mean() or 0), 1),
        "mean_revision_chars": round(float(red["revision"].str.len().mean() or 0), 1) if len(red) else 0.0,
        # the share of usable red-team SFT targets that refuse (caiflow/refusal.py): what SFT will teach
        "red_team_targets_refusing": round(float(red_kept["revision"].map(is_refusal).mean()), 4)
        if len(red_kept)
        else None,
    }
    for reason, n in df["drop_reason"].dropna().value_counts().items():
        out[f"dropped_{reason}"] = int(n)
    return out


def prompts_md(constitution: Constitution, c: Any) -> str:
    """What the model was shown besides the prompt: the system prompt (context distillation) or, per
    principle, the few-shot turns before each critique request and the revision's system prompt."""
    if c.method == "context_distillation":
        return f"\n## System prompt the answers were made under\n\n> {constitution.as_system_prompt()}\n"
    by_id = {p.id: p for p in constitution.principles}
    heading = f"Few-shot turns before each critique request ({c.few_shot}, the principle's own first)"
    parts = [f"\n## {heading}\n"]
    for pid, principle in by_id.items():
        turns = few_shot_turns(constitution.few_shot, by_id.get, c.few_shot, pid)
        parts.append(f"<details><summary>{principle.name}</summary>\n")
        if c.principle_system_prompt:
            parts.append(f"**system (revision step):** {principle_system_prompt(principle)}\n")
        parts += [f"**{t['role']}:** {t['content']}\n" for t in turns] or ["(no few-shot examples)\n"]
        parts.append("</details>\n")
    return "\n".join(parts)


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
