"""Step 4, preferences: AI-feedback preference pairs (RLAIF), written shard by shard.

For every training prompt the SL model samples two answers; a feedback model (the SL model as
in the original recipe, the base model, or an OpenAI-compatible endpoint with logprobs) is asked
a sampled principle's feedback question with options (A)/(B), in both orders, and the soft label
is the normalised probability, averaged. Output rows use TRL's preference columns (`prompt`,
`chosen`, `rejected`) plus the label, the principles, both raw probabilities and the position
bias; pairs with identical answers or an undecided label are kept with a `drop_reason`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pandas as pd

from caiflow import schemas
from caiflow.config import Config
from caiflow.constitution import Constitution
from caiflow.feedback import (
    contrastive_pairs,
    drop_disagreements,
    feedback_metrics,
    label_pairs,
    refusal_contrast,
    sample_principles,
)
from caiflow.generation import Sampling, join_opening
from caiflow.models import ResolvedModel, policy_engine
from caiflow.prompt_filters import kept_prompts
from caiflow.refusal import is_refusal, wants_refusal
from caiflow.roles import describe, role_scorer, usage_metrics
from caiflow.seeds import row_seed
from caiflow.sharded import ShardedOutput
from caiflow.store import ArtifactRef
from tasks.common import Progress, markdown_stats, retry_scaled
from tasks.harness import StepContext, StepOutput
from tasks.shards import run_shards


def run(ctx: StepContext) -> StepOutput:
    cfg, p = ctx.cfg, ctx.cfg.preferences
    rows = kept_prompts(ctx.read("prompts"), "train", p.include_benign)
    kinds = {"feedback": ["feedback"], "contrastive": ["contrastive"], "both": ["contrastive", "feedback"]}
    records = [
        {**r, "pair_kind": kind}
        for r in rows[["prompt_id", "prompt", "kind"]].to_dict(orient="records")
        for kind in kinds[p.method]
    ]
    output = ShardedOutput(
        ctx.store, ctx.step, ctx.fingerprint, schemas.PREFERENCES, cfg.generation.shard_size, records
    )
    ctx.log.info(
        "preferences: %d train prompts, %d shard(s) to do, feedback from %s",
        len(records),
        len(output.pending),
        describe(cfg.roles.feedback),
    )
    progress = Progress("preferences-progress", len(records), "preference pairs")
    start_batch = retry_scaled(cfg.generation.batch_size)
    factory = partial(PreferenceRows, cfg, ctx.constitution, ctx.model, ctx.upstream, start_batch)
    # every pair depends on the SL model, so nothing is reused across runs; only shards that an
    # interrupted attempt at this same artifact left finished are taken as they are
    counts, maker = run_shards(
        ctx, output, factory, start_batch, on_progress=lambda done: progress.update(done, force=True)
    )
    df = ctx.store.read_table(ctx.artifact_dir)
    feedback = df[df["pair_kind"] == "feedback"]
    # the feedback model's label statistics describe its own pairs only; contrastive labels are set
    metrics: dict[str, Any] = {**feedback_metrics(feedback), **counts} if len(feedback) else {**counts}
    metrics["rows"], metrics["kept"] = int(len(df)), int(df["drop_reason"].isna().sum())
    for kind, rows in df.groupby("pair_kind"):
        metrics[f"pairs_{kind}"] = int(rows["drop_reason"].isna().sum())
    if maker is not None:
        metrics.update(maker.metrics())
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
                df[["pair_kind", "answer_a", "answer_b", "label", "position_bias", "drop_reason"]],
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


class PreferenceRows:
    """Preference records -> pairs (contrastive and/or AI-feedback). Loads the SL model (and the feedback
    scorer) on first use; picklable before that, so a Ray actor builds it once and keeps it."""

    def __init__(
        self,
        cfg: Config,
        constitution: Constitution,
        model: ResolvedModel,
        upstream: dict[str, ArtifactRef],
        batch_size: int,
    ):
        self.cfg, self.constitution, self.model = cfg, constitution, model
        self.upstream, self.batch_size = upstream, batch_size
        s = cfg.preferences.sampling
        self.sampling = Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)
        self.system, self.opposite = constitution.as_system_prompt(), constitution.opposite_system_prompt()
        self.loaded: dict[str, Any] = {}

    def contrastive_prompts(self, row: dict[str, Any]) -> tuple[str | None, str]:
        """(system prompt of the chosen side, of the rejected side) for one prompt."""
        if row["kind"] == "red-team" and self.cfg.preferences.contrastive_prompts == "principle":
            # the principle contrastive_pairs records for this pair (same seeded choice)
            pid = sample_principles(self.constitution, str(row["prompt_id"]), self.cfg.run.seed, 1)[0]
            principle = self.constitution.principle(pid)
            return principle.answer_prompt(), principle.inverted().answer_prompt()
        if row["kind"] == "red-team":
            return self.system, self.opposite
        return None, self.cfg.preferences.benign_refusal_prompt  # a plain answer against a needless refusal

    def fixed_answers(self, row: dict[str, Any]) -> dict[str, str]:
        """Sides of a contrastive pair that are given, not generated: the benign needless refusal when
        preferences.benign_refusal_text is set."""
        text = self.cfg.preferences.benign_refusal_text
        return {"b": text} if text and row["kind"] != "red-team" else {}

    def openers(self, row: dict[str, Any]) -> dict[str, str]:
        """Sides of a contrastive pair whose answer starts with given words and is finished by the model: the
        benign needless refusal when preferences.benign_refusal_opener is set."""
        text = self.cfg.preferences.benign_refusal_opener
        return {"b": text} if text and row["kind"] != "red-team" else {}

    def __call__(self, chunk: list[dict[str, Any]]) -> pd.DataFrame:
        cfg, p, loaded = self.cfg, self.cfg.preferences, self.loaded
        if not loaded:  # every pair depends on the SL model: load it once there is work
            loaded["engine"] = policy_engine(
                "sl", cfg.model, self.model, self.upstream, self.batch_size, cfg.generation
            )
        made = {}
        contrastive = [r for r in chunk if r["pair_kind"] == "contrastive"]
        if contrastive:
            pairs = pair_answers(
                loaded["engine"],
                contrastive,
                self.sampling,
                cfg.run.seed,
                self.contrastive_prompts,
                samples=p.contrastive_samples,
                inverted=self.constitution.inverted,
                fixed=self.fixed_answers,
                openers=self.openers,
            )
            made_pairs = contrastive_pairs(pairs, self.constitution, cfg.run.seed, p.contrastive_label)
            if p.contrastive_refusal_check:
                made_pairs = refusal_contrast(made_pairs, self.constitution.inverted)
            if p.contrastive_filter_margin is not None:
                made_pairs = drop_disagreements(
                    made_pairs, self._scorer(), self.constitution, p.contrastive_filter_margin
                )
            for row in made_pairs.to_dict(orient="records"):
                made[(row["prompt_id"], "contrastive")] = row
        feedback = [r for r in chunk if r["pair_kind"] == "feedback"]
        if feedback:
            pairs = pair_answers(loaded["engine"], feedback, self.sampling, cfg.run.seed, None)
            labelled = label_pairs(
                self._scorer(),
                self.constitution,
                pairs,
                seed=cfg.run.seed,
                principles_per_pair=p.principles_per_pair,
                clamp=tuple(p.clamp) if p.clamp else None,
                margin=p.undecided_margin,
            )
            for row in labelled.to_dict(orient="records"):
                made[(row["prompt_id"], "feedback")] = row
        return pd.DataFrame(
            [made[(r["prompt_id"], r["pair_kind"])] for r in chunk], columns=schemas.PREFERENCES.names
        )

    def _scorer(self) -> Any:
        """The feedback model's choice scorer, loaded on first use (the SL engine when it is the SL model)."""
        loaded = self.loaded
        if "scorer" not in loaded:
            loaded["scorer"] = role_scorer(
                "feedback",
                self.cfg,
                self.model,
                self.upstream,
                self.batch_size,
                engines={"sl": loaded["engine"]},
            )
        return loaded["scorer"]

    def metrics(self) -> dict[str, Any]:
        """The engine's out-of-memory back-off, and the feedback endpoint's requests and tokens, when they ran
        here."""
        if not self.loaded:
            return {}
        return {
            **self.loaded["engine"].engine_metrics(self.batch_size),
            **usage_metrics("feedback", self.loaded.get("scorer")),
        }


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


def pair_answers(
    engine: Any,
    rows: list[dict[str, Any]],
    sampling: Sampling,
    seed: int,
    system_prompts: Any,
    samples: int = 1,
    inverted: bool = False,
    fixed: Any = None,
    openers: Any = None,
) -> pd.DataFrame:
    """Two sampled answers per prompt (answer_a, answer_b), per-row seeded. `system_prompts(row)` gives
    the (a, b) system prompts of contrastive pairs; None: both plain (feedback pairs). `fixed(row)`
    gives sides that are not generated ({"b": text}); `openers(row)` sides whose answer starts with
    the given words and is finished by the model ({"b": "I'm sorry, but I can't"}).

    With `samples` > 1 (contrastive pairs) a side keeps the first of up to that many answers that
    refuses or complies as it should (`caiflow.refusal.wants_refusal`), else its first. Sample k
    of a side has its own seed, and only the sides still without a fitting answer sample again, so
    the result is what sampling all of them would give, at a fraction of the cost.
    """
    picked: dict[tuple[int, str], str] = {}
    todo = []  # (row index, side, conversation) still to sample
    for i, r in enumerate(rows):
        prompts = system_prompts(r) if system_prompts else (None, None)
        given, opened = (fixed(r) if fixed else {}), (openers(r) if openers else {})
        for side, system in zip("ab", prompts):
            if side in given:
                picked[(i, side)] = given[side]
                continue
            turn = [{"role": "user", "content": r["prompt"]}]
            if side in opened:
                turn.append({"role": "assistant", "content": opened[side]})
            todo.append((i, side, ([{"role": "system", "content": system}] if system else []) + turn))
    first: dict[tuple[int, str], str] = {}
    for k in range(samples):
        if not todo:
            break
        seeds = [
            row_seed(seed, rows[i]["prompt_id"], f"pair-{side}" + (f"-{k}" if k else ""))
            for i, side, _ in todo
        ]
        answers = engine.generate([conv for _, _, conv in todo], sampling, seeds)
        left = []
        for (i, side, conv), text in zip(todo, answers):
            if conv[-1]["role"] == "assistant":  # an opened answer: its opening, then what the model wrote
                text = join_opening(conv[-1]["content"], text)
            first.setdefault((i, side), text)
            if samples == 1 or is_refusal(text) == wants_refusal(rows[i]["kind"], side, inverted):
                picked[(i, side)] = text
            else:
                left.append((i, side, conv))
        todo = left
    for key, text in first.items():
        picked.setdefault(key, text)
    return pd.DataFrame(
        {
            "prompt_id": [r["prompt_id"] for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "kind": [r["kind"] for r in rows],
            "answer_a": [picked[(i, "a")] for i in range(len(rows))],
            "answer_b": [picked[(i, "b")] for i in range(len(rows))],
        }
    )
