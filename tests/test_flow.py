"""The flow end to end on configs/tiny.yaml, under one Prefect test harness for this module."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from caiflow.store import Store

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")
STEPS = ["prompts", "critique_revision", "sft", "preferences", "reward_model", "rl", "baseline", "evaluate"]


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
        k: v["fingerprint"] for k, v in first["steps"].items()
    }
    # what it ran on: the versions that can change results, and the hardware
    import torch

    packages, hardware = record["environment"]["packages"], record["environment"]["hardware"]
    assert packages["torch"] == torch.__version__.split("+")[0] or packages["torch"] == torch.__version__
    assert {"transformers", "trl", "peft", "prefect"} <= set(packages) and hardware["cpus"] >= 1

    second = run(storage)
    assert all(s["cached"] for s in second["steps"].values())
    assert {k: v["fingerprint"] for k, v in second["steps"].items()} == {
        k: v["fingerprint"] for k, v in first["steps"].items()
    }

    # per-device training batches and the reward-scoring batch are not fingerprinted (their effect on results
    # is shown in tests/training); generation batch sizes are (tests/test_fingerprints.py)
    third = run(
        storage,
        "sft.per_device_batch_size=1",
        "reward_model.per_device_batch_size=1",
        "rl.per_device_batch_size=2",
        "rl.scoring_batch_size=2",
        "model.device=cpu",
    )
    assert all(s["cached"] for s in third["steps"].values())


def test_flow_steps_are_the_pipeline_declaration():
    from caiflow.pipeline import PIPELINE
    from flows.deployable import RegenerateStep, Step

    assert list(STEPS) == [s.name for s in PIPELINE]
    assert typing.get_args(Step) == tuple(STEPS) and typing.get_args(RegenerateStep) == tuple(STEPS[1:])


def test_changed_constitution_reruns_what_reads_it_and_shares_the_rest(harness, storage, tmp_path):
    base = run(storage)
    text = (ROOT / "constitutions/harmless.yaml").read_text()
    edited = tmp_path / "edited.yaml"
    edited.write_text(text.replace("harmful", "hurtful", 1))
    changed = run(storage, f"constitution.path={edited}")
    # categorising reads only principle ids and names, and the base model's answers read no constitution
    shared = ["prompts", "baseline"]
    for step in STEPS:
        assert changed["steps"][step]["cached"] == (step in shared), step
        assert (changed["steps"][step]["fingerprint"] == base["steps"][step]["fingerprint"]) == (
            step in shared
        )


def test_changed_generation_setting_reruns_from_critique_revision(harness, storage):
    base = run(storage)
    changed = run(storage, "critique_revision.revision.max_new_tokens=5")
    assert changed["steps"]["prompts"]["cached"] and changed["steps"]["baseline"]["cached"]
    for step in [s for s in STEPS[1:] if s != "baseline"]:
        assert not changed["steps"][step]["cached"], step
        assert changed["steps"][step]["fingerprint"] != base["steps"][step]["fingerprint"]


def test_changed_rl_setting_reruns_only_rl_and_evaluate(harness, storage):
    base = run(storage)
    changed = run(storage, "rl.kl_coef=0.2")
    assert [s for s in STEPS if not changed["steps"][s]["cached"]] == ["rl", "evaluate"]
    assert changed["steps"]["sft"]["fingerprint"] == base["steps"]["sft"]["fingerprint"]


def test_added_prompts_generate_only_new_rows(harness, model_store, tiny_model, tmp_path):
    storage = tmp_path / "storage"  # its own: the module's storage may already hold either run
    shutil.copytree(Path(model_store) / "models", storage / "models")
    small = run(storage, "prompts.max_red_team=6", until="critique_revision")
    large = run(storage, "prompts.max_red_team=10", until="critique_revision")
    store = Store(storage)
    old = store.read_table(small["steps"]["critique_revision"]["path"])
    new = store.read_table(large["steps"]["critique_revision"]["path"])
    metrics = large["steps"]["critique_revision"]["metrics"]
    shared = set(old["prompt_id"]) & set(new["prompt_id"])
    assert shared and len(new) > len(old)
    both = new.set_index("prompt_id").loc[sorted(shared)]
    before = old.set_index("prompt_id").loc[sorted(shared)]
    # A prompt's category is an argmax of calibrated label probabilities computed in batches; the two runs
    # categorise different prompt sets, so a prompt's batch (and its padding) differs, and a category whose
    # top two labels are within float noise can flip. A row is reused only when its category is unchanged.
    same = both["category"] == before["category"]
    flipped = int((~same).sum())
    assert flipped <= 1  # near-ties are rare; many flips would mean the categoriser depends on its batch
    assert metrics["rows_reused"] == len(shared) - flipped  # exact accounting: every unchanged row reused
    assert metrics["rows_generated"] == len(new) - len(shared) + flipped
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
    table = outputs[1].split("\ntotal ")[0]  # the step table (the verdict table below has an "rl" row too)
    rows = [line.split() for line in table.splitlines() if line.split()[:1] and line.split()[0] in STEPS]
    assert [r[0] for r in rows] == STEPS and all(r[1] == "cached" for r in rows), outputs[1]


def test_status_says_why_a_step_would_run(harness, storage):
    from caiflow.config import load_config
    from caiflow.plan import plan_for
    from caiflow.status import pipeline_status

    run(storage)  # whatever earlier tests did, the tiny preset's artifacts are there
    done = pipeline_status(Store(storage), plan_for(load_config(TINY, [], str(storage))).plan)
    assert [(r.step, r.state) for r in done] == [(s, "done") for s in STEPS]

    changed = pipeline_status(
        Store(storage), plan_for(load_config(TINY, ["rl.kl_coef=0.33"], str(storage))).plan
    )
    states = {r.step: r for r in changed}
    assert [s for s in STEPS if states[s].state == "done"] == STEPS[:5] + ["baseline"]
    # the closest earlier rl artifact differs in kl_coef alone (0.05 here, or 0.2 if that test ran first)
    assert states["rl"].state == "to run" and re.search(
        r"config\.kl_coef: 0\.(05|2) -> 0\.33$", states["rl"].why
    )
    assert "input rl changed" in states["evaluate"].why

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "status",
            "--config",
            TINY,
            "--storage",
            str(storage),
            "--set",
            "critique_revision.rounds=2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {
        line.split()[0]: line
        for line in proc.stdout.splitlines()
        if line.split()[:1] and line.split()[0] in STEPS
    }
    assert "done" in lines["prompts"] and "config.rounds: 1 -> 2" in lines["critique_revision"]
    assert "would compute: critique_revision, sft, preferences, reward_model, rl, evaluate" in proc.stdout
    assert "done" in lines["baseline"]


def test_gc_keeps_what_kept_runs_name_and_never_a_locked_artifact(harness, storage, tmp_path):
    from caiflow.gc import collect, run_records

    own = tmp_path / "storage"
    shutil.copytree(storage, own, ignore=shutil.ignore_patterns("prefect-results", "locks"))
    run(own)
    newest = run(own, "rl.kl_coef=0.44")  # the newest run record
    store = Store(own)
    keep = {(step, s["fingerprint"]) for step, s in newest["steps"].items()}
    everything = set(store.iter_artifacts())
    assert keep < everything and len(run_records(store)) >= 2

    dry = collect(store, keep_runs=1, dry_run=True)
    assert {(s, fp) for s, fp, _ in dry.removed} == everything - keep and set(
        store.iter_artifacts()
    ) == everything

    held_step, held_fp = sorted(everything - keep)[0]
    with store.lock(held_step, held_fp):  # a run computing this artifact right now
        done = collect(store, keep_runs=1)
    assert done.in_use == [(held_step, held_fp)]
    assert set(store.iter_artifacts()) == keep | {(held_step, held_fp)}
    assert [p.name for p in run_records(store)] == [Path(newest["run_record"]).name]
    assert all(store.is_complete(step, fp) for step, fp in keep)
    assert done.freed_bytes > 0

    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "gc", "--storage", str(own), "--keep-runs", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0 and f"removed      {held_step}/{held_fp}" in proc.stdout, proc.stdout
    again = run(own, "rl.kl_coef=0.44")
    assert all(s["cached"] for s in again["steps"].values())


def test_evaluate_writes_judge_free_metrics_both_orders_calibration_and_pictures(harness, storage):
    result = run(storage)
    store = Store(storage)
    ev = result["steps"]["evaluate"]
    metrics, folder = ev["metrics"], Path(ev["path"])
    answers = store.read_table(folder)
    baseline = store.read_table(result["steps"]["baseline"]["path"])
    # the held-out prompts plus the look-alikes tiny.yaml asks for, each answered by every stage
    assert set(baseline["source"]) >= {"builtin", "lookalike:report"} and baseline["lookalike"].sum() == 8
    # every stage, and the base model prompted with the constitution (the reference arm)
    assert len(answers) == 4 * len(baseline) and set(answers["stage"]) == {"base", "prompted", "sl", "rl"}
    base = answers[answers["stage"] == "base"].set_index("prompt_id")
    assert (
        base["answer"] == baseline.set_index("prompt_id")["answer"]
    ).all()  # base answers come from baseline
    red = base[base["kind"] == "red-team"]
    assert metrics["refusal"]["base"]["red_team"]["k"] == int(red["refused"].sum())
    assert metrics["refusal"]["base"]["red_team"]["n"] == len(red)
    assert (
        metrics["vs_base"]["rl"]["benign"]["n"] == metrics["benign"] == int((base["kind"] == "benign").sum())
    )
    judgements = store.read_table(folder, name="judgements")
    agree = judgements[~judgements["identical"]]
    mean = (agree["p_candidate_first"] + agree["p_candidate_second"]) / 2
    assert np.allclose(mean, agree["p_candidate_better"])
    calibration = store.read_table(folder, name="calibration")
    cal = metrics["judge"]["calibration"]
    assert len(calibration) == cal["n"] >= 40 and cal["accuracy"] == pytest.approx(
        calibration["right"].mean()
    )
    assert cal["reliable"] == (cal["lo"] > 0.5)
    for name in ("refusal", "rewards", "rl", "elo"):
        png = folder / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (folder / "report.md").read_text()
    assert "![Refusal and over-refusal per stage](plots/refusal.png)" in report and "## The judge" in report


def test_compare_runs_both_arms_sharing_prompts_and_base_answers(harness, storage, tmp_path):
    own = tmp_path / "storage"
    shutil.copytree(Path(storage) / "models", own / "models")
    cmd = [sys.executable, "-m", "flows.cli", "compare", "--config", TINY, "--storage", str(own)]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # the inverted arm reuses the constitution arm's prompts and base answers
    inverted = next(line for line in out.splitlines() if line.startswith("inverted arm:"))
    assert "cached prompts, baseline" in inverted, inverted
    for stage in ("base", "sl (constitution)", "rl (constitution)", "sl (inverted)", "rl (inverted)"):
        assert any(line.startswith(stage) for line in out.splitlines()), stage
    assert "rl: constitution minus inverted" in out and "verdict:" in out
    store = Store(own)
    compares = [fp for step, fp in store.iter_artifacts() if step == "compare"]
    assert len(compares) == 1 and store.is_complete("compare", compares[0])
    manifest = store.manifest("compare", compares[0])
    evaluations = [fp for step, fp in store.iter_artifacts() if step == "evaluate"]
    assert sorted(manifest["inputs"].values()) == sorted(evaluations) and len(evaluations) == 2
    # the side-by-side rates are those of each arm's own evaluation
    metrics = manifest["metrics"]
    inverted_fp = manifest["inputs"]["inverted/evaluate"]
    rl = store.read_table(store.artifact_dir("evaluate", inverted_fp))
    rl = rl[(rl["stage"] == "rl") & (rl["kind"] == "red-team")]
    assert metrics["rates"]["rl (inverted)"]["red_team"]["k"] == int(rl["refused"].sum())
    assert (
        (own / "artifacts" / "compare" / compares[0] / "report.md")
        .read_text()
        .startswith("# The inverted-constitution control")
    )


def test_small_model_methods_distillation_contrastive_pairs_and_the_prompted_reference(harness, storage):
    result = run(
        storage,
        "critique_revision.method=context_distillation",
        "critique_revision.samples_per_prompt=2",
        "critique_revision.prefer_refusals=true",
        "preferences.method=both",
        "preferences.contrastive_label=0.8",
        "evaluate.judge_if_unreliable=false",
    )
    store = Store(storage)
    steps = result["steps"]
    sl = store.read_table(steps["critique_revision"]["path"])
    assert (
        all(len(r) == 0 for r in sl["rounds"])
        and "red_team_targets_refusing" in steps["critique_revision"]["metrics"]
    )
    prefs = store.read_table(steps["preferences"]["path"])
    train = int(steps["prompts"]["metrics"]["train_red_team"] + steps["prompts"]["metrics"]["train_benign"])
    assert len(prefs) == 2 * train  # one contrastive and one feedback pair per training prompt
    assert set(prefs["pair_kind"]) == {"contrastive-red-team", "contrastive-benign", "feedback"}
    contrastive = prefs[prefs["pair_kind"].str.startswith("contrastive") & prefs["drop_reason"].isna()]
    assert (contrastive["label"] == 0.8).all()
    reward = steps["reward_model"]["metrics"]
    assert set(reward["eval_accuracy_by_kind"]) <= set(prefs["pair_kind"]) and "eval_accuracy_lo" in reward
    rl = steps["rl"]["metrics"]
    assert rl["reward_rose"] == (rl["reward_last_quarter"] > rl["reward_first_quarter"])
    ev = steps["evaluate"]["metrics"]
    assert ev["stages"] == ["base", "prompted", "sl", "rl"] and "prompted" not in ev["verdicts"]
    assert ev["trained_by"]["prompted"]["prompted"] and "prompted" in ev["vs_base"]
    answers = store.read_table(steps["evaluate"]["path"])
    assert set(answers["stage"]) == {"base", "prompted", "sl", "rl"}
    # a judge that fails its calibration is not asked to compare the stages (judge_if_unreliable off)
    if not ev["judge"]["calibration"]["reliable"]:
        assert ev["judge"]["skipped"] and ev["win_rates"] == {} and ev["elo"] == {}
        assert len(store.read_table(steps["evaluate"]["path"], name="judgements")) == 0
        report = (Path(steps["evaluate"]["path"]) / "report.md").read_text()
        assert "failed its calibration, so it was not asked" in report


def test_progress_logs_the_time_left_only_once_there_is_a_rate():
    """Before anything is done there is no rate: the line says it is starting, not 'about nan s left'."""
    from tasks.common import Progress

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    progress = Progress("progress-test", 10, "rows")
    heard = Lines()
    progress.log = logging.getLogger("progress-test")  # outside a run it logs to "caiflow"
    progress.log.addHandler(heard)
    progress.log.setLevel(logging.INFO)
    progress.update(0, force=True)
    progress.update(5, force=True)
    progress.log.removeHandler(heard)
    assert heard.lines[0] == "rows: 0/10 (0%), starting"
    assert re.fullmatch(r"rows: 5/10 \(50%\), [\d.]+/s, about \d+ s left", heard.lines[1])
