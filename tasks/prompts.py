"""Step 1, prompts: load, normalise, dedupe, cap, split, categorise by principle.

Output: one Parquet table of every prompt read, kept ones with ``drop_reason`` null and the
others with the reason they were dropped (empty, too long, duplicate, over the cap, principle
not selected).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from caiflow import schemas
from caiflow.categorize import OTHER, categorize_local, categorize_openai
from caiflow.config import Config
from caiflow.generation import GenerationEngine
from caiflow.models import ResolvedModel, context_tokens, load_causal_lm, load_tokenizer
from caiflow.prompt_filters import (
    cap_prompts,
    check_fits_context,
    clean_prompts,
    split_prompts,
    token_counter,
)
from caiflow.prompts import load_prompts
from tasks.common import Progress, markdown_stats, retry_scaled
from tasks.harness import StepContext, StepOutput


def _max_tokens(cfg: Config, model: ResolvedModel) -> int:
    """Configured limit, else a quarter of the model's context (room for answers and critiques)."""
    if cfg.prompts.max_tokens:
        return cfg.prompts.max_tokens
    return max(64, context_tokens(model.path) // 4)


def run(ctx: StepContext) -> StepOutput:
    cfg, model = ctx.cfg, ctx.model
    p = cfg.prompts
    df = load_prompts(p.sources, cfg.resolve_path("."))
    ctx.log.info("read %d prompts from %d source(s)", len(df), len(p.sources))

    tokenizer = load_tokenizer(model.path, cfg.model.trust_remote_code)
    count = token_counter(tokenizer)
    check_fits_context(df, context_tokens(model.path), count)
    df = clean_prompts(df, p.min_chars, p.max_chars, _max_tokens(cfg, model), count)
    df = cap_prompts(df, p.max_red_team, p.max_benign, cfg.run.seed)
    df = split_prompts(df, p.eval_fraction, cfg.run.seed, p.benign_eval_fraction, p.tune_fraction)

    kept = df["drop_reason"].isna()
    texts = df.loc[kept, "prompt"].tolist()
    cat = p.categorize
    progress = Progress(
        "prompts-categorize", len(texts), f"categorising {len(texts)} prompts ({cat.backend})"
    )
    if cat.backend == "none" or not texts:
        result = [(h if isinstance(h, str) else OTHER, 1.0) for h in df.loc[kept, "hint_principle"]]
    elif cat.backend == "local":
        model_obj = load_causal_lm(model.path, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)
        engine = GenerationEngine(
            model_obj,
            tokenizer,
            batch_size=retry_scaled(cat.batch_size),
            progress=lambda d, t: progress.update(d),
            fast_cpu=cfg.model.cpu_kernels,
        )
        result = categorize_local(engine, ctx.constitution, texts)
    else:  # "endpoint": the role's server answers in JSON (checked at start-up: caiflow.roles)
        o = getattr(cfg.roles, cat.role).endpoint
        if o is None:
            raise ValueError(
                f"prompts.categorize.backend is 'endpoint' but roles.{cat.role} has no endpoint: "
                f"set roles.{cat.role}.endpoint."
            )
        result = categorize_openai(
            ctx.constitution,
            texts,
            base_url=o.base_url,
            model=o.model,
            api_key_env=o.api_key_env,
            max_concurrency=o.max_concurrency,
            max_retries=o.max_retries,
            timeout=o.timeout,
            on_done=progress.update,
        )
    progress.update(len(texts), force=True)
    df["category"] = None
    df["category_confidence"] = float("nan")
    df.loc[kept, "category"] = [c for c, _ in result]
    df.loc[kept, "category_confidence"] = [c for _, c in result]

    if cfg.constitution.principles:  # keep red-team prompts about the configured principles only
        selected = set(cfg.constitution.principles) | {OTHER}
        off = kept & (df["kind"] == "red-team") & ~df["category"].isin(selected)
        df.loc[off, "drop_reason"] = "principle-not-selected (" + df.loc[off, "category"].astype(str) + ")"

    df = df[schemas.PROMPTS.names].sort_values("prompt_id", kind="stable").reset_index(drop=True)
    ctx.store.write_table(ctx.step, ctx.fingerprint, df, schemas.PROMPTS)
    metrics = prompt_metrics(df)
    return StepOutput(
        rows=len(df),
        metrics=metrics,
        params={
            "prompts": p.fingerprint_dict(),
            "principle_ids": ctx.constitution.principle_ids(),
            "seed": cfg.run.seed,
        },
        tables=[("prompts-preview", df, "First prompts with split, category and drop reason")],
        markdown=[
            ("prompts-stats", markdown_stats("Prompts", metrics), "Prompt counts by kind, split, category")
        ],
    )


def prompt_metrics(df: pd.DataFrame) -> dict[str, Any]:
    kept = df[df["drop_reason"].isna()]
    out: dict[str, Any] = {
        "read": int(len(df)),
        "kept": int(len(kept)),
        "train_red_team": int(((kept["split"] == "train") & (kept["kind"] == "red-team")).sum()),
        "train_benign": int(((kept["split"] == "train") & (kept["kind"] == "benign")).sum()),
        "eval_red_team": int(((kept["split"] == "eval") & (kept["kind"] == "red-team")).sum()),
        "eval_benign": int(((kept["split"] == "eval") & (kept["kind"] == "benign")).sum()),
    }
    if (kept["split"] == "tune").any():
        out["tune_red_team"] = int(((kept["split"] == "tune") & (kept["kind"] == "red-team")).sum())
    reasons = (
        df["drop_reason"]
        .dropna()
        .str.replace(r" \(.*", "", regex=True)
        .str.replace(r" of .*", "", regex=True)
    )
    for reason, n in reasons.value_counts().items():
        out[f"dropped_{reason}"] = int(n)
    for cat, n in kept["category"].value_counts().items():
        out[f"category_{cat}"] = int(n)
    hinted = kept[kept["hint_principle"].notna()]
    if len(hinted):  # the builtin set says which principle each prompt was written for
        out["category_agrees_with_hint"] = round(
            float((hinted["hint_principle"] == hinted["category"]).mean()), 3
        )
    return out
