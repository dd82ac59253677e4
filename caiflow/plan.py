"""Which artifact each step of a run produces: the fingerprints, computed before anything runs.

A fingerprint covers exactly what determines a step's output (step version, result-changing
config fields, the constitution's content hash, the model identity, the upstream
fingerprints, the seed, the prompt sources' content), so a re-run with the same inputs finds
the finished artifact, and any change re-runs that step and everything downstream of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from caiflow.config import Config, PromptSource
from caiflow.models import folder_digest
from caiflow.store import fingerprint

# Bump a step's version when its code changes what it writes.
STEP_VERSIONS = {"prompts": 2, "critique_revision": 2, "sft": 1, "preferences": 2, "reward_model": 1,
                 "rl": 1, "evaluate": 2}
# The steps in the order they run; each one's inputs are among the steps before it.
STEPS = list(STEP_VERSIONS)


@dataclass
class Plan:
    fingerprints: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)


def source_digest(source: PromptSource, base_dir: Path) -> str:
    """What a prompt source holds now: file bytes, folder contents, or the builtin set."""
    if source.kind == "builtin":
        from caiflow.prompts import BUILTIN_PATH

        return hashlib.sha256(Path(BUILTIN_PATH).read_bytes()).hexdigest()[:16]
    assert source.path is not None
    path = Path(source.path).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if path.is_dir():
        return folder_digest(path)
    return f"id:{source.path}@{source.split}"  # a `datasets` id from the local cache


def _endpoint(e) -> str:
    return f"openai:{e.base_url}#{e.model}"


def make_plan(cfg: Config, constitution_hash: str, model_identity: str,
              backbone_identity: str | None = None) -> Plan:
    """Fingerprints of all seven steps. `backbone_identity`: the reward model's backbone when it
    is not the policy's base model."""
    plan = Plan()
    seed = cfg.run.seed
    base = Path(cfg.base_dir)
    prompts_cfg = cfg.prompts.fingerprint_dict()
    uses_model = cfg.prompts.categorize.backend == "local"
    plan.fingerprints["prompts"] = fingerprint(
        "prompts",
        STEP_VERSIONS["prompts"],
        config=prompts_cfg,
        sources=[source_digest(s, base) for s in cfg.prompts.sources],
        constitution=constitution_hash,
        # The model counts the tokens of every prompt (over-long ones are dropped) and, locally, categorises.
        model=model_identity,
        categorizer="local-model" if uses_model else cfg.prompts.categorize.backend,
        seed=seed,
    )
    plan.inputs["prompts"] = {}
    plan.inputs["critique_revision"] = {"prompts": plan.fingerprints["prompts"]}
    plan.fingerprints["critique_revision"] = fingerprint(
        "critique_revision",
        STEP_VERSIONS["critique_revision"],
        config=cfg.critique_revision.fingerprint_dict(),
        constitution=constitution_hash,
        model=model_identity,
        model_dtype=cfg.model.dtype,
        inputs=plan.inputs["critique_revision"],
        seed=seed,
    )

    def add(step: str, inputs: dict[str, str], **parts) -> None:
        plan.inputs[step] = inputs
        plan.fingerprints[step] = fingerprint(step, STEP_VERSIONS[step], inputs=inputs, seed=seed,
                                              model_dtype=cfg.model.dtype, **parts)

    fps = plan.fingerprints
    add("sft", {"critique_revision": fps["critique_revision"]},
        config=cfg.sft.fingerprint_dict(), model=model_identity)
    pref = cfg.preferences
    add("preferences", {"prompts": fps["prompts"], "sft": fps["sft"]},
        config=pref.fingerprint_dict(), constitution=constitution_hash,
        feedback={"sl": f"sft:{fps['sft']}", "base": model_identity,
                  "openai": _endpoint(pref.openai)}[pref.feedback_model])
    add("reward_model", {"preferences": fps["preferences"]},
        config=cfg.reward_model.fingerprint_dict(), backbone=backbone_identity or model_identity)
    add("rl", {"prompts": fps["prompts"], "sft": fps["sft"], "reward_model": fps["reward_model"]},
        config=cfg.rl.fingerprint_dict(), model=model_identity)
    ev = cfg.evaluate
    add("evaluate", {"prompts": fps["prompts"], "sft": fps["sft"], "reward_model": fps["reward_model"],
                     "rl": fps["rl"]},
        config=ev.fingerprint_dict(), constitution=constitution_hash, model=model_identity,
        judge={"sl": f"sft:{fps['sft']}", "base": model_identity, "openai": _endpoint(ev.openai)}[ev.judge])
    return plan
