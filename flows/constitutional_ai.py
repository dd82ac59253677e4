"""The `constitutional-ai` flow: every step as a cached task, chained by artifact references.

It runs without a Prefect server (Prefect starts a temporary one) and, unchanged, as a
deployment on a worker. Fingerprints are planned up front from the config, so a step whose
artifact is complete shows as Cached and does no work. The steps, their inputs and their order
come from `caiflow.pipeline`.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any

from prefect import flow

from caiflow import schemas
from caiflow.config import Config, load_config
from caiflow.environment import environment
from caiflow.faults import kill_point
from caiflow.pipeline import steps_until
from caiflow.plan import plan_for
from caiflow.ray_pool import check_reachable
from caiflow.roles import check_endpoints
from caiflow.store import Store
from tasks.common import logger
from tasks.harness import call_step


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
    steps = steps_until(until)
    log = logger()
    started = datetime.now(timezone.utc).isoformat()
    store = Store(cfg.run.storage)
    t0 = time.monotonic()
    if cfg.generation.executor.kind == "ray":  # an unreachable cluster stops the run before any step
        check_reachable(cfg.generation.executor.address)
    check_endpoints(cfg)  # every role's server answers and serves its model, before any step
    resolved = plan_for(cfg)
    model, constitution, plan = resolved.model, resolved.constitution, resolved.plan
    log.info("model %s ready in %.1f s at %s", model.identity, time.monotonic() - t0, model.path)
    summary: dict[str, Any] = {}
    refs: dict[str, Any] = {}
    for step in steps:
        t = time.monotonic()
        state = call_step(
            store,
            step.name,
            plan.fingerprints[step.name],
            cfg=cfg,
            constitution=constitution,
            model=model,
            upstream={name: refs[name] for name in step.inputs},
            recipe=plan.parts[step.name],
        )
        ref = refs[step.name] = state.result()
        summary[step.name] = {
            "fingerprint": ref.fingerprint,
            "path": ref.path,
            "rows": ref.rows,
            "cached": state.name == "Cached" or ref.reused,
            "seconds": round(time.monotonic() - t, 1),
            "metrics": ref.metrics,
        }
        kill_point(f"after:{step.name}")

    run_id = _run_id()
    path = store.write_run_record(
        run_id,
        {
            "run_id": run_id,
            "name": cfg.run.name,
            "started": started,
            "finished": datetime.now(timezone.utc).isoformat(),
            "config": cfg.model_dump(mode="json"),
            "constitution": {
                "name": constitution.name,
                "version": constitution.version,
                "hash": constitution.content_hash,
                "inverted": constitution.inverted,
            },
            "model": model.identity,
            "environment": environment(),
            "steps": {k: {kk: vv for kk, vv in v.items() if kk != "metrics"} for k, v in summary.items()},
        },
    )
    log.info("run record: %s", path)
    return {"run_id": run_id, "run_record": str(path), "steps": summary}


def run_compare(cfg: Config) -> dict[str, Any]:
    """The constitution and its inversion, each through evaluate (sharing the prompts and the base
    answers), then one side-by-side report: a `compare` artifact and a run record naming it."""
    from caiflow.compare import ARMS, compare_arms, compare_rows, render_compare
    from caiflow.store import fingerprint
    from tasks.common import publish_markdown, publish_table

    log = logger()
    arms: dict[str, Config] = {}
    for arm, inverted in zip(ARMS, (False, True)):
        arms[arm] = cfg.model_copy(deep=True)
        arms[arm].constitution.invert = inverted
    results = {}
    for arm, arm_cfg in arms.items():
        log.info("compare: the %s arm", arm)
        results[arm] = run_pipeline(arm_cfg, "evaluate")
    store = Store(cfg.run.storage)
    evaluations = {arm: results[arm]["steps"]["evaluate"] for arm in ARMS}
    fp = fingerprint(
        "compare",
        1,
        arms={arm: e["fingerprint"] for arm, e in evaluations.items()},
    )
    answers = {arm: store.read_table(e["path"]) for arm, e in evaluations.items()}
    metrics = compare_arms(
        answers,
        {arm: e["metrics"]["trained_by"]["rl"] for arm, e in evaluations.items()},
    )
    report = render_compare(metrics)
    ref = store.load_ref("compare", fp)
    if ref is None:
        with store.lock("compare", fp):
            table = compare_rows(answers)
            store.write_table("compare", fp, table, schemas.COMPARE)
            (store.artifact_dir("compare", fp) / "report.md").write_text(report, encoding="utf-8")
            ref = store.finalize(
                "compare",
                fp,
                rows=len(table),
                metrics=metrics,
                inputs={f"{arm}/evaluate": e["fingerprint"] for arm, e in evaluations.items()},
                params={"arms": list(ARMS)},
            )
        publish_table("compare-answers", compare_rows(answers), "Both arms' answers and refusal flags")
    publish_markdown("compare-report", report, "Constitution vs inverted control, side by side")
    run_id = _run_id() + "-compare"
    record = store.write_run_record(
        run_id,
        {
            "run_id": run_id,
            "name": cfg.run.name,
            "finished": datetime.now(timezone.utc).isoformat(),
            "arms": {arm: r["run_record"] for arm, r in results.items()},
            "steps": {"compare": {"fingerprint": fp, "path": ref.path, "rows": ref.rows}},
            "environment": environment(),
        },
    )
    return {
        "arms": results,
        "compare": {"fingerprint": fp, "path": ref.path, "metrics": metrics},
        "run_record": str(record),
    }


@flow(name="constitutional-ai", log_prints=False)
def constitutional_ai(
    config: str = "configs/demo.yaml",
    overrides: list[str] | None = None,
    storage: str | None = None,
    until: str = "evaluate",
) -> dict[str, Any]:
    """The whole Constitutional AI pipeline on a preset (`config`), with `--set`-style overrides."""
    return run_pipeline(load_config(config, overrides or [], storage), until)


@flow(name="compare", log_prints=False)
def compare(
    config: str = "configs/demo.yaml", overrides: list[str] | None = None, storage: str | None = None
) -> dict[str, Any]:
    """A constitution and its inverted control on a preset, side by side."""
    return run_compare(load_config(config, overrides or [], storage))
