"""Step 3, sft: fine-tune the base model on the critique-revision data (TRL SFTTrainer).

Input: the usable rows of `critique_revision` (red-team revisions plus benign plain answers,
mixed at `sft.benign_ratio`). Output: `model/` (LoRA adapter, or full weights, tokenizer and a
model card naming the config, constitution hash and data fingerprint). Checkpoints live in the
artifact's `work/` folder, so a crashed run resumes from the last one.
"""

from __future__ import annotations

from prefect import task

from caiflow.config import Config
from caiflow.constitution import Constitution
from caiflow.models import ResolvedModel
from caiflow.store import ArtifactRef, Store
from caiflow.training.sft import train_sft
from tasks.common import locked, logger, markdown_stats, publish_markdown, task_options

STEP = "sft"
MODEL_DIR = "model"


@locked(STEP)
def run_sft(cfg: Config, constitution: Constitution, model: ResolvedModel, storage: str, fingerprint: str,
            inputs: dict[str, str], sl_ref: ArtifactRef) -> ArtifactRef:
    """The step's logic, callable without Prefect."""
    store = Store(storage)
    done = store.load_ref(STEP, fingerprint)
    if done is not None:
        return done
    log = logger()
    sl = store.read_table(sl_ref)
    usable = sl[sl["drop_reason"].isna()][["messages", "kind"]].reset_index(drop=True)
    if usable.empty:
        raise ValueError(
            f"no usable critique-revision rows to fine-tune on ({len(sl)} rows, all dropped: "
            f"{sl['drop_reason'].value_counts().to_dict()}): add prompts or raise the generation lengths."
        )
    out = store.artifact_dir(STEP, fingerprint) / MODEL_DIR
    log.info("sft: %s on %d rows (%d benign available), method %s", model.identity, len(usable),
             int((usable["kind"] == "benign").sum()), cfg.sft.method)
    metrics = train_sft(
        cfg.sft, model.path, usable, out, store.work_dir(STEP, fingerprint), seed=cfg.run.seed, dtype=cfg.model.dtype,
        card_extra={"base model": model.identity, "constitution": f"{constitution.name} v{constitution.version} "
                    f"({constitution.content_hash})", "data": f"critique_revision/{sl_ref.fingerprint}",
                    "config": cfg.run.name},
    )
    ref = store.finalize(STEP, fingerprint, rows=int(metrics.get("rows", len(usable))), metrics=metrics,
                         inputs=inputs, params={"sft": cfg.sft.fingerprint_dict(), "model": model.identity,
                                                "seed": cfg.run.seed})
    store.clean_work(STEP, fingerprint)  # checkpoints are only a resume point; the manifest is written
    publish_markdown("sft-report", markdown_stats("Supervised fine-tuning", metrics), "SFT metrics")
    log.info("sft: %s", metrics)
    return ref


@task(**task_options(STEP, tags=["gpu"]))
def sft_task(cfg: Config, constitution: Constitution, model: ResolvedModel, storage: str, step: str,
             fingerprint: str, inputs: dict[str, str], sl_ref: ArtifactRef) -> ArtifactRef:
    return run_sft(cfg, constitution, model, storage, fingerprint, inputs, sl_ref)
