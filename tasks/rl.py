"""Step 6, rl: RL from the SL model against the reward model (TRL RLOO by default, or GRPO).

A fresh LoRA adapter is trained on top of the SL model on the training prompts, rewarded by
the reward model (or the ensemble's mean - lambda * std), with a KL penalty to the SL model.
Reward, KL and completion length per logged step go into the metrics and a progress artifact.
Output: `model/` (loads with `caiflow.training.sft.load_policy`, AutoModelForCausalLM or PeftModel).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from caiflow.config import Config
from caiflow.constitution import Constitution
from caiflow.models import ResolvedModel
from caiflow.store import ArtifactRef, Store
from caiflow.training.rl import train_rl
from tasks.common import Progress, locked, logger, markdown_stats, publish_markdown, publish_table, task_options
from tasks.preferences import train_prompts

STEP = "rl"
MODEL_DIR = "model"


@locked(STEP)
def run_rl(cfg: Config, constitution: Constitution, model: ResolvedModel, storage: str, fingerprint: str,
           inputs: dict[str, str], prompts_ref: ArtifactRef, sft_ref: ArtifactRef,
           reward_ref: ArtifactRef) -> ArtifactRef:
    """The step's logic, callable without Prefect."""
    store = Store(storage)
    done = store.load_ref(STEP, fingerprint)
    if done is not None:
        return done
    log = logger()
    rows = train_prompts(store, prompts_ref, "train")
    if rows.empty:
        raise ValueError("no training prompts for RL: the prompts step kept none in the train split.")
    prompts = [[{"role": "user", "content": p}] for p in rows["prompt"]]
    out = Path(store.artifact_dir(STEP, fingerprint)) / MODEL_DIR
    progress = Progress("rl-progress", cfg.rl.max_steps, "rl steps")

    def on_log(step: int, total: int, logs: dict) -> None:
        progress.total = max(total, 1)
        progress.update(step)

    log.info("rl: %s from the SL model on %d prompts, %d steps, kl %.3g", cfg.rl.algorithm, len(prompts),
             cfg.rl.max_steps, cfg.rl.kl_coef)
    metrics = train_rl(
        cfg.rl, Path(sft_ref.path) / "model", model.path, Path(reward_ref.path) / "model", prompts, out,
        store.work_dir(STEP, fingerprint), seed=cfg.run.seed, dtype=cfg.model.dtype,
        card_extra={"base model": model.identity, "sl model": f"sft/{sft_ref.fingerprint}",
                    "reward model": f"reward_model/{reward_ref.fingerprint}",
                    "constitution": constitution.content_hash, "config": cfg.run.name},
        on_log=on_log,
    )
    progress.update(progress.total, force=True)
    ref = store.finalize(STEP, fingerprint, rows=len(prompts), metrics=metrics, inputs=inputs,
                         params={"rl": cfg.rl.fingerprint_dict(), "model": model.identity, "seed": cfg.run.seed})
    store.clean_work(STEP, fingerprint)
    history = metrics.get("history") or []
    if history:
        import pandas as pd

        publish_table("rl-history", pd.DataFrame(history), "Reward, KL and completion length per logged step",
                      max_rows=200)
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    publish_markdown("rl-report", markdown_stats("RL", scalars), "RL metrics")
    log.info("rl: %s", scalars)
    return ref


@task(**task_options(STEP, tags=["gpu"]))
def rl_task(cfg: Config, constitution: Constitution, model: ResolvedModel, storage: str, step: str,
            fingerprint: str, inputs: dict[str, str], prompts_ref: ArtifactRef, sft_ref: ArtifactRef,
            reward_ref: ArtifactRef) -> ArtifactRef:
    return run_rl(cfg, constitution, model, storage, fingerprint, inputs, prompts_ref, sft_ref, reward_ref)
