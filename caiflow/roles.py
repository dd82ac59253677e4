"""Model roles: who writes the SL data, who labels preference pairs, who judges.

```
roles:
  teacher:  {model: policy}   # answers, critiques, revisions (and categorisation by endpoint)
  feedback: {model: sl}       # "(A) or (B)?" on preference pairs
  judge:    {model: base}     # evaluation's pairwise comparisons
```

The policy, the model being trained, is the `model` section (always in-process: it is trained).
Each role is either a model (a pipeline stage by name, or a model spec: builtin name, local
folder, .gguf file, cached hub id) or an OpenAI-compatible `endpoint` (vLLM, TGI, SGLang,
llama.cpp, hosted APIs). An endpoint is fingerprinted by the model it serves (`model`, plus
`revision` where you pin one), never by its URL: a server moved to another host or port keeps
the cache.

Old keys fold in (`migrate_legacy`): `preferences.feedback_model` and `preferences.openai` become
`roles.feedback`, `evaluate.judge` and `evaluate.openai` become `roles.judge`, with a warning;
`prompts.categorize.openai` is a one-line error naming the new keys.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, model_validator

from caiflow.sections import Section, by_content
from caiflow.step_config import OpenAIEndpointConfig

log = logging.getLogger(__name__)

# Stage names a role may take instead of a model spec.
STAGES = {"teacher": ("policy",), "feedback": ("sl", "base"), "judge": ("base", "sl")}
ROLE_NAMES = tuple(STAGES)


class RoleConfig(Section):
    model: str = by_content(
        "",
        description="A pipeline stage by name ('policy'; 'sl', 'base') or a model spec (a builtin name, "
        "local folder, .gguf file or cached hub id); ignored when `endpoint` is set.",
    )
    endpoint: OpenAIEndpointConfig | None = Field(
        None,
        description="An OpenAI-compatible server for this role (vLLM, TGI, llama.cpp, hosted APIs); "
        "null: the model above runs in-process.",
    )

    @property
    def is_endpoint(self) -> bool:
        return self.endpoint is not None


class RolesConfig(Section):
    teacher: RoleConfig = Field(
        default_factory=lambda: RoleConfig(model="policy"),
        description="Writes the SL data (answers, critiques, revisions); default the policy, as in the "
        "paper.",
    )
    feedback: RoleConfig = Field(
        default_factory=lambda: RoleConfig(model="sl"),
        description="Labels preference pairs by the log-probability of (A) vs (B); default the SL model.",
    )
    judge: RoleConfig = Field(
        default_factory=lambda: RoleConfig(model="base"),
        description="Judges evaluation's pairwise comparisons (calibrated first); default the base model.",
    )

    @model_validator(mode="after")
    def _stages_exist(self) -> RolesConfig:
        for name in ROLE_NAMES:
            role = getattr(self, name)
            if not role.is_endpoint and not role.model:
                raise ValueError(
                    f"roles.{name} has neither a model nor an endpoint: set roles.{name}.model to "
                    f"{' or '.join(STAGES[name])} or a model spec, or roles.{name}.endpoint."
                )
            if (
                not role.is_endpoint
                and role.model in ("policy", "sl", "base")
                and role.model not in STAGES[name]
            ):
                raise ValueError(
                    f"roles.{name}.model '{role.model}' is not a stage this role can use: "
                    f"use {' or '.join(STAGES[name])}, a model spec, or an endpoint."
                )
        return self


def is_stage(role: RoleConfig) -> bool:
    """A role played by a pipeline stage ('policy', 'sl', 'base') rather than a model spec or endpoint."""
    return not role.is_endpoint and role.model in ("policy", "sl", "base")


def endpoint_identity(endpoint: OpenAIEndpointConfig) -> str:
    """What an endpoint's outputs depend on: the model it serves, not where it is served."""
    return f"endpoint:{endpoint.model}" + (f"@{endpoint.revision}" if endpoint.revision else "")


def role_identity(role: RoleConfig, storage: str) -> str:
    """A role's identity for fingerprints: a stage name, an endpoint's model, or a model's content."""
    if role.endpoint is not None:
        return endpoint_identity(role.endpoint)
    if is_stage(role):
        return role.model
    from caiflow.models import resolve_model

    return resolve_model(role.model, storage).identity


def describe(role: RoleConfig) -> str:
    """A role for logs and reports (no key, and the URL only as the place it runs)."""
    if role.endpoint is not None:
        return f"{role.endpoint.model} at {role.endpoint.base_url}"
    return role.model


# ---------------------------------------------------------------- old keys


def _move(data: dict, section: str, old: str, role: str, endpoint_key: str = "openai") -> None:
    sec = data.get(section)
    if not isinstance(sec, dict) or (old not in sec and endpoint_key not in sec):
        return
    if old not in sec:  # the endpoint was only read with `old: openai`; alone it did nothing
        sec.pop(endpoint_key)
        log.warning(
            "config: %s.%s is unused; an endpoint for this role goes under roles.%s.endpoint",
            section,
            endpoint_key,
            role,
        )
        return
    roles = data["roles"] = dict(data.get("roles") or {})
    if role in roles:
        raise ValueError(
            f"{section}.{old} and roles.{role} are both set: keep roles.{role} and delete {section}.{old}."
        )
    value, endpoint = sec.pop(old), sec.pop(endpoint_key, None)
    if value == "openai":
        roles[role] = {"endpoint": endpoint or {}}
        new = f"roles.{role}.endpoint"
    else:
        roles[role] = {"model": value}
        new = f"roles.{role}.model: {value}"
    log.warning("config: %s.%s is now %s (the old key still works)", section, old, new)


def migrate_legacy(data: Any) -> Any:
    """Rewrite the keys that moved into `roles` (see the module docstring); other data as it is."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for section in ("preferences", "evaluate"):
        if isinstance(data.get(section), dict):
            data[section] = dict(data[section])
    _move(data, "preferences", "feedback_model", "feedback")
    _move(data, "evaluate", "judge", "judge")
    cat = (data.get("prompts") or {}).get("categorize") if isinstance(data.get("prompts"), dict) else None
    if isinstance(cat, dict) and ("openai" in cat or cat.get("backend") == "openai"):
        raise ValueError(
            "prompts.categorize.openai moved to the roles: put the endpoint under roles.teacher.endpoint "
            "and set prompts.categorize.backend: endpoint (prompts.categorize.role picks another role)."
        )
    return data


# ---------------------------------------------------------------- at run time


def endpoints_in_use(cfg: Any) -> list[tuple[str, OpenAIEndpointConfig, bool]]:
    """(setting, endpoint, needs logprobs) for each endpoint the config's steps will call."""
    from caiflow.config import ConfigError

    roles, used = cfg.roles, []
    cat = cfg.prompts.categorize
    if cat.backend == "endpoint":
        role = getattr(roles, cat.role)
        if role.endpoint is None:
            raise ConfigError(
                f"prompts.categorize.backend is 'endpoint' but roles.{cat.role} has no endpoint: set "
                f"roles.{cat.role}.endpoint, or prompts.categorize.role to a role that has one."
            )
        used.append((f"roles.{cat.role}", role.endpoint, False))
    if roles.teacher.endpoint is not None:
        used.append(("roles.teacher", roles.teacher.endpoint, False))
    if roles.feedback.endpoint is not None and cfg.preferences.method != "contrastive":
        used.append(("roles.feedback", roles.feedback.endpoint, True))
    if roles.judge.endpoint is not None:
        used.append(("roles.judge", roles.judge.endpoint, True))
    return used


def check_endpoints(cfg: Any) -> None:
    """Before any step: each endpoint in use answers, serves its model, and gives logprobs where needed.

    One check per distinct (server, model): a llama.cpp server playing teacher, feedback and judge
    is asked once (with logprobs, if any of its roles needs them).
    """
    from caiflow.endpoint_engine import check_endpoint

    seen: dict[tuple[str, str], tuple[str, OpenAIEndpointConfig, bool]] = {}
    for who, endpoint, logprobs in endpoints_in_use(cfg):
        key = (endpoint.base_url, endpoint.model)
        prev = seen.get(key)
        seen[key] = (prev[0] if prev and not logprobs else who, endpoint, logprobs or bool(prev and prev[2]))
    for who, endpoint, logprobs in seen.values():
        check_endpoint(endpoint, who, logprobs)


def teacher_engine(cfg: Any, policy: Any, batch_size: int) -> Any:
    """What writes the SL data: the policy in-process (default), another model in-process, or an endpoint."""
    from caiflow.generation import GenerationEngine, engine_options
    from caiflow.models import load_model_and_tokenizer, resolve_model

    teacher = cfg.roles.teacher
    if teacher.endpoint is not None:
        from caiflow.endpoint_engine import EndpointEngine

        return EndpointEngine(teacher.endpoint)
    resolved = policy if is_stage(teacher) else resolve_model(teacher.model, cfg.run.storage)
    model_obj, tok = load_model_and_tokenizer(
        resolved, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code
    )
    return GenerationEngine(
        model_obj, tok, batch_size=batch_size, **engine_options(cfg.generation, cfg.model)
    )


def role_scorer(
    name: str, cfg: Any, base: Any, refs: dict[str, Any], batch_size: int, engines: dict | None = None
) -> Any:
    """What scores "(A)" vs "(B)" for a role ('feedback', 'judge'): a stage's engine, a model spec loaded
    in-process, or the role's endpoint. An engine already loaded for that stage (`engines`) is reused."""
    from caiflow.generation import GenerationEngine, engine_options
    from caiflow.models import load_model_and_tokenizer, policy_engine, resolve_model

    role = getattr(cfg.roles, name)
    if role.endpoint is not None:
        from caiflow.endpoint_engine import EndpointEngine

        return EndpointEngine(role.endpoint)
    if is_stage(role):
        if engines is not None and role.model in engines:
            return engines[role.model]
        return policy_engine(role.model, cfg.model, base, refs, batch_size, cfg.generation)
    model_obj, tok = load_model_and_tokenizer(
        resolve_model(role.model, cfg.run.storage), cfg.model.dtype, cfg.model.device
    )
    return GenerationEngine(
        model_obj, tok, batch_size=batch_size, **engine_options(cfg.generation, cfg.model)
    )


def usage_metrics(role: str, engine: Any) -> dict[str, int]:
    """`<role>_requests`, `<role>_prompt_tokens`, `<role>_completion_tokens` of an endpoint engine; {}
    for an in-process one (its tokens cost nothing per token)."""
    usage = getattr(engine, "usage", None)
    return {f"{role}_{k}": v for k, v in usage().items()} if callable(usage) else {}
