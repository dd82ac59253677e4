"""What steps use to talk to the Prefect UI: the run logger, the attempt number, artifacts, progress.

Outside a Prefect run (a step called as a plain function, a test) the artifact functions do
nothing and the logger is the module logger, so step logic runs the same with or without Prefect.
The harness around the steps (locking, caching, retries): `tasks.harness`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd


def logger() -> logging.Logger:
    """Prefect's run logger inside a run (shown in the UI), the module logger outside."""
    try:
        from prefect import get_run_logger

        return get_run_logger()  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - no run context: plain call
        return logging.getLogger("caiflow")


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


def publish_table(
    key: str, df: pd.DataFrame, description: str, max_rows: int = 20, max_chars: int = 200
) -> None:
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
            if rate > 0:
                tail = f"{rate:.2f}/s, about {(self.total - done) / rate:.0f} s left"
            else:  # nothing done yet: no rate to tell the time left by
                tail = "starting"
            self.log.info("%s: %d/%d (%.0f%%), %s", self.what, done, self.total, pct, tail)
            self._last = now


def markdown_stats(title: str, stats: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in stats.items())
    return f"## {title}\n\n| metric | value |\n|---|---|\n{rows}\n"
