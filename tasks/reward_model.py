"""Step 5, reward_model: a reward model (or an ensemble) trained on the soft AI labels.

Input: the kept preference pairs. The loss is the binary cross-entropy of
sigmoid(r_chosen - r_rejected) against the label probability, not a hard label. Output:
`model/member-XX/` (each loads with AutoModelForSequenceClassification), `model/ensemble.json`
and a card; held-out accuracy and calibration in the metrics.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from caiflow.config import Config
from caiflow.constitution import Constitution
from caiflow.models import ResolvedModel, resolve_model
from caiflow.store import ArtifactRef, Store
from caiflow.training.reward import train_reward_model
from tasks.common import locked, logger, markdown_stats, publish_markdown, task_options

STEP = "reward_model"
MODEL_DIR = "model"


def backbone(cfg: Config, model: ResolvedModel, storage: str) -> ResolvedModel:
    """The reward model's starting point: `reward_model.backbone`, else the policy's base model."""
    if not cfg.reward_model.backbone:
        return model
    return resolve_model(cfg.reward_model.backbone, storage)


@locked(STEP)
def run_reward_model(cfg: Config, constitution: Constitution, model: ResolvedModel, storage: str, fingerprint: str,
                     inputs: dict[str, str], preferences_ref: ArtifactRef) -> ArtifactRef:
    """The step's logic, callable without Prefect."""
    store = Store(storage)
    done = store.load_ref(STEP, fingerprint)
    if done is not None:
        return done
    log = logger()
    prefs = store.read_table(preferences_ref)
    kept = prefs[prefs["drop_reason"].isna()].reset_index(drop=True)
    if len(kept) < 2:
        raise ValueError(
            f"only {len(kept)} usable preference pair(s) of {len(prefs)} "
            f"(dropped: {prefs['drop_reason'].value_counts().to_dict()}): a reward model needs more. "
            "Add training prompts, raise preferences.sampling.temperature for more distinct answers, "
            "or lower preferences.undecided_margin."
        )
    data = kept[["prompt", "chosen", "rejected", "label"]].copy()
    data["principle"] = [list(p)[0] if len(p) else "" for p in kept["principles"]]
    base = backbone(cfg, model, storage)
    out = Path(store.artifact_dir(STEP, fingerprint)) / MODEL_DIR
    log.info("reward_model: %d pairs, backbone %s, ensemble of %d", len(data), base.identity,
             cfg.reward_model.ensemble_size)
    metrics = train_reward_model(
        cfg.reward_model, base.path, data, out, store.work_dir(STEP, fingerprint), seed=cfg.run.seed,
        dtype=cfg.model.dtype,
        card_extra={"backbone": base.identity, "preferences": f"preferences/{preferences_ref.fingerprint}",
                    "constitution": constitution.content_hash, "config": cfg.run.name},
    )
    ref = store.finalize(STEP, fingerprint, rows=len(data), metrics=metrics, inputs=inputs,
                         params={"reward_model": cfg.reward_model.fingerprint_dict(), "backbone": base.identity,
                                 "seed": cfg.run.seed})
    store.clean_work(STEP, fingerprint)
    publish_markdown("reward-model-report", markdown_stats("Reward model", _flat(metrics)), "Reward model metrics")
    log.info("reward_model: %s", _flat(metrics))
    return ref


def _flat(metrics: dict) -> dict:
    """Scalar metrics only (member details stay in the manifest)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


@task(**task_options(STEP, tags=["gpu"]))
def reward_model_task(cfg: Config, constitution: Constitution, model: ResolvedModel, storage: str, step: str,
                      fingerprint: str, inputs: dict[str, str], preferences_ref: ArtifactRef) -> ArtifactRef:
    return run_reward_model(cfg, constitution, model, storage, fingerprint, inputs, preferences_ref)
