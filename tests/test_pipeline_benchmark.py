"""benchmarks/pipeline.py on the tiny preset: both runs, the step table and Prefect's overhead line;
benchmarks/gpu_check.py's CPU smoke run: every part, its report and its figures."""

from __future__ import annotations

import json
import re

import pytest

from tests.benchmark_scripts import benchmark_module, run_benchmark


@pytest.mark.slow
def test_pipeline_benchmark_times_each_step_with_and_without_prefect():
    """Its own temporary Prefect server (no PREFECT_API_URL): start-up on its own line, not in overhead."""
    lines = run_benchmark(
        "pipeline.py", "--config", "configs/tiny.yaml", "--until", "sft", env_drop=("PREFECT_API_URL",)
    )
    text = "\n".join(lines)
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["step", "plain", "s"])
    end = next(i for i in range(header, len(lines)) if lines[i].startswith("total"))
    # name (20 wide, may hold spaces), then plain s, prefect s, diff s, tokens, tok/s
    table = lines[header + 1 : end + 1]
    rows = {line[:20].strip(): [line[:20].strip(), *line[20:].split()] for line in table}
    for step in ("prompts", "critique_revision", "sft"):
        plain, prefect = float(rows[step][1]), float(rows[step][2])
        assert plain > 0 and prefect > 0, rows[step]
    assert "preferences" not in rows  # --until sft stops there
    # critique-revision generates: its new tokens and tokens/s are filled; sft does not generate
    assert int(rows["critique_revision"][4]) > 0 and float(rows["critique_revision"][5]) > 0
    assert rows["sft"][4:] == ["-", "-"]
    total = rows["total"]
    assert list(rows) == ["(plan and model)", "prompts", "critique_revision", "sft", "total"]
    plain_total = sum(float(row[1]) for name, row in rows.items() if name != "total")
    assert float(total[1]) == pytest.approx(plain_total, abs=0.2)
    share = re.search(r"Prefect overhead, start-up excluded: (-?[\d.]+) s = (-?[\d.]+)% of the Prefect", text)
    assert share, text[-1500:]
    assert float(share.group(1)) == pytest.approx(float(total[2]) - float(total[1]), abs=0.2)
    startup = re.search(r"Prefect start-up: ([\d.]+) s, a temporary server at http://127\.0\.0\.1:\d+/", text)
    assert startup and float(startup.group(1)) > 0, text[-1500:]


def test_new_tokens_of_a_step_and_of_evaluates_stages():
    """Evaluate counts its tokens per answering stage; a stage found done in its shards ran no engine."""
    new_tokens = benchmark_module("pipeline").new_tokens
    assert new_tokens({"generated_tokens": 25501}) == 25501
    assert new_tokens({"generation": {"sl": {"generated_tokens": 10}, "rl": {"generated_tokens": 7}}}) == 17
    assert new_tokens({"generation": {"sl": {"generated_tokens": 10}, "rl": {"rows_reused": 164}}}) is None
    assert new_tokens({"train_loss": 0.9}) is None


def test_gpu_check_smoke_runs_every_part_and_saves_what_it_prints(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py --smoke (tiny shapes; the CPU here): both sides at both batch sizes, every
    memory row with the plan's and the arithmetic's figures, no part failed or skipped; with $OUT set
    the report is also saved, as printed, with its figures as JSON. Sections 1b (--diagnose) and the
    measured GiB (CUDA only) are not covered."""
    monkeypatch.setenv("OUT", str(tmp_path))
    lines = run_benchmark("gpu_check.py", "--smoke")
    assert lines[0].startswith("gpu_check (smoke): device ")
    assert (tmp_path / "gpu_check.txt").read_text().splitlines() == lines
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "failed" not in data and "skipped" not in data
    by_batch = data["generation"]["by_batch"]
    assert list(by_batch) == ["4", "12"]  # SMOKE's batch sizes
    for figures in by_batch.values():
        for side in ("engine", "generate"):
            s = figures[side]
            assert 0 < s["tokens"] <= 12 * 8 and len(s["runs_s"]) == 2 and s["warmup_s"] > 0, s
        assert figures["ratio_engine_over_generate"] > 0
    memory = data["memory"]
    assert {
        "a. weights",
        "b. LoRA SFT step 1x64",
        "b. LoRA SFT step 2x64",
        "c. greedy generate KV 4x(32+8)",
        "d. LoRA reward step 2+2x64",
        "e. judge load (2 models)",
    } <= set(memory)
    assert all(row["plan_gib"] > 0 and row["arithmetic_gib"] > 0 for row in memory.values()), memory
    # The check's parameter formulas agree with the models it builds.
    built, formula = re.search(
        r"n_params ([\d,]+) \(formula ([\d,]+)\)", memory["a. weights"]["note"]
    ).groups()
    assert built == formula
    lora, lora_formula = re.search(
        r"LoRA ([\d,]+) \(formula ([\d,]+)\)", memory["b. LoRA SFT step 1x64"]["note"]
    ).groups()
    assert lora == lora_formula
