"""Generation shards on a real local Ray cluster (tests/ray_cluster.py): same data, retries, fast failure.

One cluster and one Prefect test harness for the module. The in-process run of configs/tiny.yaml is
the reference; the Ray runs start from a copy of its store without the steps that generate on Ray
(critique_revision, preferences, baseline, and evaluate for its stages' answers), so they compute
exactly those, on Ray, and find every other step cached under the same fingerprint: the executor is
not part of any fingerprint.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import pyarrow as pa
import pytest

from caiflow.store import Store
from tests.ray_cluster import _free_port, start_cluster

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")
RAY_STEPS = {"critique_revision", "preferences", "baseline", "evaluate"}
# What the shard tasks are named after: a step, or a step and the part of its output (evaluate's stages).
SHARDED = {"critique_revision", "preferences", "baseline", "evaluate-prompted", "evaluate-sl", "evaluate-rl"}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> str:
    yield from start_cluster(cpus=2, gpus=2)


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def run(storage: Path, *overrides: str, until: str = "evaluate") -> dict:
    from flows.constitutional_ai import constitutional_ai

    return constitutional_ai(config=TINY, overrides=list(overrides), storage=str(storage), until=until)


@contextmanager
def one_thread():
    """Torch on one CPU thread, as each Ray actor (1 CPU): CPU kernels then add in the same order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(harness, tmp_path_factory, model_store, tiny_model) -> dict:
    """The in-process run (the default executor), the whole tiny pipeline."""
    root = tmp_path_factory.mktemp("local")
    shutil.copytree(Path(model_store) / "models", root / "models")
    with one_thread():
        result = run(root)
    return {"root": root, "result": result}


def store_without_generation(reference: dict, dest: Path) -> Path:
    """A copy of the reference store without the artifacts the Ray executor makes."""
    shutil.copytree(reference["root"], dest, ignore=shutil.ignore_patterns("prefect-results"))
    for step in RAY_STEPS:
        shutil.rmtree(dest / "artifacts" / step)
    return dest


def table(result: dict, step: str) -> pa.Table:
    path = result["steps"][step]["path"]
    return pa.Table.from_pandas(Store(Path(path).parents[2]).read_table(path), preserve_index=False)


def shard_runs(run_id: str) -> dict[str, int]:
    """Shard task runs of a flow run in the Prefect API: name -> run count (2 = retried once)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run_id)])))
    done = [r for r in runs if "-shard-" in r.name and r.state.is_completed()]
    return {r.name.rsplit("-", 1)[0]: r.run_count for r in done}


def test_tiny_run_on_ray_gives_the_same_data_as_in_process(cluster, reference, tmp_path):
    local = reference["result"]
    storage = store_without_generation(reference, tmp_path / "ray")
    with one_thread():  # evaluate scores and judges in this process, as the reference did
        result = run(storage, "generation.executor.kind=ray", f"generation.executor.address={cluster}")

    computed = {s for s, v in result["steps"].items() if not v["cached"]}
    assert computed == RAY_STEPS  # every other step found cached: same fingerprints
    for step, s in result["steps"].items():
        assert s["fingerprint"] == local["steps"][step]["fingerprint"], step
    for step in RAY_STEPS:
        assert result["steps"][step]["rows"] == local["steps"][step]["rows"] > 0, step
        assert table(result, step).equals(table(local, step)), f"{step}: data differ between executors"

    # every shard was a Prefect task of the run, named after its step (evaluate: and stage) and index
    runs = shard_runs(result["run_id"])
    assert {name.split("-shard-")[0] for name in runs} == SHARDED
    rows = result["steps"]["critique_revision"]["rows"]  # tiny.yaml: 4 rows a shard
    assert len([n for n in runs if n.startswith("critique_revision-")]) == -(-rows // 4)
    prompts = result["steps"]["baseline"]["rows"]
    for stage in ("prompted", "sl", "rl"):
        assert len([n for n in runs if n.startswith(f"evaluate-{stage}-")]) == -(-prompts // 4), stage
        # made on the actors: no engine ran in the step's process (in-process, its metrics are reported)
        made = result["steps"]["evaluate"]["metrics"]["generation"][stage]
        assert made == {"rows_generated": prompts, "rows_reused": 0}, stage
        assert "oom_backoffs" in local["steps"]["evaluate"]["metrics"]["generation"][stage]

    # one actor per (declared) GPU, each with its own device, loading each step's model at most once
    from caiflow.ray_pool import shard_pool

    devices = shard_pool(cluster).devices()
    assert sorted(d["cuda_visible_devices"] for d in devices) == ["0", "1"]
    assert len({d["pid"] for d in devices}) == 2
    assert sum(d["builds"] for d in devices) <= len(devices) * len(SHARDED) < len(runs)


def test_killed_ray_worker_is_retried_and_the_data_is_the_same(cluster, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("CAIFLOW_FAULT_KILL_WORKER", "critique_revision:shard:1")
    storage = store_without_generation(reference, tmp_path / "killed")
    result = run(
        storage,
        "generation.executor.kind=ray",
        f"generation.executor.address={cluster}",
        until="critique_revision",
    )
    assert (storage / "faults" / "critique_revision-shard-1.fired").is_file()  # the worker did die
    runs = shard_runs(result["run_id"])
    assert runs["critique_revision-shard-00001"] == 2  # retried once, in the UI's task run
    assert all(n == 1 for name, n in runs.items() if name != "critique_revision-shard-00001")
    local = reference["result"]
    assert table(result, "critique_revision").equals(table(local, "critique_revision"))


def test_unreachable_cluster_is_one_line_before_any_step(tmp_path, model_store, tiny_model):
    from caiflow.config import load_config
    from caiflow.ray_pool import ExecutorError
    from flows.constitutional_ai import run_pipeline

    dead = f"127.0.0.1:{_free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", TINY, "--storage", str(tmp_path)]
        + ["--executor", "ray", "--ray-address", dead],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("caiflow: error:")]
    assert len(errors) == 1 and f"no Ray cluster answers at {dead}" in errors[0], proc.stderr[-2000:]
    assert "ray start --head" in errors[0]
    assert not (tmp_path / "artifacts").exists()

    # a flow run (from the UI) stops the same way before its first step
    ray_settings = ["generation.executor.kind=ray", f"generation.executor.address={dead}"]
    cfg = load_config(TINY, ray_settings, str(tmp_path))
    with pytest.raises(ExecutorError, match="no Ray cluster answers"):
        run_pipeline(cfg)
    assert not (tmp_path / "artifacts").exists()
