"""Multi-process training: SFT under `accelerate launch` with 2 CPU processes (gloo), tiny model."""

from __future__ import annotations

import time

import pytest
from safetensors.torch import load_file

from caiflow.training.config import SFTConfig
from caiflow.training.launch import check_batches, launch_command, run_launched


def test_sft_trains_in_two_processes(tiny_path, sl_records, tmp_path):
    cfg = SFTConfig(
        method="lora",
        lora={"r": 4, "alpha": 8},
        max_steps=2,
        batch_size=4,
        per_device_batch_size=1,
        max_length=64,
        learning_rate=1e-2,
    )
    out, work = tmp_path / "out", tmp_path / "work"
    t0 = time.monotonic()
    metrics = run_launched(
        "sft",
        cfg.model_dump(),
        sl_records,
        {"base_model_path": tiny_path, "out_dir": out, "work_dir": work, "seed": 0},
        work,
        num_processes=2,
    )
    seconds = time.monotonic() - t0
    # both ranks trained the same 2 optimiser steps in a world of 2; accumulation 4 / (1 x 2) = 2
    assert sorted(r["rank"] for r in metrics["ranks"]) == [0, 1]
    assert {r["world_size"] for r in metrics["ranks"]} == {2}
    assert {r["steps"] for r in metrics["ranks"]} == {2}
    assert metrics["gradient_accumulation_steps"] == 2 and metrics["per_device_batch_size"] == 1
    # the adapter moved: LoRA's B matrices start at zero
    weights = load_file(out / "adapter_model.safetensors")
    b = [t for name, t in weights.items() if "lora_B" in name]
    assert b and all(t.abs().sum() > 0 for t in b)
    assert (out / "README.md").is_file() and (out / "tokenizer_config.json").is_file()
    print(f"2-process SFT: {seconds:.1f} s")


def test_batch_must_split_over_the_processes_and_the_command_names_them(tmp_path):
    with pytest.raises(ValueError, match=r"set sft.batch_size to 6"):
        check_batches(7, 3, 2, "sft")
    cmd = launch_command(tmp_path / "job.json", 2, None)
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-3:] == [
        "-m",
        "caiflow.training.launch",
        str(tmp_path / "job.json"),
    ]
    cmd = launch_command(tmp_path / "job.json", 4, tmp_path / "zero2.yaml")
    assert cmd[cmd.index("--config_file") + 1] == str(tmp_path / "zero2.yaml") and "--multi_gpu" not in cmd
