"""The `constitutional-ai` flow: every step as a cached task, chained by artifact references.

It runs without a Prefect server (Prefect starts a temporary one) and, unchanged, as a
deployment on a worker. Fingerprints are planned up front from the config, so a step whose
artifact is complete shows as Cached and does no work.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any

from prefect import flow

from caiflow.config import Config, load_config
from caiflow.constitution import load_constitution
from caiflow.faults import kill_point
from caiflow.models import resolve_model
from caiflow.plan import STEPS, make_plan
from caiflow.store import Store
from tasks.common import call_step, logger
from tasks.critique_revision import critique_revision_task
from tasks.evaluate import evaluate_task
from tasks.preferences import preferences_task
from tasks.prompts import prompts_task
from tasks.reward_model import backbone, reward_model_task
from tasks.rl import rl_task
from tasks.sft import sft_task


def _run_id() -> str:
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            return str(flow_run.id)
    except Exception:  # noqa: BLE001 - outside a flow run
        pass
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_pipeline(cfg: Config, until: str = "evaluate") -> dict[str, Any]:
    """Run (or find cached) every step up to and including `until`; return a summary per step."""
    if until not in STEPS:
        raise ValueError(f"unknown step '{until}': choose one of {', '.join(STEPS)}")
    log = logger()
    started = datetime.now(timezone.utc).isoformat()
    store = Store(cfg.run.storage)
    storage = str(store.root)
    constitution = load_constitution(cfg.constitution_path(), cfg.constitution.invert, cfg.constitution.principles)
    t0 = time.monotonic()
    model = resolve_model(cfg.model.name, storage, cfg.model.revision, cfg.model.tiny.model_dump())
    log.info("model %s ready in %.1f s at %s", model.identity, time.monotonic() - t0, model.path)
    rm_backbone = backbone(cfg, model, storage).identity if cfg.reward_model.backbone else None
    plan = make_plan(cfg, constitution.content_hash, model.identity, rm_backbone)
    summary: dict[str, Any] = {}

    def record(step: str, state, seconds: float):
        ref = state.result()
        summary[step] = {"fingerprint": ref.fingerprint, "path": ref.path, "rows": ref.rows,
                         "cached": state.name == "Cached" or ref.reused, "seconds": round(seconds, 1),
                         "metrics": ref.metrics}
        return ref

    class _Stop(Exception):
        pass

    def step(name: str, task, **kwargs):
        if STEPS.index(name) > STEPS.index(until):
            raise _Stop
        t = time.monotonic()
        state = call_step(task, store, name, plan.fingerprints[name], cfg=cfg, constitution=constitution,
                          model=model, inputs=plan.inputs[name], **kwargs)
        ref = record(name, state, time.monotonic() - t)
        kill_point(f"after:{name}")
        return ref

    try:
        prompts_ref = step("prompts", prompts_task)
        sl_data = step("critique_revision", critique_revision_task, prompts_ref=prompts_ref)
        sft_ref = step("sft", sft_task, sl_ref=sl_data)
        prefs = step("preferences", preferences_task, prompts_ref=prompts_ref, sft_ref=sft_ref)
        reward_ref = step("reward_model", reward_model_task, preferences_ref=prefs)
        rl_ref = step("rl", rl_task, prompts_ref=prompts_ref, sft_ref=sft_ref, reward_ref=reward_ref)
        step("evaluate", evaluate_task, prompts_ref=prompts_ref, sft_ref=sft_ref, reward_ref=reward_ref,
             rl_ref=rl_ref)
    except _Stop:
        pass

    run_id = _run_id()
    path = store.write_run_record(run_id, {
        "run_id": run_id,
        "name": cfg.run.name,
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(),
        "config": cfg.model_dump(mode="json"),
        "constitution": {"name": constitution.name, "version": constitution.version,
                         "hash": constitution.content_hash, "inverted": constitution.inverted},
        "model": model.identity,
        "steps": {k: {kk: vv for kk, vv in v.items() if kk != "metrics"} for k, v in summary.items()},
    })
    log.info("run record: %s", path)
    return {"run_id": run_id, "run_record": str(path), "steps": summary}


@flow(name="constitutional-ai", log_prints=False)
def constitutional_ai(config: str = "configs/demo.yaml", overrides: list[str] | None = None,
                      storage: str | None = None, until: str = "evaluate") -> dict[str, Any]:
    """The whole Constitutional AI pipeline on a preset (`config`), with `--set`-style overrides."""
    return run_pipeline(load_config(config, overrides or [], storage), until)
