"""Step 5, reward_model: a reward model (or an ensemble) trained on the soft AI labels.

Input: the kept preference pairs. The loss is the binary cross-entropy of
sigmoid(r_chosen - r_rejected) against the label probability, not a hard label. Output:
`model/member-XX/` (each loads with AutoModelForSequenceClassification), `model/ensemble.json`
and a card; held-out accuracy and calibration in the metrics.
"""

from __future__ import annotations

from caiflow.plan import reward_backbone
from caiflow.schemas import MODEL_DIR
from caiflow.training.reward import train_reward_model
from tasks.common import markdown_stats
from tasks.harness import StepContext, StepOutput, scalar_metrics


def run(ctx: StepContext) -> StepOutput:
    cfg = ctx.cfg
    prefs = ctx.read("preferences")
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
    if "pair_kind" in kept.columns:  # held-out accuracy per kind of pair (feedback, contrastive)
        data["pair_kind"] = kept["pair_kind"].fillna("feedback").to_numpy()
    base = reward_backbone(cfg, ctx.model, str(ctx.store.root))
    ctx.log.info(
        "reward_model: %d pairs, backbone %s, ensemble of %d",
        len(data),
        base.identity,
        cfg.reward_model.ensemble_size,
    )
    metrics = train_reward_model(
        cfg.reward_model,
        base.path,
        data,
        ctx.artifact_dir / MODEL_DIR,
        ctx.work_dir(),
        seed=cfg.run.seed,
        dtype=cfg.model.dtype,
        card_extra={
            "backbone": base.identity,
            "preferences": f"preferences/{ctx.upstream['preferences'].fingerprint}",
            "constitution": ctx.constitution.content_hash,
            "config": cfg.run.name,
        },
    )
    return StepOutput(
        rows=len(data),
        metrics=metrics,
        params={
            "reward_model": cfg.reward_model.fingerprint_dict(),
            "backbone": base.identity,
            "seed": cfg.run.seed,
        },
        markdown=[
            (
                "reward-model-report",
                markdown_stats("Reward model", scalar_metrics(metrics)),
                "Reward model metrics",
            )
        ],
    )
