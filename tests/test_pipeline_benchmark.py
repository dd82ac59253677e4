"""benchmarks/pipeline.py on the tiny preset: both runs, the step table and Prefect's overhead line."""

from __future__ import annotations

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
