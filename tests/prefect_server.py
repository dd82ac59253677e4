"""One real Prefect server for the test session, with what `make ui` puts on it.

A pytest plugin: the test modules that need it name it in `pytest_plugins`, so they share one
session-scoped `prefect_stack` (the server takes about 20 s to start on two cores). The stack
is `deployments.ui.Stack`, the code behind `make ui`: `prefect server start` on a free 127.0.0.1 port
with PREFECT_HOME and its SQLite database in a temporary folder, the `gpu` process work pool,
the tag limit, the crash automation, the deployments of deployments/prefect.yaml (their default
preset set to configs/tiny.yaml) and a worker. Everything started is stopped at teardown.
The tests' own clients reach the server through `PrefectStack.client()`; nothing changes
os.environ, so the other test modules (and their `prefect_test_harness`) are unaffected.
The tests that use the stack run one after another and the stack stops after the last of them,
so it does not idle beside the rest of the suite on a two-core machine.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from deployments.ui import Options, Stack, free_port

TINY = "configs/tiny.yaml"
TIMEZONE = "Europe/Berlin"  # not the default, so the test sees that the timezone is configurable
RUN_TIMEOUT = 900  # seconds for one tiny flow run on a busy two-core machine


class PrefectStack:
    """The running stack, and the API calls the tests make against it."""

    def __init__(self, stack: Stack, root: Path, model_store: Path):
        self.stack, self.root, self.model_store = stack, root, model_store
        self.opts = stack.opts

    @property
    def api_url(self) -> str:
        return self.opts.api_url

    @property
    def ui_url(self) -> str:
        return self.opts.ui_url

    @property
    def storage(self) -> Path:
        """The worker's default storage root (what a Quick run from the UI writes to)."""
        return self.opts.storage.resolve()

    def new_storage(self, name: str) -> Path:
        """A fresh artifact root holding the session's tiny model, so a run computes every step."""
        root = self.root / "runs" / name
        models = Path(self.model_store) / "models"
        if models.is_dir():
            shutil.copytree(models, root / "models", dirs_exist_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        return root

    @contextmanager
    def client(self) -> Iterator[Any]:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            with get_client(sync_client=True) as client:
                yield client

    def deployment(self, name: str) -> Any:
        """A deployment by its name (each flow in deployments/prefect.yaml has one of the same name)."""
        with self.client() as c:
            return c.read_deployment_by_name(f"{name}/{name}")

    def run_deployment(self, name: str, **parameters: Any) -> UUID:
        """Create a flow run of a deployment through the API; the worker picks it up."""
        dep = self.deployment(name)
        with self.client() as c:
            return c.create_flow_run_from_deployment(dep.id, parameters=parameters).id

    def flow_runs_of(self, name: str) -> list[Any]:
        """Every flow run of a deployment."""
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        dep = self.deployment(name)
        with self.client() as c:
            return c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))

    def flow_run(self, flow_run_id: UUID) -> Any:
        with self.client() as c:
            return c.read_flow_run(flow_run_id)

    def wait(
        self,
        flow_run_id: UUID,
        until: Callable[[Any], bool] | None = None,
        timeout: float = RUN_TIMEOUT,
        poll: float = 1.0,
    ) -> Any:
        """Poll a flow run until `until(flow_run)` (default: a final state); fail with its history on
        timeout."""
        until = until or (lambda fr: fr.state is not None and fr.state.is_final())
        deadline = time.monotonic() + timeout
        while True:
            fr = self.flow_run(flow_run_id)
            if until(fr):
                return fr
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"flow run {flow_run_id} still {fr.state.name if fr.state else None} after "
                    f"{timeout:.0f} s; states: {self.state_names(flow_run_id)}; worker log: "
                    f"{self.stack.log_dir / 'worker.log'}"
                )
            time.sleep(poll)

    def wait_completed(self, flow_run_id: UUID, timeout: float = RUN_TIMEOUT) -> Any:
        fr = self.wait(flow_run_id, timeout=timeout)
        assert fr.state.is_completed(), (
            f"flow run ended {fr.state.name}: {fr.state.message}; states: {self.state_names(flow_run_id)}; "
            f"worker log: {self.stack.log_dir / 'worker.log'}"
        )
        return fr

    def states(self, flow_run_id: UUID) -> list[Any]:
        with self.client() as c:
            return sorted(c.read_flow_run_states(flow_run_id), key=lambda s: s.timestamp)

    def state_names(self, flow_run_id: UUID) -> list[str]:
        return [s.name for s in self.states(flow_run_id)]

    def task_runs(self, flow_run_id: UUID) -> list[Any]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with self.client() as c:
            return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    def artifacts(self, flow_run_id: UUID) -> dict[str, Any]:
        """The run's artifacts by key (the flow's and its tasks'), read through the API."""
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with self.client() as c:
            found = c.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )
        return {a.key: a for a in found if a.key}

    def table(self, flow_run_id: UUID, key: str) -> list[dict[str, Any]]:
        data = self.artifacts(flow_run_id)[key].data
        return json.loads(data) if isinstance(data, str) else data


_running: list[Stack] = []


def _uses_stack(item: pytest.Item) -> bool:
    return "prefect_stack" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items: list[pytest.Item]) -> None:
    """Move the tests that use the stack together, where the first of them was."""
    users = [i for i in items if _uses_stack(i)]
    if users:
        first = items.index(users[0])
        others = [i for i in items if not _uses_stack(i)]
        items[:] = others[:first] + users + others[first:]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the stack after the last test that uses it (the session fixture's teardown comes later)."""
    if _uses_stack(item) and (nextitem is None or not _uses_stack(nextitem)):
        while _running:
            _running.pop().stop()


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory, model_store, tiny_model) -> Iterator[PrefectStack]:
    root = tmp_path_factory.mktemp("prefect-stack")
    storage = root / "storage"
    shutil.copytree(Path(model_store) / "models", storage / "models")  # the tiny model, built once
    opts = Options(
        storage=storage,
        port=free_port(),
        timezone=TIMEZONE,
        max_reschedules=2,
        gpus=1,
        preset=TINY,
        env={
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
            "PREFECT_LOCAL_STORAGE_PATH": str(storage / "prefect-results"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # a killed step's `gpu` slot is freed by the run that resumes; this is the fallback
            "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
        },
        worker_query_seconds=2,  # pick up new runs within 2 s instead of 10
    )
    stack = Stack(opts, log_dir=root / "logs")
    stack.start()
    _running.append(stack)
    try:
        yield PrefectStack(stack, root, Path(model_store))
    finally:
        stack.stop()
