"""Fingerprints cannot lie: every config field is in one class, and behaves as its class says.

- by value: changing the field changes the fingerprint of the first step that reads it and of
  every step downstream, and of no step upstream;
- by content (paths, model names): an identical copy elsewhere changes no fingerprint, an edit
  changes the reader's and everything downstream;
- not fingerprinted: changing the field changes no fingerprint. Those that could still touch
  results have their evidence named in NOT_FINGERPRINTED (a test showing the same data, or why
  they cannot be varied here).

A field of no class (a new config key nobody classified) fails `test_every_field_has_a_class`.
Fingerprints are computed the way a run computes them (`caiflow.plan.plan_for`: the real
constitution, the real model identity), from configs/tiny.yaml, without running any step.
"""

from __future__ import annotations

import shutil
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel

from caiflow.config import Config, build_config
from caiflow.pipeline import STEPS, downstream
from caiflow.plan import plan_for
from caiflow.sections import Section, fingerprint_class
from caiflow.step_config import PromptSource
from caiflow.training.precision import resolve_bf16_autocast

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

# Fields that change no fingerprint, with why that is right (or where it is shown to be harmless).
NOT_FINGERPRINTED = {
    "run.name": "a label",
    "run.storage": "where artifacts go, not what they hold",
    "base_dir": "where the config file lies; relative paths are fingerprinted by content",
    "model.device": "cannot be varied on a CPU-only machine (no second device to compare with); CPU and CUDA "
    "kernels round differently, so a run moved to another device may differ at float level",
    "roles.teacher.endpoint.api_key_env": "which variable holds the key",
    "roles.teacher.endpoint.base_url": "where, not which model (a moved server keeps the cache)",
    "roles.teacher.endpoint.max_concurrency": "independent requests, each with its own seed, answers "
    "in input order (tests/test_endpoint_engine.py)",
    "roles.teacher.endpoint.max_retries": "retries repeat the same request",
    "roles.teacher.endpoint.timeout": "a slower answer is the same answer",
    "roles.feedback.endpoint.api_key_env": "which variable holds the key",
    "roles.feedback.endpoint.base_url": "where, not which model (a moved server keeps the cache)",
    "roles.feedback.endpoint.max_concurrency": "independent requests, each with its own seed, answers "
    "in input order (tests/test_endpoint_engine.py)",
    "roles.feedback.endpoint.max_retries": "retries repeat the same request",
    "roles.feedback.endpoint.timeout": "a slower answer is the same answer",
    "roles.judge.endpoint.api_key_env": "which variable holds the key",
    "roles.judge.endpoint.base_url": "where, not which model (a moved server keeps the cache)",
    "roles.judge.endpoint.max_concurrency": "independent requests, each with its own seed, answers "
    "in input order (tests/test_endpoint_engine.py)",
    "roles.judge.endpoint.max_retries": "retries repeat the same request",
    "roles.judge.endpoint.timeout": "a slower answer is the same answer",
    "sft.per_device_batch_size": "same update by gradient accumulation: "
    "tests/training/test_sft.py::test_per_device_batch_does_not_change_the_adapter",
    "sft.save_steps": "checkpoint cadence",
    "sft.logging_steps": "log cadence",
    "reward_model.per_device_batch_size": "same update by gradient accumulation: "
    "tests/training/test_reward.py::test_per_device_batch_does_not_change_the_reward_model",
    "reward_model.save_steps": "checkpoint cadence",
    "reward_model.logging_steps": "log cadence",
    "rl.per_device_batch_size": "one generation batch per optimiser step whatever the slices: "
    "tests/training/test_rl.py::test_per_device_batch_does_not_change_the_policy",
    "rl.scoring_batch_size": "rewards scored in any batch agree to float rounding: "
    "tests/training/test_reward.py::test_scorer_gives_member_and_aggregated_scores",
    "rl.save_steps": "checkpoint cadence",
    "sft.gradient_checkpointing": "recomputes the same activations (torch keeps the RNG state for dropout)",
    "reward_model.gradient_checkpointing": "recomputes the same activations",
    "rl.gradient_checkpointing": "recomputes the same activations",
    "launch.num_processes": "each optimiser step sees the same batch_size sequences (per-device x "
    "processes x accumulation); the gradient sum is reduced across processes, so it can differ at float "
    "level "
    "(tests/training/test_launch.py shows it trains)",
    "launch.accelerate_config": "how the processes share the work (DDP, ZeRO, FSDP), not what they compute; "
    "sharded reductions can differ at float level",
    "rl.logging_steps": "log cadence",
    "generation.executor": "where shards run; per-row seeds give the same rows: "
    "tests/test_ray.py::test_tiny_run_on_ray_gives_the_same_data_as_in_process",
}
# Fields fingerprinted by what they point at; the first step that reads it.
BY_CONTENT = {
    "model.name": "prompts",
    "model.revision": "prompts",
    "constitution.path": "critique_revision",  # categorising reads only principle ids and names
    "prompts.sources[].path": "prompts",
    "reward_model.backbone": "reward_model",
    "evaluate.prompts[].path": "baseline",
    "roles.teacher.model": "critique_revision",
    "roles.feedback.model": "preferences",
    "roles.judge.model": "evaluate",
}
# Every other field is fingerprinted by value; the steps that read it first, by longest prefix.
# what `bf16_autocast: auto` becomes here (tiny.yaml's model is float32)
AUTO_BF16 = resolve_bf16_autocast("auto")

READERS = {
    "run.seed": "prompts",
    "model": "prompts",
    "constitution": "critique_revision",  # its texts; a constitution and its inversion share prompts
    "constitution.principles": "prompts",  # which principles exist: categorising reads their ids and names
    "prompts": "prompts",
    "generation": ("critique_revision", "baseline"),  # every step that generates
    "critique_revision": "critique_revision",
    "sft": "sft",
    "preferences": "preferences",
    "reward_model": "reward_model",
    "rl": "rl",
    "evaluate": "evaluate",
    "evaluate.sampling": "baseline",  # the base model's answers are made once, in the baseline step
    "evaluate.prompts": "baseline",
    # an endpoint is fingerprinted by the model it serves (name, revision), not by its URL
    "roles.teacher": "critique_revision",
    "roles.feedback": "preferences",
    "roles.judge": "evaluate",
}
# Values to try where the generic change below does not give a valid config.
CHANGES: dict[str, Any] = {
    "prompts.sources[].kind": "jsonl",
    "prompts.sources[].text_column": "question",
    "evaluate.prompts[].kind": "jsonl",
    "evaluate.prompts[].text_column": "question",
    "evaluate.prompts[].limit": 3,
    "preferences.clamp": [0.2, 0.8],
    "sft.lora.target_modules": ["q_proj", "v_proj"],
    "reward_model.lora.target_modules": ["q_proj", "v_proj"],
    "rl.lora.target_modules": ["q_proj", "v_proj"],
    "constitution.principles": ["harmlessness", "honesty"],
    "evaluate.harmlessness_principle": "honesty",
    "model.tiny.hidden_size": 64,  # a multiple of the head count
    "model.tiny.num_heads": 8,
    "rl.per_device_batch_size": 2,  # a divisor of tiny.yaml's rl.batch_size (4)
    "generation.executor": {"kind": "ray", "address": "10.0.0.5:6379", "actors": 3, "shard_retries": 1},
    "reward_model.method": "full",
    "preferences.contrastive_filter_margin": 0.3,  # 'qlora' also needs shared_backbone
    # 'auto' (the default) is fingerprinted as what it resolves to on this machine: try the other value
    **{f"{s}.bf16_autocast": not AUTO_BF16 for s in ("sft", "reward_model", "rl")},
}


def leaf_fields(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> FieldInfo of every leaf field; list items of a section as `name[]`."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        inner = _section(field.annotation)
        if inner is not None and fingerprint_class(field) == "value":
            out.update(leaf_fields(inner, path + ("[]." if _is_list(field.annotation) else ".")))
        else:
            out[path] = field
    return out


def _section(annotation: Any) -> type[Section] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, Section):
            return arg
    return None


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def expected_class(path: str) -> str:
    if path in NOT_FINGERPRINTED:
        return "none"
    return "content" if path in BY_CONTENT else "value"


def reader(path: str) -> str | tuple[str, ...]:
    if path in BY_CONTENT:
        return BY_CONTENT[path]
    plain = path.replace("[]", "")
    key = max((k for k in READERS if plain == k or plain.startswith(k + ".")), key=len, default=None)
    assert key is not None, (
        f"config field {path} reaches no step: add it to READERS, BY_CONTENT or NOT_FINGERPRINTED"
    )
    return READERS[key]


FIELDS = leaf_fields()


def test_every_field_has_a_class():
    classified = {p for p in FIELDS if expected_class(p) == "none" or p in BY_CONTENT or reader(p)}
    assert classified == set(FIELDS)
    stale = (set(NOT_FINGERPRINTED) | set(BY_CONTENT) | set(CHANGES)) - set(FIELDS)
    assert not stale, f"classified fields that no longer exist: {sorted(stale)}"
    wrong = {
        p: (fingerprint_class(f), expected_class(p))
        for p, f in FIELDS.items()
        if fingerprint_class(f) != expected_class(p)
    }
    assert not wrong, f"code marks these fields differently from this table (code, table): {wrong}"


# ---------------------------------------------------------------- computing fingerprints


@pytest.fixture(scope="module")
def tiny_data(model_store) -> dict:
    data = yaml.safe_load(TINY.read_text())
    data["run"]["storage"] = str(model_store)
    return data


def fingerprints(data: dict, base_dir: Path = TINY.parent) -> dict[str, str]:
    return plan_for(build_config(data, base_dir=base_dir)).plan.fingerprints


def set_path(data: dict, path: str, value: Any) -> dict:
    out = yaml.safe_load(yaml.safe_dump(data))  # a deep copy
    node = out
    keys = path.replace("[]", ".0").split(".")
    for key in keys[:-1]:
        key = int(key) if key.isdigit() else key
        if isinstance(node, list):
            node = node[key]
        else:
            node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


def get_path(cfg: Config, path: str) -> Any:
    value: Any = cfg
    for key in path.replace("[]", ".0").split("."):
        value = value[int(key)] if key.isdigit() else getattr(value, key)
    return value


def changed_values(path: str, field: Any, current: Any) -> list[Any]:
    """Candidate values that differ from `current`, most natural first."""
    if path in CHANGES:
        return [CHANGES[path]]
    options = [a for a in typing.get_args(field.annotation) if typing.get_origin(a) is Literal]
    choices = (
        list(typing.get_args(field.annotation))
        if typing.get_origin(field.annotation) is Literal
        else [c for opt in options for c in typing.get_args(opt)]
    )
    if choices:
        return [c for c in choices if c != current]
    if isinstance(current, bool):
        return [not current]
    if isinstance(current, int):
        return [current + 1, current * 2, max(current - 1, 0)]
    if isinstance(current, float):
        return [round(current + 0.1, 6), round(current / 2, 6)] if current else [0.1]
    if isinstance(current, str):
        return [current + " (changed)"]
    if current is None:
        return [5, 0.5, "changed"]
    raise AssertionError(f"no change known for {path} = {current!r}: add one to CHANGES")


def changed_config(data: dict, path: str, field: Any) -> dict:
    current = get_path(build_config(data, base_dir=TINY.parent), path)
    for value in changed_values(path, field, current):
        candidate = set_path(data, path, value)
        if path.endswith("[].kind"):  # a file source needs a file
            section, key = path.split(".")[0], path.split(".")[1].removesuffix("[]")
            candidate[section][key][0]["path"] = str(ROOT / "caiflow" / "data" / "builtin_prompts.jsonl")
        try:
            build_config(candidate, base_dir=TINY.parent)
        except ValueError:
            continue
        return candidate
    raise AssertionError(f"no valid changed value found for {path}: add one to CHANGES")


def with_endpoint(data: dict, path: str) -> dict:
    """For a field of a role's endpoint: the data with that role on an endpoint, so the field is read."""
    parts = path.split(".")
    if parts[0] != "roles" or len(parts) < 4 or parts[2] != "endpoint":
        return data
    return set_path(
        data, f"roles.{parts[1]}", {"endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    )


def expected_changes(steps: str | tuple[str, ...]) -> set[str]:
    """The steps that read a field (one or several) and everything downstream of them."""
    out: set[str] = set()
    for step in (steps,) if isinstance(steps, str) else steps:
        out |= {step} | downstream(step)
    return out


# ---------------------------------------------------------------- the classes


VALUE_FIELDS = sorted(p for p in FIELDS if expected_class(p) == "value")


@pytest.mark.parametrize("path", VALUE_FIELDS)
def test_value_field_changes_its_reader_and_downstream(path, tiny_data):
    tiny_data = with_endpoint(tiny_data, path)
    base = fingerprints(tiny_data)
    after = fingerprints(changed_config(tiny_data, path, FIELDS[path]))
    changed = {s for s in STEPS if after[s] != base[s]}
    assert changed == expected_changes(reader(path)), path


@pytest.mark.parametrize("path", sorted(NOT_FINGERPRINTED))
def test_unfingerprinted_field_changes_nothing(path, tiny_data, tmp_path):
    tiny_data = with_endpoint(tiny_data, path)
    base = fingerprints(tiny_data)
    if path == "base_dir":  # the same config file in another folder, its relative paths copied along
        (tmp_path / "configs").mkdir()
        shutil.copytree(ROOT / "constitutions", tmp_path / "constitutions")
        assert fingerprints(tiny_data, base_dir=tmp_path / "configs") == base
        return
    if path == "model.device":
        # cannot be varied here: "cuda" fails fast without a GPU. Only the class is checked.
        assert fingerprint_class(FIELDS[path]) == "none"
        return
    data = changed_config(tiny_data, path, FIELDS[path])
    if path == "run.storage":
        shutil.copytree(Path(tiny_data["run"]["storage"]) / "models", tmp_path / "models")
        data = set_path(tiny_data, path, str(tmp_path))
    assert fingerprints(data) == base, path


def test_content_fields_follow_content_not_paths(tiny_data, tmp_path):
    base = fingerprints(tiny_data)
    everything = set(STEPS)

    # constitution.path: an identical copy elsewhere re-runs nothing; an edit re-runs everything
    copy = tmp_path / "copy.yaml"
    shutil.copy(ROOT / "constitutions" / "harmless.yaml", copy)
    assert fingerprints(set_path(tiny_data, "constitution.path", str(copy))) == base
    copy.write_text(copy.read_text().replace("harmful", "hurtful", 1))
    edited = fingerprints(set_path(tiny_data, "constitution.path", str(copy)))
    assert {s for s in STEPS if edited[s] != base[s]} == everything - {"prompts", "baseline"}

    # prompts.sources[].path: the same bytes at two paths are one source; an edit is another
    lines = (ROOT / "caiflow" / "data" / "builtin_prompts.jsonl").read_text().splitlines()[:30]
    first, second = tmp_path / "a.jsonl", tmp_path / "b" / "a.jsonl"
    second.parent.mkdir()
    for f in (first, second):
        f.write_text("\n".join(lines) + "\n")
    source = {"kind": "jsonl", "path": str(first), "kind_label": "column"}
    one = fingerprints(set_path(tiny_data, "prompts.sources", [source]))
    assert fingerprints(set_path(tiny_data, "prompts.sources", [{**source, "path": str(second)}])) == one
    second.write_text("\n".join(lines[:-1]) + "\n")
    other = fingerprints(set_path(tiny_data, "prompts.sources", [{**source, "path": str(second)}]))
    assert {s for s in STEPS if other[s] != one[s]} == everything

    # model.name and reward_model.backbone: a copied model folder is the same model; a changed one is not
    tiny = Path(build_config(tiny_data, base_dir=TINY.parent).run.storage)
    resolved = plan_for(build_config(tiny_data, base_dir=TINY.parent)).model.path
    a, b = tmp_path / "model-a", tmp_path / "elsewhere" / "model-b"
    shutil.copytree(resolved, a)
    shutil.copytree(resolved, b)
    as_folder = fingerprints(set_path(tiny_data, "model.name", str(a)))
    assert fingerprints(set_path(tiny_data, "model.name", str(b))) == as_folder
    with_backbone = fingerprints(set_path(tiny_data, "reward_model.backbone", str(a)))
    assert fingerprints(set_path(tiny_data, "reward_model.backbone", str(b))) == with_backbone
    (b / "generation_config.json").write_text('{"temperature": 0.5}')
    assert {
        s for s in STEPS if fingerprints(set_path(tiny_data, "model.name", str(b)))[s] != as_folder[s]
    } == everything
    changed = fingerprints(set_path(tiny_data, "reward_model.backbone", str(b)))
    assert {s for s in STEPS if changed[s] != with_backbone[s]} == expected_changes("reward_model")

    # roles.judge.model: a judge model given by path counts by content; a stage (base, sl) by name
    shutil.rmtree(b)
    shutil.copytree(a, b)
    judged = fingerprints(set_path(tiny_data, "roles.judge.model", str(a)))
    assert fingerprints(set_path(tiny_data, "roles.judge.model", str(b))) == judged
    assert {s for s in STEPS if judged[s] != base[s]} == {"evaluate"}
    (b / "generation_config.json").write_text('{"temperature": 0.5}')
    assert {
        s for s in STEPS if fingerprints(set_path(tiny_data, "roles.judge.model", str(b)))[s] != judged[s]
    } == {"evaluate"}
    assert {
        s for s in STEPS if fingerprints(set_path(tiny_data, "roles.judge.model", "sl"))[s] != base[s]
    } == {"evaluate"}

    # evaluate.prompts[].path: the same file at two paths is one source
    extra = {"kind": "jsonl", "path": str(first), "kind_label": "column"}
    one = fingerprints(set_path(tiny_data, "evaluate.prompts", [extra]))
    assert (
        fingerprints(set_path(tiny_data, "evaluate.prompts", [{**extra, "path": str(second)}])) != one
    )  # edited
    shutil.copy(first, second)
    assert fingerprints(set_path(tiny_data, "evaluate.prompts", [{**extra, "path": str(second)}])) == one
    assert {s for s in STEPS if one[s] != base[s]} == expected_changes("baseline")
    assert tiny.is_dir()


def test_model_revision_is_fingerprinted_by_snapshot(tiny_data, tmp_path, monkeypatch):
    """A hub id's identity is the snapshot its revision resolves to, not the revision's name."""
    import huggingface_hub.constants as constants

    resolved = plan_for(build_config(tiny_data, base_dir=TINY.parent)).model.path
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    for ref, commit in (("main", "a" * 40), ("v1", "a" * 40), ("v2", "b" * 40)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        if not (repo / "snapshots" / commit).exists():
            shutil.copytree(resolved, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    hub = set_path(tiny_data, "model.name", "org/tiny")
    main = fingerprints(hub)
    assert fingerprints(set_path(hub, "model.revision", "v1")) == main  # another name, the same snapshot
    v2 = fingerprints(set_path(hub, "model.revision", "v2"))
    assert {s for s in STEPS if v2[s] != main[s]} == set(STEPS)


def test_evidence_named_for_unfingerprinted_fields_exists():
    """Every test named as evidence above exists, so the table cannot point at nothing."""
    for path, why in NOT_FINGERPRINTED.items():
        for ref in [w for w in why.split() if "::" in w]:
            file, name = ref.rstrip(",.)").split("::")
            assert f"def {name}(" in (ROOT / file).read_text(), (path, ref)


def test_prompt_source_fields_are_walked():
    """List items are classified field by field (the walk reaches into prompts.sources)."""
    assert {p for p in FIELDS if p.startswith("prompts.sources[].")} == {
        f"prompts.sources[].{name}" for name in PromptSource.model_fields
    }


def test_auto_bf16_is_fingerprinted_as_what_it_resolves_to(tiny_data):
    """'auto' plans exactly as the value it became here, and the other value plans differently."""
    auto = fingerprints(tiny_data)
    explicit, other = tiny_data, tiny_data
    for section in ("sft", "reward_model", "rl"):
        explicit = set_path(explicit, f"{section}.bf16_autocast", AUTO_BF16)
        other = set_path(other, f"{section}.bf16_autocast", not AUTO_BF16)
    assert fingerprints(explicit) == auto
    cfg = build_config(tiny_data, base_dir=TINY.parent)
    assert cfg.sft.bf16_autocast == "auto"
    plan_for(cfg)  # the steps read the config the plan resolved
    assert [getattr(cfg, s).bf16_autocast for s in ("sft", "reward_model", "rl")] == [AUTO_BF16] * 3
    changed = {step for step, fp in fingerprints(other).items() if fp != auto[step]}
    assert changed == {"sft", "preferences", "reward_model", "rl", "evaluate"}
