"""Step 5, reward_model: a reward model (or an ensemble) trained on the soft AI labels.

Input: the kept preference pairs. The loss is the binary cross-entropy of
sigmoid(r_chosen - r_rejected) against the label probability, not a hard label. Output:
`model/member-XX/` (each loads with AutoModelForSequenceClassification), `model/ensemble.json`
and a card; held-out accuracy and calibration in the metrics.
"""

from __future__ import annotations

from caiflow.plan import reward_backbone
from caiflow.schemas import MODEL_DIR
from caiflow.training.launch import train_step
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
    kwargs = dict(
        backbone_path=base.path,
        out_dir=ctx.artifact_dir / MODEL_DIR,
        work_dir=ctx.work_dir(),
        seed=cfg.run.seed,
        dtype=cfg.model.dtype,
        fast_cpu=cfg.model.cpu_kernels,  # scoring the held-out pairs (caiflow.cpu_kernels)
        card_extra={
            "backbone": base.identity,
            "preferences": f"preferences/{ctx.upstream['preferences'].fingerprint}",
            "constitution": ctx.constitution.content_hash,
            "config": cfg.run.name,
        },
    )
    # in this process, or over launch.num_processes processes (accelerate launch)
    metrics = train_step("reward_model", cfg.reward_model, data, kwargs, cfg.launch, cfg.base_dir)
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
