"""The flows behind the Prefect deployments in `deployments/prefect.yaml`.

- `constitutional-ai`: the whole pipeline on a preset, with the main settings as optional
  overrides (the parameters form in the Prefect UI shows each one with its description).
- `regenerate`: prompts, critique-revision and preferences (and the SFT they need) on new or
  changed prompts; scheduled every night. Rows already generated under the same settings are
  reused, so only new prompts cost generation time.
- `evaluate`: the evaluation step on models a `constitutional-ai` run already trained.

Each is a thin wrapper over `flows.constitutional_ai.run_pipeline`: it loads the config, runs the
steps (each a cached Prefect task), and publishes a `run-summary` table artifact for the UI.
The pipeline is imported inside the flows, so `prefect deploy` loads this module in a second.
Secrets (API keys) never go into parameters: they come from the worker's environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from pydantic import BaseModel, Field

from caiflow.config import Config, load_config
from caiflow.pipeline import STEPS

PROJECT = Path(__file__).resolve().parents[1]
# The worker started by `make ui` sets this to its storage root; a run's `storage` parameter wins.
STORAGE_ENV = "CAIFLOW_STORAGE"

Step = Literal[STEPS]  # type: ignore[valid-type]
RegenerateStep = Literal[STEPS[1:]]  # type: ignore[valid-type]


class Settings(BaseModel):
    """The settings people change most, each an optional override of the preset (empty: keep the preset's)."""

    run_name: str | None = Field(None, description="run.name: a label shown in run records.")
    seed: int | None = Field(
        None, description="run.seed: the master seed of every sampled principle and answer."
    )
    max_red_team: int | None = Field(
        None, ge=1, description="prompts.max_red_team: red-team prompts kept (train + eval)."
    )
    max_benign: int | None = Field(
        None, ge=0, description="prompts.max_benign: benign prompts kept (train + eval)."
    )
    critique_rounds: int | None = Field(
        None, ge=1, le=4, description="critique_revision.rounds: critique-revision rounds per answer (1-4)."
    )
    invert_constitution: bool | None = Field(
        None,
        description="constitution.invert: run the inverted control constitution (each principle negated).",
    )
    sft_method: Literal["lora", "qlora", "full"] | None = Field(
        None, description="sft.method: LoRA adapters, 4-bit QLoRA (needs bitsandbytes) or full fine-tuning."
    )
    rl_algorithm: Literal["rloo", "grpo"] | None = Field(
        None, description="rl.algorithm: RLOO (default) or GRPO against the reward model."
    )
    rl_max_steps: int | None = Field(None, ge=1, description="rl.max_steps: RL optimiser steps.")
    judge: str | None = Field(
        None,
        description="roles.judge.model: who judges the pairwise comparisons: base, sl or a model "
        "spec (a local folder, .gguf file or cached hub id); an endpoint judge is set in the preset.",
    )


# Settings field -> the config key it overrides.
SETTING_KEYS = {
    "run_name": "run.name",
    "seed": "run.seed",
    "max_red_team": "prompts.max_red_team",
    "max_benign": "prompts.max_benign",
    "critique_rounds": "critique_revision.rounds",
    "invert_constitution": "constitution.invert",
    "sft_method": "sft.method",
    "rl_algorithm": "rl.algorithm",
    "rl_max_steps": "rl.max_steps",
    "judge": "roles.judge.model",
}


def settings_overrides(settings: Settings | dict | None) -> list[str]:
    """`--set`-style overrides for the fields that are set (JSON values are valid YAML)."""
    if settings is None:
        return []
    if isinstance(settings, dict):
        settings = Settings.model_validate(settings)
    values = settings.model_dump(exclude_none=True)
    return [f"{SETTING_KEYS[name]}={json.dumps(value)}" for name, value in values.items()]


def preset_path(config: str) -> Path:
    """A preset name ('demo') or a YAML path; relative paths are read from the project folder."""
    path = Path(config).expanduser()
    if not path.suffix and not path.exists() and (PROJECT / "configs" / f"{config}.yaml").is_file():
        return PROJECT / "configs" / f"{config}.yaml"
    return path if path.is_absolute() else PROJECT / path


def build_config(
    config: str, storage: str | None, settings: Settings | dict | None, overrides: list[str] | None
) -> Config:
    """The run's config: preset, then the settings form, then free-form overrides (which win)."""
    return load_config(
        preset_path(config),
        settings_overrides(settings) + list(overrides or []),
        storage or os.environ.get(STORAGE_ENV) or None,
    )


def publish_summary(result: dict[str, Any], title: str) -> None:
    """A `run-summary` table artifact: every step, computed or cached, its time, rows and output."""
    from prefect.artifacts import create_table_artifact

    rows = []
    for step, s in result["steps"].items():
        metrics = s.get("metrics") or {}
        generated, reused = metrics.get("rows_generated", ""), metrics.get("rows_reused", "")
        if (
            s["cached"] and generated != ""
        ):  # the metrics are from the run that computed it; this one made nothing
            generated, reused = 0, s["rows"]
        rows.append(
            {
                "step": step,
                "status": "cached" if s["cached"] else "computed",
                "seconds": s["seconds"],
                "rows": s["rows"],
                # rows this run generated (steps that reuse rows of earlier runs)
                "rows_generated": generated,
                "rows_reused": reused,
                "fingerprint": s["fingerprint"],
                "output": s["path"],
            }
        )
    create_table_artifact(
        key="run-summary",
        table=rows,
        description=f"{title}: steps of this run; run record {result['run_record']}",
    )


def release_crashed_steps() -> None:
    """On a rescheduled run, close what the killed process left open: its unfinished steps.

    A process killed mid-step cannot report: its task run stays Running in the UI and keeps its
    `gpu` slot until the slot's lease expires (about a minute). This marks such task runs Crashed
    and frees their slots, so the resumed run starts its next GPU step at once.
    """
    from prefect.runtime import flow_run

    if int(flow_run.run_count or 1) <= 1:
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from tasks.common import logger

    try:
        with get_client(sync_client=True) as client:
            open_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                task_run_filter=TaskRunFilter(
                    state=TaskRunFilterState(
                        type=TaskRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
                    )
                ),
            )
            for tr in open_runs:
                if tr.tags:
                    client.decrement_v1_concurrency_slots(
                        names=list(tr.tags), task_run_id=tr.id, occupancy_seconds=0
                    )
                client.set_task_run_state(
                    tr.id,
                    Crashed(
                        message="its process was killed; the rescheduled run "
                        "resumes from the last finished step"
                    ),
                    force=True,
                )
                logger().info("closed %s left open by the crashed attempt", tr.name)
    except Exception as exc:  # noqa: BLE001 - bookkeeping only: never fail the run for it
        logger().warning("could not close the task runs of the crashed attempt: %s", exc)


def _pipeline(cfg: Config, until: str) -> dict[str, Any]:
    from flows.constitutional_ai import run_pipeline

    release_crashed_steps()
    return run_pipeline(cfg, until)


@flow(name="constitutional-ai", log_prints=False)
def constitutional_ai(
    config: str = "configs/demo.yaml",
    storage: str | None = None,
    settings: Settings = Settings(),
    overrides: list[str] | None = None,
    until: Step = "evaluate",
) -> dict[str, Any]:
    """The whole Constitutional AI pipeline on a preset: prompts, critique-revision, SFT, preferences,
    reward model, RL, evaluation. Finished steps are served from the artifact store.

    Args:
        config: The preset: a YAML file (configs/tiny.yaml for a seconds-long smoke run on a random model,
            configs/demo.yaml for the CPU default, configs/7b-qlora.yaml for a GPU box) or a preset name.
        storage: Artifact root folder. Empty: the worker's storage root (the one `make ui` was given),
            else the preset's run.storage.
        settings: Optional overrides of the preset's main settings; empty fields keep the preset's values.
        overrides: More overrides as config.key=value (YAML values), e.g. generation.batch_size=8;
            they win over the settings above.
        until: Stop after this step (evaluate: the whole pipeline).
    """
    result = _pipeline(build_config(config, storage, settings, overrides), until)
    publish_summary(result, "constitutional-ai")
    return result


@flow(name="regenerate", log_prints=False)
def regenerate(
    config: str = "configs/demo.yaml",
    storage: str | None = None,
    settings: Settings = Settings(),
    overrides: list[str] | None = None,
    until: RegenerateStep = "preferences",
) -> dict[str, Any]:
    """Nightly regeneration: re-read the prompt sources and rebuild the SL-CAI data and the AI-feedback
    preferences. Unchanged prompts cost nothing: their rows are reused; only new or changed prompts are
    generated, and the SFT model that preferences need is retrained only when its data changed.

    Args:
        config: The preset whose prompt sources are re-read (see constitutional-ai).
        storage: Artifact root folder. Empty: the worker's storage root, else the preset's run.storage.
        settings: Optional overrides of the preset's main settings; empty fields keep the preset's values.
        overrides: More overrides as config.key=value (YAML values); they win over the settings above.
        until: Last step to bring up to date: preferences by default; reward_model, rl or evaluate also
            retrain on the new data.
    """
    result = _pipeline(build_config(config, storage, settings, overrides), until)
    publish_summary(result, "regenerate")
    return result


def missing_before_evaluate(cfg: Config) -> list[str]:
    """The steps before evaluate whose artifacts the store does not hold for this config."""
    from caiflow.plan import plan_for
    from caiflow.store import Store

    store = Store(cfg.run.storage)
    plan = plan_for(cfg).plan
    # the evaluation steps themselves (baseline, evaluate) are cheap next to training: not "missing"
    trained = [s for s in STEPS if s not in ("baseline", "evaluate")]
    return [s for s in trained if not store.is_complete(s, plan.fingerprints[s])]


@flow(name="evaluate", log_prints=False)
def evaluate(
    config: str = "configs/demo.yaml",
    storage: str | None = None,
    settings: Settings = Settings(),
    overrides: list[str] | None = None,
    train_missing: bool = False,
) -> dict[str, Any]:
    """Evaluate the base, SL and RL models of a preset: held-out prompts answered by each stage,
    refusal and over-refusal with intervals and paired differences, the judge measured on calibration
    pairs and then its win rates, reward-model scores, Elo, pictures and a report.

    Args:
        config: The preset a constitutional-ai run trained (same settings, so the same artifacts).
        storage: Artifact root folder. Empty: the worker's storage root, else the preset's run.storage.
        settings: The settings the models were trained with; judge may differ (it only changes evaluation).
        overrides: More overrides as config.key=value, e.g. evaluate.bootstrap=500.
        train_missing: Train what is missing first. Off: a run whose models are not trained yet stops
            with the list of missing steps instead of starting a long training.
    """
    cfg = build_config(config, storage, settings, overrides)
    if not train_missing:
        missing = missing_before_evaluate(cfg)
        if missing:
            raise RuntimeError(
                f"no trained artifacts for this config: {', '.join(missing)} missing "
                f"under {cfg.run.storage}. "
                "Run the constitutional-ai deployment with the same preset and settings first, "
                "or set train_missing to train them now."
            )
    result = _pipeline(cfg, "evaluate")
    publish_summary(result, "evaluate")
    return result


@flow(name="compare", log_prints=False)
def compare(
    config: str = "configs/demo.yaml",
    storage: str | None = None,
    settings: Settings = Settings(),
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The inverted-constitution control: the preset with its constitution and with the inverted one,
    each through evaluate (sharing the prompts and the base model's answers), then a side-by-side
    report (`compare-report`): refusal and over-refusal of base, constitution-trained and
    inverted-trained stages on the same prompts, and the difference between the two arms.

    Args:
        config: The preset (see constitutional-ai); its constitution.invert is set for each arm.
        storage: Artifact root folder. Empty: the worker's storage root, else the preset's run.storage.
        settings: Optional overrides of the preset's main settings (invert_constitution is ignored).
        overrides: More overrides as config.key=value (YAML values); they win over the settings above.
    """
    from flows.constitutional_ai import run_compare

    release_crashed_steps()
    result = run_compare(build_config(config, storage, settings, overrides))
    for arm, arm_result in result["arms"].items():
        publish_summary(arm_result, f"compare ({arm} arm)")
    return result
