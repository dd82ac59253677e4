"""Step 6, rl: RL from the SL model against the reward model (TRL RLOO by default, or GRPO).

A fresh LoRA adapter is trained on top of the SL model on the training prompts, rewarded by
the reward model (or the ensemble's mean - lambda * std), with a KL penalty to the SL model.
Reward, KL and completion length per logged step go into the metrics and a progress artifact.
Output: `model/` (loads with `caiflow.models.load_policy`, AutoModelForCausalLM or PeftModel).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from caiflow.prompt_filters import kept_prompts
from caiflow.schemas import MODEL_DIR
from caiflow.training.rl import train_rl
from tasks.common import Progress, markdown_stats
from tasks.harness import StepContext, StepOutput, scalar_metrics


def run(ctx: StepContext) -> StepOutput:
    cfg, model = ctx.cfg, ctx.model
    rows = kept_prompts(ctx.read("prompts"), "train")
    if rows.empty:
        raise ValueError("no training prompts for RL: the prompts step kept none in the train split.")
    prompts = [[{"role": "user", "content": p}] for p in rows["prompt"]]
    progress = Progress("rl-progress", cfg.rl.max_steps, "rl steps")

    def on_log(step: int, total: int, logs: dict) -> None:
        progress.total = max(total, 1)
        progress.update(step)

    sft_ref, reward_ref = ctx.upstream["sft"], ctx.upstream["reward_model"]
    ctx.log.info(
        "rl: %s from the SL model on %d prompts, %d steps, kl %.3g",
        cfg.rl.algorithm,
        len(prompts),
        cfg.rl.max_steps,
        cfg.rl.kl_coef,
    )
    metrics = train_rl(
        cfg.rl,
        Path(sft_ref.path) / MODEL_DIR,
        model.path,
        Path(reward_ref.path) / MODEL_DIR,
        prompts,
        ctx.artifact_dir / MODEL_DIR,
        ctx.work_dir(),
        seed=cfg.run.seed,
        dtype=cfg.model.dtype,
        fast_cpu=cfg.model.cpu_kernels,  # rollouts and reward scoring (caiflow.cpu_kernels)
        card_extra={
            "base model": model.identity,
            "sl model": f"sft/{sft_ref.fingerprint}",
            "reward model": f"reward_model/{reward_ref.fingerprint}",
            "constitution": ctx.constitution.content_hash,
            "config": cfg.run.name,
        },
        on_log=on_log,
    )
    progress.update(progress.total, force=True)
    history = metrics.get("history") or []
    tables = (
        [("rl-history", pd.DataFrame(history), "Reward, KL and completion length per logged step", 200)]
        if history
        else []
    )
    return StepOutput(
        rows=len(prompts),
        metrics=metrics,
        params={"rl": cfg.rl.fingerprint_dict(), "model": model.identity, "seed": cfg.run.seed},
        tables=tables,
        markdown=[("rl-report", markdown_stats("RL", scalar_metrics(metrics)), "RL metrics")],
    )
