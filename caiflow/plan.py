"""Which artifact each step of a run produces: the fingerprints, computed before anything runs.

A fingerprint covers exactly what determines a step's output: the step's version, the config
fields that change results (`caiflow.sections` says which), the constitution's content hash,
the model's identity and the settings it runs in, the upstream fingerprints, the seed and the
prompt sources' content. A re-run with the same inputs finds the finished artifact; any change
re-runs that step and everything downstream of it. The steps and what each reads come from
`caiflow.pipeline`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caiflow.config import Config
from caiflow.models import ResolvedModel, folder_digest, resolve_model
from caiflow.pipeline import PIPELINE, spec
from caiflow.roles import endpoint_identity, is_stage, role_identity
from caiflow.step_config import PromptSource
from caiflow.store import fingerprint

log = logging.getLogger(__name__)


@dataclass
class Plan:
    fingerprints: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    # What went into each fingerprint besides the inputs (for `caiflow status`: why a step re-runs).
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)


def source_digest(source: PromptSource, base_dir: Path) -> str:
    """What a prompt source holds now: file bytes, folder contents, or the builtin set."""
    if source.kind in ("builtin", "lookalike"):
        from caiflow.prompts import BUILTIN_PATH, LOOKALIKE_PATH

        path = BUILTIN_PATH if source.kind == "builtin" else LOOKALIKE_PATH
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    assert source.path is not None
    path = Path(source.path).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if path.is_dir():
        return folder_digest(path)
    return f"id:{source.path}@{source.split}"  # a `datasets` id from the local cache


def model_settings(cfg: Config) -> dict[str, Any]:
    """The model settings that change what a loaded model computes, besides its identity."""
    return {
        "dtype": cfg.model.dtype,
        "trust_remote_code": cfg.model.trust_remote_code,
        "cpu_kernels": cfg.model.cpu_kernels,
    }


def critique_row_context(
    cfg: Config, constitution_hash: str, model_identity: str, teacher: str = "policy"
) -> str:
    """What a critique-revision row depends on besides the row itself.

    The same for runs whose prompt sets differ, so rows of an earlier run are reused
    (`caiflow.sharded.reusable_rows`). `teacher`: `roles.teacher`'s identity (`role_identity`).
    """
    # The default teacher (the policy) adds nothing, so rows made before roles existed stay reusable.
    who = {} if teacher == "policy" else {"teacher": teacher}
    return fingerprint(
        "critique_revision-rows",
        spec("critique_revision").version,
        config=cfg.critique_revision.fingerprint_dict(),
        constitution=constitution_hash,
        model=model_identity,
        model_settings=model_settings(cfg),
        generation=cfg.generation.fingerprint_dict(),
        seed=cfg.run.seed,
        **who,
    )


def reward_backbone(cfg: Config, model: ResolvedModel, storage: str) -> ResolvedModel:
    """The reward model's starting point: `reward_model.backbone`, else the policy's base model."""
    if not cfg.reward_model.backbone:
        return model
    return resolve_model(cfg.reward_model.backbone, storage)


def make_plan(
    cfg: Config,
    constitution_hash: str,
    model_identity: str,
    backbone_identity: str | None = None,
    *,
    principle_labels: Sequence[tuple[str, str]] = (),
    roles: dict[str, str] | None = None,
    judge_question: str = "",
) -> Plan:
    """Fingerprints of every step.

    `principle_labels`: (id, name) of each principle in use, all that categorising prompts reads
    (so a constitution and its inversion share the prompts step); `backbone_identity`: the
    reward model's backbone when it is not the policy's base model; `judge_identity`: a judge
    `roles`: the identity of each role (`role_identity`; default: the stage names of
    `cfg.roles`); `judge_question`: the harmlessness question the judge asks.
    """
    base = Path(cfg.base_dir)
    roles = roles or {n: getattr(cfg.roles, n).model for n in ("teacher", "feedback", "judge")}
    cat = cfg.prompts.categorize
    categorizer = (
        {"categorizer": endpoint_identity(getattr(cfg.roles, cat.role).endpoint)}
        if cat.backend == "endpoint" and getattr(cfg.roles, cat.role).endpoint is not None
        else {}
    )
    # The default teacher (the policy) adds nothing, so artifacts made before roles existed stay valid.
    teacher = {} if roles["teacher"] == "policy" else {"teacher": roles["teacher"]}
    model = {"identity": model_identity, **model_settings(cfg)}
    generation = cfg.generation.fingerprint_dict()  # batch and shard size: see caiflow.config
    pref, ev = cfg.preferences, cfg.evaluate
    parts: dict[str, dict[str, Any]] = {
        "prompts": dict(
            config=cfg.prompts.fingerprint_dict(),
            sources=[source_digest(s, base) for s in cfg.prompts.sources],
            principles=[list(label) for label in principle_labels],
            # The model counts the tokens of every prompt (over-long ones are dropped) and,
            # locally, categorises.
            model=model,
            **categorizer,
        ),
        "critique_revision": dict(
            config=cfg.critique_revision.fingerprint_dict(),
            generation=generation,
            constitution=constitution_hash,
            model=model,
            **teacher,
        ),
        "sft": dict(config=cfg.sft.fingerprint_dict(), model=model),
        "preferences": dict(
            config=pref.fingerprint_dict(),
            generation=generation,
            constitution=constitution_hash,
            model=model,
            feedback=roles["feedback"],
        ),
        "reward_model": dict(
            config=cfg.reward_model.fingerprint_dict(),
            model=model,
            backbone=backbone_identity or model_identity,
        ),
        "rl": dict(config=cfg.rl.fingerprint_dict(), model=model),
        "baseline": dict(
            sampling=ev.sampling.fingerprint_dict(),
            prompts=[s.fingerprint_dict() for s in ev.prompts],
            sources=[source_digest(s, base) for s in ev.prompts],
            generation=generation,
            model=model,
        ),
        "evaluate": dict(
            config=ev.fingerprint_dict(),
            generation=generation,
            constitution=constitution_hash,
            model=model,
            judge=roles["judge"],
            judge_question=judge_question,
        ),
    }
    plan = Plan()
    for step in PIPELINE:
        plan.inputs[step.name] = {name: plan.fingerprints[name] for name in step.inputs}
        plan.parts[step.name] = {**parts[step.name], "seed": cfg.run.seed}
        plan.fingerprints[step.name] = fingerprint(
            step.name, step.version, inputs=plan.inputs[step.name], **plan.parts[step.name]
        )
    return plan


@dataclass
class Resolved:
    """A config's constitution, model and plan: what a run needs before its first step."""

    constitution: Any
    model: ResolvedModel
    plan: Plan
    judge_question: str = ""  # the un-inverted harmlessness question the judge asks


def judge_question(cfg: Config) -> str:
    """The harmlessness question of the whole, un-inverted constitution: what the judge always asks.

    Checked before anything runs: a principle that does not exist is a ConstitutionError naming
    the valid ones, even when training is restricted to other principles.
    """
    from caiflow.constitution import ConstitutionError, load_constitution

    full = load_constitution(cfg.constitution_path(), invert=False, principles=[])
    try:
        return full.principle(cfg.evaluate.harmlessness_principle).feedback_question
    except ConstitutionError as exc:
        raise ConstitutionError(
            f"evaluate.harmlessness_principle '{cfg.evaluate.harmlessness_principle}' is not a principle of "
            f"{cfg.constitution_path()}: set it to one of {', '.join(full.principle_ids())}."
        ) from exc


TRAINING_SECTIONS = ("sft", "reward_model", "rl")


def resolve_auto_settings(cfg: Config) -> dict[str, bool]:
    """Settings left to this machine, decided once per run and written into `cfg`, so that the steps
    and the fingerprints see what runs: each training section's `bf16_autocast: auto` becomes true or
    false (`caiflow.training.precision.resolve_bf16_autocast`). Returns what 'auto' became, by section."""
    from caiflow.training.precision import bf16_rates, bf16_supported, rates_file, resolve_bf16_autocast

    resolved = {}
    for name in TRAINING_SECTIONS:
        section = getattr(cfg, name)
        if section.bf16_autocast == "auto":
            section.bf16_autocast = resolved[name] = resolve_bf16_autocast("auto", cfg.model.dtype)
    if not resolved:
        return resolved
    if cfg.model.dtype != "float32":
        why = f" (model.dtype {cfg.model.dtype})"
    elif rates := bf16_rates() if bf16_supported() else {}:  # {} on a GPU: nothing was timed
        why = (
            f" (bfloat16 products {rates['bfloat16']:.0f} GFLOP/s, float32 {rates['float32']:.0f} on this"
            f" machine, as measured once and kept in {rates_file()})"
        )
    else:
        why = ""
    on_off = ", ".join(f"{name} {'on' if on else 'off'}" for name, on in resolved.items())
    log.info("bf16_autocast: auto -> %s%s", on_off, why)
    return resolved


def plan_for(cfg: Config) -> Resolved:
    """Load the constitution, resolve the models (building or dequantising once), decide the settings
    left to this machine (`resolve_auto_settings`) and plan the run."""
    from caiflow.constitution import load_constitution

    storage = cfg.run.storage
    resolve_auto_settings(cfg)
    constitution = load_constitution(
        cfg.constitution_path(), cfg.constitution.invert, cfg.constitution.principles
    )
    question = judge_question(cfg)
    model = resolve_model(cfg.model.name, storage, cfg.model.revision, cfg.model.tiny.model_dump())
    backbone = reward_backbone(cfg, model, storage).identity if cfg.reward_model.backbone else None
    roles = {n: role_identity(getattr(cfg.roles, n), storage) for n in ("teacher", "feedback", "judge")}
    plan = make_plan(
        cfg,
        constitution.content_hash,
        model.identity,
        backbone,
        principle_labels=[(p.id, p.name) for p in constitution.principles],
        roles=roles,
        judge_question=question,
    )
    return Resolved(constitution, model, plan, question)


def memory_shapes(cfg: Config, model: ResolvedModel | None = None):
    """The shapes the memory plan needs (policy, reward backbone, judge), from config.json files only.

    A Hugging Face id that is not in the local cache falls back to `caiflow.memory.KNOWN_SHAPES`
    (the plan needs no weights); any other missing model raises ModelNotFoundError.
    """
    from caiflow.memory import KNOWN_SHAPES, Shapes, shape_of_folder
    from caiflow.models import ModelNotFoundError

    storage = cfg.run.storage

    def shape(name: str, resolved: ResolvedModel | None = None, **kwargs: Any):
        try:
            return shape_of_folder((resolved or resolve_model(name, storage, **kwargs)).path)
        except ModelNotFoundError:
            if name in KNOWN_SHAPES:
                return KNOWN_SHAPES[name]
            raise

    policy = shape(cfg.model.name, model, revision=cfg.model.revision, tiny=cfg.model.tiny.model_dump())
    reward = shape(cfg.reward_model.backbone) if cfg.reward_model.backbone else None
    judge_role = cfg.roles.judge
    judge = None if judge_role.is_endpoint or is_stage(judge_role) else shape(judge_role.model)
    return Shapes(policy, reward, judge)
