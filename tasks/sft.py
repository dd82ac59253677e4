"""Step 3, sft: fine-tune the base model on the critique-revision data (TRL SFTTrainer).

Input: the usable rows of `critique_revision` (red-team revisions plus benign plain answers,
mixed at `sft.benign_ratio`). Output: `model/` (LoRA adapter, or full weights, tokenizer and a
model card naming the config, constitution hash and data fingerprint). Checkpoints live in the
artifact's `work/` folder, so a crashed run resumes from the last one.
"""

from __future__ import annotations

from caiflow.schemas import MODEL_DIR
from caiflow.training.launch import train_step
from tasks.common import markdown_stats
from tasks.harness import StepContext, StepOutput


def run(ctx: StepContext) -> StepOutput:
    cfg, model, constitution = ctx.cfg, ctx.model, ctx.constitution
    sl = ctx.read("critique_revision")
    usable = sl[sl["drop_reason"].isna()][["messages", "kind"]].reset_index(drop=True)
    if usable.empty:
        raise ValueError(
            f"no usable critique-revision rows to fine-tune on ({len(sl)} rows, all dropped: "
            f"{sl['drop_reason'].value_counts().to_dict()}): add prompts or raise the generation lengths."
        )
    ctx.log.info(
        "sft: %s on %d rows (%d benign available), method %s",
        model.identity,
        len(usable),
        int((usable["kind"] == "benign").sum()),
        cfg.sft.method,
    )
    kwargs = dict(
        base_model_path=model.path,
        out_dir=ctx.artifact_dir / MODEL_DIR,
        work_dir=ctx.work_dir(),
        seed=cfg.run.seed,
        dtype=cfg.model.dtype,
        fast_cpu=cfg.model.cpu_kernels,  # frozen base weights on packed products (caiflow.cpu_kernels)
        card_extra={
            "base model": model.identity,
            "constitution": f"{constitution.name} v{constitution.version} ({constitution.content_hash})",
            "data": f"critique_revision/{ctx.upstream['critique_revision'].fingerprint}",
            "config": cfg.run.name,
        },
    )
    # in this process, or over launch.num_processes processes (accelerate launch)
    metrics = train_step("sft", cfg.sft, usable, kwargs, cfg.launch, cfg.base_dir)
    return StepOutput(
        rows=int(metrics.get("rows", len(usable))),
        metrics=metrics,
        params={"sft": cfg.sft.fingerprint_dict(), "model": model.identity, "seed": cfg.run.seed},
        markdown=[("sft-report", markdown_stats("Supervised fine-tuning", metrics), "SFT metrics")],
    )
