"""What every step's Prefect task shares: cache keys, OOM-only retries, UI artifacts, logging.

A step's logic is a plain function (callable without a Prefect server); the @task around it
adds caching keyed on the artifact fingerprint, retries on out-of-memory only, and artifacts
for the UI. The store's manifest stays the truth: a cache key is only offered when the
artifact is complete, so a deleted or corrupt artifact is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from caiflow.faults import fail_attempt
from caiflow.generation import free_accelerator_memory, is_out_of_memory
from caiflow.store import Store

# How many times Prefect re-runs a step that ran out of memory (each with a smaller batch).
OOM_RETRIES = 2


def logger() -> logging.Logger:
    """Prefect's run logger inside a run (shown in the UI), the module logger outside."""
    try:
        from prefect import get_run_logger

        return get_run_logger()  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - no run context: plain call
        return logging.getLogger("caiflow")


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


def attempt() -> int:
    """Which Prefect attempt of the current task this is (1 outside a task run)."""
    try:
        from prefect.runtime import task_run

        return max(int(task_run.run_count or 1), 1)
    except Exception:  # noqa: BLE001 - plain call
        return 1


def retry_scaled(batch_size: int) -> int:
    """The batch size for this attempt: halved for each Prefect retry after an out-of-memory."""
    return max(1, batch_size // 2 ** (attempt() - 1))


def _in_run() -> bool:
    try:
        from prefect.context import TaskRunContext

        return TaskRunContext.get() is not None
    except Exception:  # noqa: BLE001
        return False


def publish_table(key: str, df: pd.DataFrame, description: str, max_rows: int = 20, max_chars: int = 200) -> None:
    """A preview of a Parquet output as a Prefect table artifact (inside a run only)."""
    if not _in_run():
        return
    from prefect.artifacts import create_table_artifact

    preview = df.head(max_rows).copy()
    for col in preview.columns:
        preview[col] = preview[col].map(lambda v: _short(v, max_chars))
    create_table_artifact(key=key, table=preview.to_dict(orient="records"), description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    if not _in_run():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key, markdown=markdown, description=description)


def _short(value: Any, n: int) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return text if len(text) <= n else text[: n - 1] + "…"


class Progress:
    """Progress of long work: a Prefect progress artifact in a run, rate-limited log lines always."""

    def __init__(self, key: str, total: int, what: str, log_every: float = 10.0):
        self.total, self.what, self.log_every = max(total, 1), what, log_every
        self.start = self._last = time.monotonic()
        self.log = logger()
        self.artifact_id = None
        if _in_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(progress=0.0, key=key, description=what)

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        pct = 100.0 * min(done, self.total) / self.total
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, progress=pct)
        if force or now - self._last >= self.log_every:
            rate = done / max(now - self.start, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else float("nan")
            self.log.info("%s: %d/%d (%.0f%%), %.2f/s, about %.0f s left", self.what, done, self.total, pct, rate, eta)
            self._last = now


@contextmanager
def timed(what: str):
    log = logger()
    t0 = time.monotonic()
    yield
    log.info("%s took %.1f s", what, time.monotonic() - t0)


def task_options(name: str, tags: list[str] | None = None) -> dict[str, Any]:
    """The @task options every step shares."""
    return dict(
        name=name,
        cache_key_fn=fingerprint_cache_key,
        persist_result=True,
        retries=OOM_RETRIES,
        retry_delay_seconds=5,
        retry_condition_fn=retry_on_oom,
        tags=tags or [],
    )


def markdown_stats(title: str, stats: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in stats.items())
    return f"## {title}\n\n| metric | value |\n|---|---|\n{rows}\n"


def trusted(store: Store, step: str, fingerprint: str) -> bool:
    """The artifact is finished and matches its manifest; a corrupt one is moved aside to be rebuilt."""
    if store.manifest(step, fingerprint) is None:
        return False
    problems = store.verify(step, fingerprint)
    if problems:
        moved = store.quarantine(step, fingerprint)
        logger().warning("%s/%s does not match its manifest (%s): moved to %s and recomputing", step, fingerprint,
                         "; ".join(problems[:3]), moved)
        return False
    return True


def call_step(task: Any, store: Store, step: str, fingerprint: str, **kwargs: Any) -> Any:
    """Run a step's task and return its final state; a cache hit only if the artifact checks out."""
    fresh = not trusted(store, step, fingerprint)
    return task.with_options(refresh_cache=fresh)(
        storage=str(store.root), step=step, fingerprint=fingerprint, return_state=True, **kwargs)


def locked(step: str) -> Callable:
    """Wrap a step's logic so concurrent runs of one fingerprint compute it once.

    The first run takes the lock and computes; another run of the same config waits, then finds
    the finished artifact and returns it (each step function starts with `store.load_ref`).
    """
    import functools

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(cfg: Any, constitution: Any, model: Any, storage: str, fingerprint: str, *args: Any,
                  **kwargs: Any) -> Any:
            import dataclasses

            store = Store(storage)
            with store.lock(step, fingerprint, on_wait=lambda: logger().info(
                    "%s/%s is being computed by another run: waiting for it", step, fingerprint)):
                done = store.load_ref(step, fingerprint)
                if done is not None:
                    return dataclasses.replace(done, reused=True)
                fail_attempt(step, attempt())
                return fn(cfg, constitution, model, storage, fingerprint, *args, **kwargs)

        return inner

    return wrap


Callback = Callable[[int], None]


def policy_engine(stage: str, cfg: Any, model: Any, store: Store, refs: dict[str, Any], batch_size: int) -> Any:
    """A GenerationEngine for a pipeline stage: 'base', 'sl' (the sft artifact) or 'rl' (the rl artifact)."""
    from caiflow.generation import GenerationEngine
    from caiflow.models import load_model_and_tokenizer
    from caiflow.training.sft import load_policy

    if stage == "base":
        m, tok = load_model_and_tokenizer(model, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)
    else:
        step = {"sl": "sft", "rl": "rl"}[stage]
        folder = Path(refs[step].path) / "model"
        m, tok = load_policy(folder, base_model_path=model.path, device=cfg.model.device, dtype=cfg.model.dtype)
    return GenerationEngine(m, tok, batch_size=batch_size)


def choice_scorer(who: str, endpoint: Any, cfg: Any, model: Any, store: Store, refs: dict[str, Any],
                  batch_size: int, engines: dict[str, Any] | None = None) -> Any:
    """What scores "(A)" vs "(B)": a local stage's engine ('base', 'sl') or an OpenAI-compatible endpoint."""
    if who == "openai":
        from caiflow.feedback import EndpointChoiceScorer

        return EndpointChoiceScorer(endpoint)
    if engines is not None and who in engines:
        return engines[who]
    return policy_engine(who, cfg, model, store, refs, batch_size)
