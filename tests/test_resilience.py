"""Faults inflicted on real `caiflow run` processes, then the run again: same data as a clean run.

Every run here is a subprocess of the real CLI on configs/tiny.yaml, talking to one Prefect
test server for the module. Faults come from the switches in `caiflow.faults`: SIGKILL at a
named point (what the kernel's OOM killer does), or a failure of a step's first attempts.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from caiflow.store import Store

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")
pytestmark = pytest.mark.slow
# Checkpoint every optimiser step, so a kill "after a checkpoint" has one to resume from.
# save_steps is not part of any fingerprint, so all runs here share artifacts' identities.
COMMON = ["--set", "sft.save_steps=1"]


@pytest.fixture(scope="module")
def api_url():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def storage(tmp_path, model_store, tiny_model):
    root = tmp_path / "storage"
    shutil.copytree(Path(model_store) / "models", root / "models")  # the tiny model, built once
    return root


def caiflow(api_url, storage, *args, env=None, until="evaluate", wait=True):
    full_env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(Path(storage).parent / "prefect-home"),
        **(env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--config",
        TINY,
        "--storage",
        str(storage),
        "--until",
        until,
        *COMMON,
        *args,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if not wait:
        return proc
    out, err = proc.communicate(timeout=900)
    proc.stdout_text, proc.stderr_text = out, err
    return proc


def run_record(storage, proc) -> dict:
    line = [x for x in proc.stdout_text.splitlines() if "run record:" in x][-1]
    return json.loads(Path(line.split("run record:")[1].strip()).read_text())


def computed(record) -> set[str]:
    return {step for step, s in record["steps"].items() if not s["cached"]}


def table(storage, step, fp) -> pd.DataFrame:
    df = Store(storage).read_table(Store(storage).artifact_dir(step, fp))
    key = "prompt_id" if "prompt_id" in df.columns else df.columns[0]
    return df.sort_values(key, kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(api_url, tmp_path_factory, model_store, tiny_model):
    """One uninterrupted run of the whole tiny pipeline: what every faulty run must end up with."""
    root = tmp_path_factory.mktemp("reference") / "storage"
    shutil.copytree(Path(model_store) / "models", root / "models")
    proc = caiflow(api_url, root)
    assert proc.returncode == 0, proc.stderr_text[-3000:]
    return root, run_record(root, proc)


def assert_same_data(storage, ref_root, ref_record, steps):
    for step in steps:
        fp = ref_record["steps"][step]["fingerprint"]
        assert Store(storage).is_complete(step, fp), step
        assert Store(storage).verify(step, fp) == []
        pd.testing.assert_frame_equal(table(storage, step, fp), table(ref_root, step, fp))


def test_kill_mid_generation_redoes_only_unfinished_shards(api_url, storage, reference):
    ref_root, ref_record = reference
    killed = caiflow(
        api_url, storage, env={"CAIFLOW_FAULT_KILL": "critique_revision:shard:0"}, until="critique_revision"
    )
    assert killed.returncode == -signal.SIGKILL
    fp = ref_record["steps"]["critique_revision"]["fingerprint"]
    store = Store(storage)
    first = store.artifact_dir("critique_revision", fp) / "data" / "part-00000.parquet"
    assert first.is_file() and not store.is_complete("critique_revision", fp)  # a shard, no manifest
    verify = subprocess.run(
        [sys.executable, "-m", "flows.cli", "verify", "--storage", str(storage)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0 and f"incomplete critique_revision/{fp}" in verify.stdout
    before = first.stat().st_mtime_ns

    again = caiflow(api_url, storage, until="critique_revision")
    assert again.returncode == 0, again.stderr_text[-3000:]
    assert computed(run_record(storage, again)) == {"critique_revision"}  # prompts were done
    assert first.stat().st_mtime_ns == before  # the finished shard was kept, not redone
    assert_same_data(storage, ref_root, ref_record, ["prompts", "critique_revision"])


def test_kill_between_steps_resumes_at_the_next_step(api_url, storage, reference):
    ref_root, ref_record = reference
    killed = caiflow(api_url, storage, env={"CAIFLOW_FAULT_KILL": "after:critique_revision"}, until="sft")
    assert killed.returncode == -signal.SIGKILL
    again = caiflow(api_url, storage, until="sft")
    assert again.returncode == 0, again.stderr_text[-3000:]
    assert computed(run_record(storage, again)) == {"sft"}
    assert_same_data(storage, ref_root, ref_record, ["prompts", "critique_revision"])


def test_kill_mid_training_resumes_from_the_checkpoint(api_url, storage, reference):
    ref_root, ref_record = reference
    killed = caiflow(api_url, storage, env={"CAIFLOW_FAULT_KILL": "sft:checkpoint:1"}, until="sft")
    assert killed.returncode == -signal.SIGKILL
    fp = ref_record["steps"]["sft"]["fingerprint"]
    store = Store(storage)
    assert (store.artifact_dir("sft", fp) / "work" / "checkpoint-1").is_dir()
    assert not store.is_complete("sft", fp)
    again = caiflow(api_url, storage, until="sft")
    assert again.returncode == 0, again.stderr_text[-3000:]
    record = run_record(storage, again)
    assert computed(record) == {"sft"}
    metrics = store.load_ref("sft", fp).metrics
    assert metrics["resumed_from"] == "checkpoint-1"
    mine = load_file(store.artifact_dir("sft", fp) / "model" / "adapter_model.safetensors")
    ref = load_file(Store(ref_root).artifact_dir("sft", fp) / "model" / "adapter_model.safetensors")
    assert mine.keys() == ref.keys()
    for name in ref:
        assert (mine[name] - ref[name]).abs().max().item() < 1e-5, name


def test_two_concurrent_runs_compute_each_step_once(api_url, storage, reference):
    ref_root, ref_record = reference
    a = caiflow(api_url, storage, wait=False)
    time.sleep(2)
    b = caiflow(api_url, storage, wait=False)
    outs = []
    for proc in (a, b):
        out, err = proc.communicate(timeout=900)
        proc.stdout_text, proc.stderr_text = out, err
        assert proc.returncode == 0, err[-3000:]
        outs.append(run_record(storage, proc))
    for step in ref_record["steps"]:
        flags = [rec["steps"][step]["cached"] for rec in outs]
        said = [[x for x in (p.stdout_text + p.stderr_text).splitlines() if step in x] for p in (a, b)]
        # exactly one run computed it (on failure: both runs' records and log lines for the step)
        assert sorted(flags) == [False, True], (step, [r["steps"][step] for r in outs], said)
        assert outs[0]["steps"][step]["fingerprint"] == outs[1]["steps"][step]["fingerprint"]
    assert_same_data(storage, ref_root, ref_record, ["prompts", "critique_revision", "preferences"])


def test_out_of_memory_is_retried_with_a_smaller_batch(api_url, storage, reference):
    _, ref_record = reference
    proc = caiflow(
        api_url, storage, env={"CAIFLOW_FAULT_STEP": "critique_revision:oom:1"}, until="critique_revision"
    )
    assert proc.returncode == 0, proc.stderr_text[-3000:]
    fp = ref_record["steps"]["critique_revision"]["fingerprint"]
    metrics = Store(storage).load_ref("critique_revision", fp).metrics
    assert metrics["task_attempt"] == 2
    assert metrics["start_batch_size"] == 4  # tiny.yaml's 8, halved for the retry


def test_an_ordinary_bug_is_not_retried(api_url, storage):
    proc = caiflow(
        api_url, storage, env={"CAIFLOW_FAULT_STEP": "critique_revision:bug:1"}, until="critique_revision"
    )
    assert proc.returncode == 1
    assert "injected bug in critique_revision" in proc.stderr_text
    assert "attempt 2" not in proc.stdout_text + proc.stderr_text


def test_corrupt_artifact_is_reported_then_recomputed(api_url, storage, reference):
    ref_root, ref_record = reference
    assert caiflow(api_url, storage, until="critique_revision").returncode == 0
    fp = ref_record["steps"]["critique_revision"]["fingerprint"]
    part = Store(storage).artifact_dir("critique_revision", fp) / "data" / "part-00001.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    verify = subprocess.run(
        [sys.executable, "-m", "flows.cli", "verify", "--storage", str(storage)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 1 and f"corrupt    critique_revision/{fp}" in verify.stdout
    again = caiflow(api_url, storage, until="critique_revision")
    assert again.returncode == 0, again.stderr_text[-3000:]
    assert computed(run_record(storage, again)) == {"critique_revision"}
    assert_same_data(storage, ref_root, ref_record, ["critique_revision"])
    assert list((storage / "artifacts" / "critique_revision").glob(".tmp-corrupt-*"))  # kept for inspection
