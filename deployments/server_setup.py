"""What `make ui` sets up on the Prefect server, through its API: the `gpu` work pool and tag
limit, the automation that reschedules crashed runs, and the deployments' default preset.

Idempotent: running it again updates what exists.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

POOL = "gpu"  # the work pool, and the task tag of every model step
PROJECT_TAG = "caiflow"  # on every deployment of deployments/prefect.yaml
AUTOMATION = "caiflow-reschedule-crashed-runs"
# flow name / deployment name of each deployment in deployments/prefect.yaml
DEPLOYMENTS = [
    "constitutional-ai/constitutional-ai",
    "regenerate/regenerate",
    "evaluate/evaluate",
    "compare/compare",
]


# How long the automation waits after a crash before rescheduling. Prefect 3.8's process worker
# reports a killed run as Crashed twice, a few seconds apart; rescheduling at once lets the late
# report land on the rescheduled run (seen here: two processes ran one flow run). After this wait
# the run is still Crashed when the late report comes, so the server refuses it.
RESCHEDULE_AFTER = timedelta(seconds=30)


def crash_automation(max_reschedules: int) -> Any:
    """Reschedule a crashed caiflow run, at most `max_reschedules` times.

    The trigger starts on `prefect.flow-run.Crashed` (a worker reports that when a flow run's
    process dies: killed, out of memory, the machine rebooted) for runs tagged `caiflow` whose
    run count is 1..max_reschedules; the run count goes up each time a run starts, so the cap
    needs no bookkeeping. If nothing else happens to that run within RESCHEDULE_AFTER (nobody
    retried or cancelled it by hand), the action moves the same flow run back to Scheduled: the
    worker picks it up again and, since every finished step's artifact is in the store, it
    resumes after the last good step (a generation step also keeps its finished shards). A run
    that never started (run count 0: bad code or environment) is left Crashed.
    """
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=AUTOMATION,
        description=(
            f"Reschedule a crashed caiflow run (at most {max_reschedules} times, "
            f"{RESCHEDULE_AFTER.seconds} s after the crash); it resumes from the last good step. "
            "Created by `make ui` (deployments/ui.py)."
        ),
        enabled=True,
        trigger=EventTrigger(
            after={"prefect.flow-run.Crashed"},
            expect={"prefect.flow-run.*"},  # any later state change of that run: someone else handled it
            for_each={"prefect.resource.id"},  # each flow run on its own
            match={
                "prefect.resource.id": "prefect.flow-run.*",
                "prefect.run-count": [str(n) for n in range(1, max_reschedules + 1)],
            },
            match_related={
                "prefect.resource.role": "tag",
                "prefect.resource.id": f"prefect.tag.{PROJECT_TAG}",
            },
            posture=Posture.Proactive,
            threshold=1,
            within=RESCHEDULE_AFTER,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED,
                name="Rescheduled",
                message="Rescheduled after a crash by the caiflow automation",
            )
        ],
    )


async def configure(max_reschedules: int, slots: int) -> None:
    """Work pool, tag concurrency limit and crash automation; idempotent (updates what exists)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    async with get_client() as client:
        try:
            await client.read_work_pool(POOL)
            await client.update_work_pool(POOL, WorkPoolUpdate(concurrency_limit=slots))
        except ObjectNotFound:
            await client.create_work_pool(
                WorkPoolCreate(
                    name=POOL,
                    type="process",
                    concurrency_limit=slots,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="caiflow runs, one per GPU (one at a time on a CPU-only machine).",
                )
            )
        # Task-level: every model step is tagged `gpu`; this many may run at once across all runs.
        await client.create_concurrency_limit(tag=POOL, concurrency_limit=slots)
        for old in await client.read_automations_by_name(AUTOMATION):
            await client.delete_automation(old.id)
        if max_reschedules > 0:
            await client.create_automation(crash_automation(max_reschedules))


async def set_default_preset(preset: str) -> None:
    """Make `preset` the default `config` of every deployment (what a Quick run uses)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    async with get_client() as client:
        for name in DEPLOYMENTS:
            dep = await client.read_deployment_by_name(name)
            await client.update_deployment(
                dep.id, DeploymentUpdate(parameters={**dep.parameters, "config": preset})
            )
