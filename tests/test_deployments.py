"""The deployments, work pool, limits and crash automation on a real Prefect server with a worker.

Everything goes through Prefect's API, as the UI does: flow runs are created from deployments,
the worker (a `prefect worker start` subprocess) runs them as subprocesses of its own, and the
tests read states, task runs and artifacts back from the server.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

pytest_plugins = ["tests.prefect_server"]

TINY = "configs/tiny.yaml"  # the stack's default preset (tests/prefect_server.py)
STEPS = ["prompts", "critique_revision", "sft", "preferences", "reward_model", "rl", "baseline", "evaluate"]
MODEL_STEPS = {"critique_revision", "sft", "preferences", "reward_model", "rl", "baseline", "evaluate"}


# ---------------------------------------------------------------- the flows' parameters, no server


def test_settings_form_maps_to_config_overrides_and_free_overrides_win(monkeypatch, tmp_path):
    from flows.deployable import PROJECT, Settings, build_config, preset_path, settings_overrides

    settings = Settings(max_red_team=5, critique_rounds=2, rl_algorithm="grpo", invert_constitution=True)
    assert settings_overrides(settings) == [
        "prompts.max_red_team=5",
        "critique_revision.rounds=2",
        "constitution.invert=true",
        'rl.algorithm="grpo"',
    ]
    assert settings_overrides(None) == settings_overrides(Settings()) == []
    assert preset_path("tiny") == preset_path(TINY) == PROJECT / TINY

    monkeypatch.setenv("CAIFLOW_STORAGE", str(tmp_path / "worker-root"))  # what `make ui` gives its worker
    cfg = build_config("tiny", None, settings.model_dump(), ["rl.algorithm=rloo"])
    assert (cfg.prompts.max_red_team, cfg.critique_revision.rounds, cfg.constitution.invert) == (5, 2, True)
    assert cfg.rl.algorithm == "rloo"  # a free-form override wins over the form
    assert cfg.run.storage == str(tmp_path / "worker-root")
    assert build_config("tiny", str(tmp_path / "mine"), None, None).run.storage == str(tmp_path / "mine")


def test_evaluate_stops_with_the_missing_steps_instead_of_training(model_store, tiny_model, tmp_path):
    import shutil

    from flows.deployable import evaluate

    shutil.copytree(Path(model_store) / "models", tmp_path / "models")
    with pytest.raises(
        RuntimeError, match="prompts, critique_revision, sft, preferences, reward_model, rl missing"
    ):
        evaluate.fn(config=TINY, storage=str(tmp_path))


def test_one_worker_per_gpu_each_run_sees_its_own_card():
    """The workers `make ui` starts (what a run under one sees: test_pipeline_run_from_the_api_...)."""
    from deployments.workers import WorkerSetupError, worker_specs

    specs = worker_specs("gpu", "box", gpus=None, counted=4, env={})
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "1", "2", "3"]
    assert len({s.name for s in specs}) == 4
    for s in specs:  # one run at a time per worker, all on the one pool
        assert s.args[s.args.index("--limit") + 1] == "1" and s.args[s.args.index("--pool") + 1] == "gpu"
    # a machine restricted to some cards: the workers take those, in order
    restricted = worker_specs("gpu", "box", gpus=2, counted=2, env={"CUDA_VISIBLE_DEVICES": "2,5"})
    assert [s.device for s in restricted] == ["2", "5"]
    # --gpus on a machine without a GPU still hands out ids (what each run would see)
    assert [s.device for s in worker_specs("gpu", "box", gpus=2, counted=0, env={})] == ["0", "1"]
    [cpu] = worker_specs("gpu", "box", gpus=None, counted=0, env={})
    assert cpu.device is None and "CUDA_VISIBLE_DEVICES" not in cpu.env
    with pytest.raises(WorkerSetupError, match="--gpus 3 but CUDA_VISIBLE_DEVICES lists 2 device"):
        worker_specs("gpu", "box", gpus=3, counted=2, env={"CUDA_VISIBLE_DEVICES": "2,5"})


# ---------------------------------------------------------------- on the server, through the worker


def run_record(storage: Path, flow_run_id) -> dict:
    """The run record the flow wrote: its run id is the flow run's id."""
    return json.loads((Path(storage) / "runs" / f"{flow_run_id}.json").read_text())


def step_of(task_run) -> str:
    """'critique_revision-3f2' -> 'critique_revision'."""
    return task_run.name.rsplit("-", 1)[0]


@pytest.mark.slow
def test_deployments_pool_limits_schedule_and_automation(prefect_stack):
    s = prefect_stack
    deps = {name: s.deployment(name) for name in ("constitutional-ai", "regenerate", "evaluate")}
    for name, dep in deps.items():
        assert dep.work_pool_name == "gpu", name
        assert "caiflow" in dep.tags, name
        assert dep.parameters["config"] == s.opts.preset == TINY  # `--preset` sets the deployments' default

    # the parameters form: the preset, storage, and the main settings, each with a description
    schema = deps["constitutional-ai"].parameter_openapi_schema
    props = schema["properties"]
    assert {"config", "storage", "settings", "overrides", "until"} <= set(props)
    assert all(props[p].get("description") for p in ("config", "storage", "settings", "overrides", "until"))
    settings = schema["definitions"]["Settings"]["properties"]
    assert {"max_red_team", "critique_rounds", "rl_algorithm", "rl_max_steps"} <= set(settings)
    assert all(f.get("description") for f in settings.values())

    # the nightly regeneration: cron 02:00 in the configured timezone; the others are unscheduled
    with s.client() as c:
        schedules = c.read_deployment_schedules(deps["regenerate"].id)
        assert [(x.schedule.cron, x.schedule.timezone, x.active) for x in schedules] == [
            ("0 2 * * *", s.opts.timezone, True)
        ]
        assert s.opts.timezone != "UTC"  # the stack was given a timezone, and the schedule took it
        assert c.read_deployment_schedules(deps["constitutional-ai"].id) == []

        pool = c.read_work_pool("gpu")
        assert (pool.type, pool.concurrency_limit) == ("process", 1)  # the stack's one GPU: one run at a time
        assert c.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
        assert any(
            str(w.status.value if hasattr(w.status, "value") else w.status).upper() == "ONLINE"
            for w in c.read_workers_for_work_pool("gpu")
        )

        [automation] = c.read_automations_by_name("caiflow-reschedule-crashed-runs")
    trigger = automation.trigger
    assert automation.enabled
    assert trigger.after == {"prefect.flow-run.Crashed"}
    assert trigger.posture == "Proactive"  # waits out the worker's second crash report, then acts
    assert trigger.match.model_dump()["prefect.run-count"] == ["1", "2"]  # at most 2 reschedules
    assert [a.type for a in automation.actions] == ["change-flow-run-state"]
    assert automation.actions[0].state.value == "SCHEDULED"


@pytest.mark.slow
def test_pipeline_run_from_the_api_completes_with_artifacts(prefect_stack):
    s = prefect_stack
    storage = s.new_storage("api-run")
    run_id = s.run_deployment("constitutional-ai", config=TINY, storage=str(storage))
    fr = s.wait_completed(run_id)
    assert fr.work_pool_name == "gpu" and fr.run_count == 1

    tasks = s.task_runs(run_id)
    assert sorted({step_of(t) for t in tasks}) == sorted(STEPS)
    assert all(t.state.is_completed() for t in tasks), [(t.name, t.state.name) for t in tasks]
    for t in tasks:  # model steps carry the `gpu` tag, so the tag limit keeps them off a shared GPU
        assert ("gpu" in t.tags) == (step_of(t) in MODEL_STEPS), (t.name, t.tags)

    artifacts = s.artifacts(run_id)
    types = {k: a.type for k, a in artifacts.items()}
    assert types["run-summary"] == "table"
    assert types["prompts-preview"] == "table"
    assert types["critique-revision-preview"] == "table"
    assert types["critique-revision-report"] == "markdown"  # metrics and before/after answers
    assert types["critique-revision-progress"] == "progress"
    assert all(k == k.lower() and "_" not in k for k in artifacts)
    assert "Before / after" in artifacts["critique-revision-report"].data
    assert artifacts["critique-revision-progress"].data == 100

    summary = s.table(run_id, "run-summary")
    assert [r["step"] for r in summary] == STEPS
    assert all(r["status"] == "computed" for r in summary)
    record = run_record(storage, run_id)
    assert {k: v["fingerprint"] for k, v in record["steps"].items()} == {
        r["step"]: r["fingerprint"] for r in summary
    }
    # the stack's one worker holds GPU 0 (deployments/workers.py), and its run saw only that card
    assert record["environment"]["hardware"]["cuda_visible_devices"] == "0"


@pytest.mark.slow
def test_killed_run_is_rescheduled_by_the_automation_and_resumes(prefect_stack):
    s = prefect_stack
    storage = s.new_storage("killed-run")
    run_id = s.run_deployment("constitutional-ai", config=TINY, storage=str(storage))

    def prompts_done(fr):
        # a task run just created may have no state yet; so may the flow run
        return any(
            step_of(t) == "prompts" and t.state is not None and t.state.is_completed()
            for t in s.task_runs(run_id)
        ) or (fr.state is not None and fr.state.is_final())

    fr = s.wait(run_id, until=prompts_done, poll=0.5)
    assert fr.state.is_running(), f"the run ended before it could be killed: {s.state_names(run_id)}"
    os.kill(int(fr.infrastructure_pid), signal.SIGKILL)  # what the kernel's OOM killer does

    # Crashed, then (after the automation's wait) Rescheduled, picked up again, Completed
    s.wait(
        run_id,
        until=lambda fr: fr.state is not None and fr.state.is_final() and not fr.state.is_crashed(),
        timeout=600,
    )
    fr = s.wait_completed(run_id)
    names = s.state_names(run_id)
    assert "Crashed" in names and "Rescheduled" in names, names
    assert names.index("Crashed") < names.index("Rescheduled") < len(names) - 1
    assert names.count("Rescheduled") == 1 and fr.run_count == 2  # one more attempt, and it finished

    # it resumed from the last good step: prompts came from the store, the rest was computed
    record = run_record(storage, run_id)
    assert record["steps"]["prompts"]["cached"]
    assert sorted(record["steps"]) == sorted(STEPS)
    # the step the kill interrupted is closed as Crashed, not left Running in the UI
    assert not [
        t.name for t in s.task_runs(run_id) if t.state is None or t.state.is_running() or t.state.is_pending()
    ]


@pytest.mark.slow
def test_regenerate_does_no_work_twice_and_generates_only_for_new_prompts(prefect_stack, tmp_path):
    s = prefect_stack
    storage = s.new_storage("regenerate")
    source = tmp_path / "prompts.jsonl"
    builtin = Path(__file__).resolve().parents[1] / "caiflow" / "data" / "builtin_prompts.jsonl"
    red = [
        json.loads(line)["prompt"]
        for line in builtin.read_text().splitlines()
        if line.strip() and json.loads(line).get("kind", "red-team") == "red-team"
    ]
    assert len(red) >= 22
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in red[:12]))
    params = dict(
        config=TINY,
        storage=str(storage),
        overrides=[
            f"prompts.sources=[{{kind: jsonl, path: {source}, kind_label: red-team}}]",
            "prompts.max_red_team=100",
        ],
    )

    def regenerate():
        run_id = s.run_deployment("regenerate", **params)
        s.wait_completed(run_id)
        return {r["step"]: r for r in s.table(run_id, "run-summary")}

    first = regenerate()
    assert list(first) == ["prompts", "critique_revision", "sft", "preferences"]  # stops after preferences
    assert all(r["status"] == "computed" for r in first.values())

    again = regenerate()  # same prompts: nothing to do
    assert all(r["status"] == "cached" for r in again.values()), again
    assert {k: r["fingerprint"] for k, r in again.items()} == {k: r["fingerprint"] for k, r in first.items()}

    with source.open("a") as f:  # 10 new prompts in the source
        f.write("".join(json.dumps({"prompt": p}) + "\n" for p in red[12:22]))
    third = regenerate()
    assert all(third[k]["status"] == "computed" for k in third)
    assert all(third[k]["fingerprint"] != first[k]["fingerprint"] for k in third)  # sft retrained on new data

    from caiflow.store import Store

    prompts = Store(storage).read_table(third["prompts"]["output"])
    train = prompts[prompts["drop_reason"].isna() & (prompts["split"] == "train")]
    new_train = int(train["prompt"].isin(red[12:22]).sum())
    assert 0 < new_train <= 10
    cr = third["critique_revision"]
    assert (cr["rows_generated"], cr["rows_reused"]) == (new_train, len(train) - new_train)

    # preferences: pairs depend on the SL model, which was retrained on the new data
    # (the SL model was retrained, so every pair is generated again)
    prefs = third["preferences"]
    assert (prefs["rows_generated"], prefs["rows_reused"]) == (len(train), 0)
