"""Supervised fine-tuning on the tiny model: LoRA, QLoRA (4-bit on CPU), full, resume and
out-of-memory back-off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import caiflow.training.sft as sft
from caiflow.faults import KILL_ENV
from caiflow.faults import OOM_ABOVE_ENV as FAULT_ENV
from caiflow.models import load_policy
from caiflow.training.common import load_base_for_training
from caiflow.training.config import SFTConfig
from caiflow.training.sft import mix_records, to_prompt_completion, train_sft

ROOT = Path(__file__).resolve().parents[2]
# A high learning rate so two steps visibly move the adapter of a random model.
FAST = dict(
    max_steps=2,
    batch_size=4,
    per_device_batch_size=2,
    max_length=96,
    learning_rate=1e-2,
    save_steps=1,
    logging_steps=1,
    lora={"r": 4, "alpha": 8},
)


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("How do I open a lock?", return_tensors="pt")
    with torch.inference_mode():
        return model(**ids).logits


def test_lora_moves_adapter_not_base_and_every_output_loads(tiny_path, sl_records, tmp_path, spy_on):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spy = spy_on(sft)
    cfg = SFTConfig(method="lora", merge=True, **FAST)
    metrics = train_sft(
        cfg,
        tiny_path,
        sl_records,
        tmp_path / "out",
        tmp_path / "work",
        seed=0,
        card_extra={"constitution": "test"},
    )

    assert spy.lora_names() and spy.lora_names() <= spy.changed(), "every LoRA tensor should have moved"
    assert not (spy.base_names() & spy.changed()), "base weights must stay frozen"
    assert (
        metrics["steps"] == 2 and metrics["backoffs"] == 0 and metrics["rows"] == 16
    )  # 12 red-team + 4 benign
    assert metrics["red_team_rows"] == 12 and metrics["benign_rows"] == 4

    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and (out / "README.md").is_file()
    assert not (out / "training_args.bin").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    policy, tokenizer = load_policy(out, base_model_path=tiny_path)
    assert tokenizer.padding_side == "left"
    assert torch.allclose(_logits(tuned, tokenizer), _logits(merged, tokenizer), atol=1e-4)
    assert torch.allclose(_logits(policy, tokenizer), _logits(merged, tokenizer), atol=1e-4)
    assert not torch.allclose(_logits(base, tokenizer), _logits(merged, tokenizer), atol=1e-4)


def test_qlora_loads_4bit_on_cpu_and_trains(tiny_path, sl_records, tmp_path, spy_on):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quantised = load_base_for_training(tiny_path, "qlora")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quantised.modules())
    del quantised

    spy = spy_on(sft)
    metrics = train_sft(
        SFTConfig(method="qlora", **FAST), tiny_path, sl_records, tmp_path / "out", tmp_path / "work", seed=0
    )
    assert metrics["steps"] == 2
    assert spy.lora_names() <= spy.changed() and not (spy.base_names() & spy.changed())
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), tmp_path / "out")
    policy, tokenizer = load_policy(tmp_path / "out", base_model_path=tiny_path)
    assert torch.allclose(_logits(tuned, tokenizer), _logits(policy, tokenizer), atol=1e-4)


def test_full_fine_tuning_writes_full_weights(tiny_path, sl_records, tmp_path):
    from transformers import AutoModelForCausalLM

    train_sft(
        SFTConfig(method="full", **{**FAST, "max_steps": 1, "learning_rate": 1e-3}),
        tiny_path,
        sl_records,
        tmp_path / "out",
        tmp_path / "work",
        seed=0,
    )
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    base, tuned = AutoModelForCausalLM.from_pretrained(tiny_path), AutoModelForCausalLM.from_pretrained(out)
    moved = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert moved, "full fine-tuning should change the model's own weights"
    policy, _ = load_policy(out)
    assert isinstance(policy, type(tuned))


def test_killed_then_out_of_memory_resumes_from_the_checkpoint_with_a_smaller_batch(
    tiny_path, sl_records, tmp_path, monkeypatch
):
    """SIGKILL right after checkpoint 1 (what the kernel's OOM killer does); the rerun resumes from there and,
    hitting out-of-memory at 2 sequences per pass, halves the per-device batch and doubles accumulation."""
    sl_records.to_pickle(tmp_path / "records.pkl")
    script = (
        "import sys, pandas as pd\n"
        "from caiflow.training.config import SFTConfig\n"
        "from caiflow.training.sft import train_sft\n"
        f"cfg = SFTConfig(method='lora', **{FAST!r})\n"
        "train_sft(cfg, sys.argv[1], pd.read_pickle(sys.argv[2]), sys.argv[3], sys.argv[4], seed=0)\n"
    )
    env = {**os.environ, KILL_ENV: "sft:checkpoint:1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tiny_path),
            str(tmp_path / "records.pkl"),
            str(tmp_path / "out"),
            str(tmp_path / "work"),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert (tmp_path / "work" / "checkpoint-1").is_dir() and not (tmp_path / "out" / "README.md").exists()

    monkeypatch.setenv(
        FAULT_ENV, "1"
    )  # any step with more than 1 sequence per forward pass runs out of memory
    metrics = train_sft(
        SFTConfig(method="lora", **FAST), tiny_path, sl_records, tmp_path / "out", tmp_path / "work", seed=0
    )
    assert metrics["resumed_from"] == "checkpoint-1" and metrics["steps"] == 2
    assert metrics["backoffs"] == 1
    assert (
        metrics["per_device_batch_size"] == 1 and metrics["gradient_accumulation_steps"] == 4
    )  # same effective 4


def test_bad_records_say_what_to_fix(sl_records):
    with pytest.raises(ValueError, match="lack column"):
        mix_records(sl_records.drop(columns=["kind"]), 0.25, seed=0)
    with pytest.raises(ValueError, match="end with the assistant"):
        to_prompt_completion([{"role": "user", "content": "hi"}])
    mixed = mix_records(sl_records, 0.25, seed=0)
    assert (mixed["kind"] == "benign").sum() == 4 and len(mixed) == 16


def _adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_per_device_batch_does_not_change_the_adapter(tiny_path, sl_records, tmp_path):
    """sft.per_device_batch_size is not fingerprinted: the same effective batch by accumulation gives the same
    adapter, up to float rounding. (With LoRA dropout on, the dropout masks are drawn per forward pass and so
    differ too: dropout is off here to compare the optimisation alone.) Adam divides by the gradient's own
    size, so a weight whose gradient is at rounding level moves by a rounding-driven share of the learning
    rate (1e-2 here): up to 2.5e-5 apart on one machine, against ~1e-2 for a tenth of the learning rate.
    In float32: under bf16 autocast (`bf16_autocast: auto` where it pays) they agree to bfloat16 rounding."""
    settings = {**FAST, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "bf16_autocast": False}
    train_sft(
        SFTConfig(method="lora", **settings), tiny_path, sl_records, tmp_path / "a", tmp_path / "wa", seed=0
    )
    train_sft(
        SFTConfig(method="lora", **{**settings, "per_device_batch_size": 1}),
        tiny_path,
        sl_records,
        tmp_path / "b",
        tmp_path / "wb",
        seed=0,
    )
    a, b = _adapter_tensors(tmp_path / "a"), _adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-4) for k in a)
    untrained = SFTConfig(method="lora", **{**settings, "learning_rate": 1e-3})  # the comparison can fail:
    train_sft(untrained, tiny_path, sl_records, tmp_path / "c", tmp_path / "wc", seed=0)
    c = _adapter_tensors(tmp_path / "c")
    assert not all(torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-4) for k in a)


def test_packing_fills_sequences_and_still_trains_the_adapter(tiny_path, sl_records, tmp_path, spy_on):
    """Packed, one epoch takes fewer steps (several short rows per sequence); the adapter moves as usual."""
    settings = {k: v for k, v in FAST.items() if k != "max_steps"}
    plain = train_sft(
        SFTConfig(method="lora", epochs=1, **settings),
        tiny_path,
        sl_records,
        tmp_path / "a",
        tmp_path / "wa",
        seed=0,
    )
    spy = spy_on(sft)
    packed = train_sft(
        SFTConfig(
            method="lora", epochs=1, packing=True, bf16_autocast=True, **{**settings, "max_length": 256}
        ),
        tiny_path,
        sl_records,
        tmp_path / "b",
        tmp_path / "wb",
        seed=0,
    )
    assert plain["steps"] == 4  # 16 rows, 4 per step
    assert packed["steps"] < plain["steps"]
    # LoRA's B starts at zero, so A moves from the second step on; one packed step moves every B
    moved_b = {n for n in spy.lora_names() if "lora_B" in n}
    assert moved_b and moved_b <= spy.changed()
    assert not (spy.base_names() & spy.changed())


def test_bf16_autocast_needs_native_bf16(monkeypatch, tmp_path):
    from trl import SFTConfig as TRLSFTConfig

    import caiflow.training.common as common
    import caiflow.training.precision as precision

    monkeypatch.setattr(precision, "bf16_supported", lambda: True)
    args = common.trainer_args(
        TRLSFTConfig,
        tmp_path,
        seed=0,
        learning_rate=1e-4,
        per_device=1,
        accumulation=1,
        max_steps=1,
        bf16_autocast=True,
    )
    assert args.bf16
    monkeypatch.setattr(precision, "bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="reward_model.bf16_autocast / rl.bf16_autocast to false or auto"):
        precision.check_bf16(True)
    assert precision.check_bf16(False) is False
    assert precision.check_bf16("auto") is False  # no native bf16: auto is off, not an error


def test_bf16_autocast_auto_follows_the_measured_rates(monkeypatch):
    """'auto' is on only where bfloat16 products beat float32 by BF16_MIN_GAIN, for a float32 model."""
    import caiflow.training.precision as precision

    monkeypatch.setattr(precision, "has_cuda", lambda: False)
    monkeypatch.setattr(precision, "bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "_BF16_RATES", {"bfloat16": 430.0, "float32": 225.0})
    assert precision.resolve_bf16_autocast("auto") is True
    assert precision.resolve_bf16_autocast("auto", "bfloat16") is False  # 16-bit weights: nothing to gain
    assert precision.resolve_bf16_autocast(False) is False and precision.resolve_bf16_autocast(True) is True
    monkeypatch.setattr(precision, "_BF16_RATES", {"bfloat16": 130.0, "float32": 225.0})  # slower bf16 CPUs
    assert precision.resolve_bf16_autocast("auto") is False
    monkeypatch.setattr(precision, "_BF16_RATES", {"bfloat16": 1.2 * 225.0, "float32": 225.0})
    assert precision.resolve_bf16_autocast("auto") is False  # under the 1.25x bar


def test_bf16_rates_are_measured_once_per_machine_and_remembered(monkeypatch, tmp_path):
    """Every run on a machine decides 'auto' alike: the products are timed once (interleaved) and
    kept in the machine cache, whatever load a later run meets; an unreadable file is measured again."""
    import caiflow.training.precision as precision

    monkeypatch.setenv("CAIFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "has_cuda", lambda: False)
    monkeypatch.setattr(precision, "_BF16_RATES", {})
    rates = precision.bf16_rates()
    assert set(rates) == {"bfloat16", "float32"} and min(rates.values()) > 0
    kept = json.loads((tmp_path / "cache" / "precision.json").read_text())
    assert kept == {precision.machine_key(): rates}

    def no_second_measurement(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(precision, "measure_rates", no_second_measurement)
    assert precision.bf16_rates() == rates  # this process: its own figures
    monkeypatch.setattr(precision, "_BF16_RATES", {})  # a new process on the same machine
    assert precision.bf16_rates() == rates
    (tmp_path / "cache" / "precision.json").write_text("{not json")
    monkeypatch.setattr(precision, "_BF16_RATES", {})
    monkeypatch.setattr(precision, "measure_rates", lambda: {"bfloat16": 1.0, "float32": 2.0})
    assert precision.bf16_rates() == {"bfloat16": 1.0, "float32": 2.0}
    assert json.loads((tmp_path / "cache" / "precision.json").read_text()) == {
        precision.machine_key(): {"bfloat16": 1.0, "float32": 2.0}
    }
