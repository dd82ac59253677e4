"""The flow end to end on configs/tiny.yaml, under one Prefect test harness for this module."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from caiflow.store import Store

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")
STEPS = ["prompts", "critique_revision", "sft", "preferences", "reward_model", "rl", "evaluate"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def storage(tmp_path_factory, model_store, tiny_model):
    root = tmp_path_factory.mktemp("flow-storage")
    shutil.copytree(Path(model_store) / "models", root / "models")  # reuse the tiny model
    return root


def run(storage, *overrides, until="evaluate"):
    from flows.constitutional_ai import constitutional_ai

    return constitutional_ai(config=TINY, overrides=list(overrides), storage=str(storage), until=until)


def test_flow_runs_then_serves_from_cache(harness, storage):
    first = run(storage)
    assert [s for s in first["steps"]] == STEPS
    assert not any(s["cached"] for s in first["steps"].values())
    store = Store(storage)
    for step, s in first["steps"].items():
        assert store.is_complete(step, s["fingerprint"])
    sl = store.read_table(first["steps"]["critique_revision"]["path"])
    assert len(sl) == first["steps"]["critique_revision"]["rows"] > 0
    assert set(sl["kind"]) <= {"red-team", "benign"}
    assert all(m[0]["role"] == "user" and m[1]["role"] == "assistant" for m in sl["messages"])
    record = json.loads(Path(first["run_record"]).read_text())
    assert {k: v["fingerprint"] for k, v in record["steps"].items()} == {
        k: v["fingerprint"] for k, v in first["steps"].items()}

    second = run(storage)
    assert all(s["cached"] for s in second["steps"].values())
    assert {k: v["fingerprint"] for k, v in second["steps"].items()} == {
        k: v["fingerprint"] for k, v in first["steps"].items()}

    # batch sizes and shard sizes do not change results, so nothing re-runs
    third = run(storage, "generation.batch_size=2", "generation.shard_size=3", "prompts.categorize.batch_size=2")
    assert all(s["cached"] for s in third["steps"].values())


def test_changed_constitution_reruns_dependent_steps(harness, storage, tmp_path):
    base = run(storage)
    text = (ROOT / "constitutions/harmless.yaml").read_text()
    edited = tmp_path / "edited.yaml"
    edited.write_text(text.replace("harmful", "hurtful", 1))
    changed = run(storage, f"constitution.path={edited}")
    for step in STEPS:
        assert not changed["steps"][step]["cached"]
        assert changed["steps"][step]["fingerprint"] != base["steps"][step]["fingerprint"]


def test_changed_generation_setting_reruns_from_critique_revision(harness, storage):
    base = run(storage)
    changed = run(storage, "critique_revision.revision.max_new_tokens=5")
    assert changed["steps"]["prompts"]["cached"]
    for step in STEPS[1:]:
        assert not changed["steps"][step]["cached"], step
        assert changed["steps"][step]["fingerprint"] != base["steps"][step]["fingerprint"]


def test_changed_rl_setting_reruns_only_rl_and_evaluate(harness, storage):
    base = run(storage)
    changed = run(storage, "rl.kl_coef=0.2")
    assert [s for s in STEPS if not changed["steps"][s]["cached"]] == ["rl", "evaluate"]
    assert changed["steps"]["sft"]["fingerprint"] == base["steps"]["sft"]["fingerprint"]


def test_added_prompts_generate_only_new_rows(harness, model_store, tiny_model, tmp_path):
    storage = tmp_path / "storage"   # its own: the module's storage may already hold either run
    shutil.copytree(Path(model_store) / "models", storage / "models")
    small = run(storage, "prompts.max_red_team=6", until="critique_revision")
    large = run(storage, "prompts.max_red_team=10", until="critique_revision")
    store = Store(storage)
    old = store.read_table(small["steps"]["critique_revision"]["path"])
    new = store.read_table(large["steps"]["critique_revision"]["path"])
    metrics = large["steps"]["critique_revision"]["metrics"]
    shared = set(old["prompt_id"]) & set(new["prompt_id"])
    assert shared and len(new) > len(old)
    assert metrics["rows_reused"] + metrics["rows_generated"] == len(new)
    assert metrics["rows_reused"] >= len(shared) - 1  # a borderline category may flip; never more work
    assert metrics["rows_generated"] <= len(new) - len(shared) + 1
    both = new.set_index("prompt_id").loc[sorted(shared)]
    before = old.set_index("prompt_id").loc[sorted(shared)]
    same = (both["category"] == before["category"])
    assert (both["revision"][same] == before["revision"][same]).all()  # reused rows are the earlier rows


def test_deleted_artifact_is_recomputed_identically(harness, storage):
    base = run(storage)
    s = base["steps"]["critique_revision"]
    store = Store(storage)
    before = store.read_table(s["path"])
    art = Path(s["path"])
    (art / "manifest.json").unlink()  # a crash before the manifest: not done
    shards = sorted((art / "data").glob("part-*.parquet"))
    assert len(shards) >= 2
    shards[-1].unlink()  # an unfinished shard
    kept_mtime = shards[0].stat().st_mtime_ns
    again = run(storage)
    assert not again["steps"]["critique_revision"]["cached"]
    assert shards[0].stat().st_mtime_ns == kept_mtime  # finished shards were not redone
    after = store.read_table(s["path"])
    assert after.drop(columns=["rounds", "messages"]).equals(before.drop(columns=["rounds", "messages"]))
    assert after["revision"].tolist() == before["revision"].tolist()


def test_cli_runs_tiny_preset_then_serves_cache(storage, tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", TINY, "--storage", str(storage)]
    outputs = []
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "run record" in proc.stdout
        outputs.append(proc.stdout)
    table = outputs[1].split("\ntotal ")[0]   # the step table (the verdict table below has an "rl" row too)
    rows = [line.split() for line in table.splitlines() if line.split()[:1] and line.split()[0] in STEPS]
    assert [r[0] for r in rows] == STEPS and all(r[1] == "cached" for r in rows), outputs[1]
