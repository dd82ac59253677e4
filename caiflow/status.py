"""`caiflow status`: for each step, whether the store has its artifact, and if not, why it would run.

The question users of cached pipelines ask most is "why did this re-run?". Every manifest keeps
the recipe of its fingerprint (`Plan.parts`: config sections, model identity and settings,
constitution hash, seed) and its inputs' fingerprints, so a planned fingerprint the store lacks
is compared with the closest earlier artifact of the same step: the differing keys are the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from caiflow.pipeline import PIPELINE
from caiflow.plan import Plan
from caiflow.store import Store


@dataclass
class StepStatus:
    step: str
    fingerprint: str
    state: str  # "done", "running" (another process holds its lock), "unfinished" or "to run"
    why: str  # empty when done


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every flattened key whose value differs."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key}: {_short(a.get(key, '<unset>'))} -> {_short(b.get(key, '<unset>'))}")
    return out


def _short(value: Any, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def why_it_runs(store: Store, step: str, inputs: dict[str, str], recipe: dict[str, Any]) -> str:
    """Why a step whose planned artifact is missing would run: what differs from its closest
    earlier artifact."""
    candidates = []
    for artifact_step, fp in store.iter_artifacts():
        if artifact_step != step:
            continue
        manifest = store.manifest(step, fp)
        if manifest is None:
            continue
        changed_inputs = [
            f"input {name} changed ({manifest.get('inputs', {}).get(name, '<none>')} -> {want})"
            for name, want in sorted(inputs.items())
            if manifest.get("inputs", {}).get(name) != want
        ]
        earlier = manifest.get("recipe")
        if earlier is None:
            changed = ["no recipe recorded (made by an older caiflow)"]
        else:
            changed = differences(earlier, recipe)
        candidates.append(
            (len(changed_inputs) + len(changed), manifest.get("created_at", ""), fp, changed_inputs + changed)
        )
    if not candidates:
        return "no artifact of this step yet"
    _, _, fp, changed = min(candidates, key=lambda c: (c[0], _desc(c[1])))
    if not changed:
        return f"same recipe as {fp} but another fingerprint (the step's code version changed)"
    shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
    return f"vs {step}/{fp}: {shown}"


def _desc(created_at: str) -> tuple[int, ...]:
    """Sort key that puts the newest first among equally close artifacts."""
    return tuple(-ord(c) for c in created_at)


def pipeline_status(store: Store, plan: Plan, steps: list[str] | None = None) -> list[StepStatus]:
    """The status of every step of a plan (or of the named steps), in pipeline order."""
    out = []
    for spec in PIPELINE:
        if steps is not None and spec.name not in steps:
            continue
        fp = plan.fingerprints[spec.name]
        if store.is_complete(spec.name, fp):
            out.append(StepStatus(spec.name, fp, "done", ""))
        elif store.is_locked(spec.name, fp):
            out.append(StepStatus(spec.name, fp, "running", "another process is computing it now"))
        else:
            why = why_it_runs(store, spec.name, plan.inputs[spec.name], plan.parts[spec.name])
            started = store.artifact_dir(spec.name, fp).is_dir()
            out.append(
                StepStatus(
                    spec.name,
                    fp,
                    "unfinished" if started else "to run",
                    ("started earlier and resumes where it stopped; " if started else "") + why,
                )
            )
    return out
