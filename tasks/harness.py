"""One harness for every step: lock -> upstream refs -> run -> finalise manifest -> publish artifacts.

A step module (`tasks/<step>.py`) holds only its logic: a plain function ``run(ctx) -> StepOutput``
that reads its inputs through the context and says what it made. This module does the rest,
once for all steps:

- ``run_step``: the step without Prefect. It takes the artifact's lock (concurrent runs of one
  fingerprint compute it once), returns the finished artifact when the store has it, runs the
  logic, writes the manifest last, cleans the work folder and publishes the UI artifacts.
- ``step_task``: the one Prefect task around it, named after the step in the UI, cached on the
  artifact fingerprint and retried on out-of-memory only (each retry with a smaller batch).
- ``call_step``: what the flow calls; a cache hit only when the store's artifact checks out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from caiflow.config import Config
from caiflow.constitution import Constitution
from caiflow.faults import fail_attempt, free_accelerator_memory, is_out_of_memory
from caiflow.models import ResolvedModel
from caiflow.pipeline import spec
from caiflow.store import ArtifactRef, Store
from tasks.common import attempt, logger, publish_markdown, publish_table

# How many times Prefect re-runs a step that ran out of memory (each with a smaller batch).
OOM_RETRIES = 2


@dataclass
class StepContext:
    """What a step's logic gets: the run's settings, its own artifact's place, its inputs' artifacts."""

    step: str
    cfg: Config
    constitution: Constitution
    model: ResolvedModel
    store: Store
    fingerprint: str
    upstream: dict[str, ArtifactRef]
    log: logging.Logger

    @property
    def artifact_dir(self) -> Path:
        return self.store.artifact_dir(self.step, self.fingerprint)

    def work_dir(self) -> Path:
        """Checkpoints and scratch (removed once the manifest is written)."""
        return self.store.work_dir(self.step, self.fingerprint)

    def read(self, step: str) -> pd.DataFrame:
        """An input step's data table."""
        return self.store.read_table(self.upstream[step])


@dataclass
class StepOutput:
    """What a step made: the manifest's row count, metrics and params, and what the UI shows."""

    rows: int
    metrics: dict[str, Any]
    params: dict[str, Any]
    # (key, table, description[, max_rows]): Prefect table artifacts previewing the output
    tables: list[tuple[Any, ...]] = field(default_factory=list)
    # (key, markdown, description): Prefect markdown artifacts (reports, examples)
    markdown: list[tuple[str, str, str]] = field(default_factory=list)


def step_logic(step: str) -> Callable[[StepContext], StepOutput]:
    """The `run` function of `tasks/<step>.py`."""
    return importlib.import_module(f"tasks.{spec(step).name}").run


def run_step(
    step: str,
    cfg: Config,
    constitution: Constitution,
    model: ResolvedModel,
    storage: str,
    fingerprint: str,
    upstream: dict[str, ArtifactRef],
    recipe: dict[str, Any] | None = None,
) -> ArtifactRef:
    """One step, callable without Prefect: the finished artifact's reference (`reused` when found done).

    `recipe` (the plan's parts of this fingerprint) goes into the manifest for `caiflow status`.
    """
    store = Store(storage)
    log = logger()
    with store.lock(
        step,
        fingerprint,
        on_wait=lambda: log.info("%s/%s is being computed by another run: waiting for it", step, fingerprint),
    ):
        done = store.load_ref(step, fingerprint)
        if done is not None:
            return dataclasses.replace(done, reused=True)
        fail_attempt(step, attempt())
        check_memory(step, cfg, model, log)
        ctx = StepContext(step, cfg, constitution, model, store, fingerprint, dict(upstream), log)
        out = step_logic(step)(ctx)
        metrics = {**out.metrics, "task_attempt": attempt()}
        ref = store.finalize(
            step,
            fingerprint,
            rows=out.rows,
            metrics=metrics,
            inputs={name: r.fingerprint for name, r in upstream.items()},
            params=out.params,
            recipe=recipe,
        )
        store.clean_work(step, fingerprint)  # checkpoints are only a resume point; the manifest is written
    for table in out.tables:
        publish_table(*table)
    for key, md, description in out.markdown:
        publish_markdown(key, md, description)
    log.info("%s: %s", step, scalar_metrics(metrics))
    return ref


def check_memory(step: str, cfg: Config, model: ResolvedModel, log: logging.Logger) -> None:
    """Stop before a GPU step whose memory plan exceeds the visible GPU memory (MemoryPlanError,
    one line naming the setting). Only with a GPU (or $CAIFLOW_GPU_MEMORY_GIB); on CPU nothing is checked."""
    from caiflow.memory import GIB
    from caiflow.memory_check import check_step, visible_gpu_bytes
    from caiflow.plan import memory_shapes

    visible = visible_gpu_bytes()
    if visible is None or not spec(step).gpu:
        return
    planned = check_step(step, cfg.model_dump(), memory_shapes(cfg, model), visible)
    log.info("%s: memory plan ~%.1f GiB of %.1f GiB visible", step, planned.peak / GIB, visible / GIB)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics (lists and tables stay in the manifest)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


# ---------------------------------------------------------------- Prefect


def fingerprint_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key = step + fingerprint + storage root.

    The flow calls a step with `refresh_cache=True` when the store says its artifact is not
    complete (never built, deleted or corrupt), so a cache record never outlives its artifact.
    """
    step, fp, root = parameters["step"], parameters["fingerprint"], parameters["storage"]
    where = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    return f"caiflow-{step}-{fp}-{where}"


def retry_on_oom(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a step only when it ran out of memory; never on ordinary bugs (plain function for 3.8)."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the failed state's exception
        if is_out_of_memory(exc):
            free_accelerator_memory()
            return True
        return False
    return False


@task(
    name="step",
    cache_key_fn=fingerprint_cache_key,
    persist_result=True,
    retries=OOM_RETRIES,
    retry_delay_seconds=5,
    retry_condition_fn=retry_on_oom,
)
def step_task(
    step: str,
    cfg: Config,
    constitution: Constitution,
    model: ResolvedModel,
    storage: str,
    fingerprint: str,
    upstream: dict[str, ArtifactRef],
    recipe: dict[str, Any] | None = None,
) -> ArtifactRef:
    """A pipeline step as a Prefect task; `call_step` names it after the step."""
    return run_step(step, cfg, constitution, model, storage, fingerprint, upstream, recipe)


def trusted(store: Store, step: str, fingerprint: str) -> bool:
    """The artifact is finished and matches its manifest; a corrupt one is moved aside to be rebuilt."""
    if store.manifest(step, fingerprint) is None:
        return False
    problems = store.verify(step, fingerprint)
    if problems:
        moved = store.quarantine(step, fingerprint)
        logger().warning(
            "%s/%s does not match its manifest (%s): moved to %s and recomputing",
            step,
            fingerprint,
            "; ".join(problems[:3]),
            moved,
        )
        return False
    return True


def call_step(store: Store, step: str, fingerprint: str, **kwargs: Any) -> Any:
    """Run a step's task and return its final state; a cache hit only if the artifact checks out."""
    fresh = not trusted(store, step, fingerprint)
    options = task_options(step)
    return step_task.with_options(refresh_cache=fresh, **options)(
        step=step, storage=str(store.root), fingerprint=fingerprint, return_state=True, **kwargs
    )


def task_options(step: str) -> dict[str, Any]:
    """The per-step options of `step_task`: the UI name, and the `gpu` tag for model steps."""
    return {"name": step, "tags": ["gpu"] if spec(step).gpu else []}
