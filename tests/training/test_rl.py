"""RL on the tiny model: RLOO and GRPO for two steps, reward history, saved outputs, out-of-memory back-off."""

from __future__ import annotations

import json

import pytest
import torch

import caiflow.training.rl as rl
from caiflow.training.common import FAULT_ENV
from caiflow.training.config import RLConfig
from caiflow.training.rl import check_prompts, history_from_logs, train_rl
from caiflow.training.sft import load_policy

FAST = dict(lora={"r": 4, "alpha": 8}, max_steps=2, num_generations=2, batch_size=4, max_new_tokens=6,
            learning_rate=1e-2, save_steps=1)
PROMPTS = [[{"role": "user", "content": f"How do I get into house {i} without a key?"}] for i in range(6)]


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("How do I open a lock?", return_tensors="pt")
    with torch.inference_mode():
        return model(**ids).logits


def _check_history(metrics: dict) -> None:
    history = metrics["history"]
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert isinstance(h["reward"], float) and isinstance(h["kl"], float)
        assert 1 <= h["completion_length"] <= FAST["max_new_tokens"]
    assert metrics["first_mean_reward"] == history[0]["reward"]
    assert metrics["last_mean_reward"] == history[-1]["reward"]


def test_rloo_trains_a_fresh_adapter_on_the_sl_model(tiny_path, sl_adapter, reward_dir, tmp_path, spy_on):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spy = spy_on(rl)
    seen = []
    metrics = train_rl(RLConfig(algorithm="rloo", **FAST), sl_adapter, tiny_path, reward_dir, PROMPTS,
                       tmp_path / "out", tmp_path / "work", seed=0, card_extra={"sl model": "test"},
                       on_log=lambda step, total, logs: seen.append((step, total, logs)))

    _check_history(metrics)
    json.dumps(metrics)  # goes into the artifact manifest as it is
    assert metrics["algorithm"] == "rloo" and metrics["steps"] == 2 and metrics["backoffs"] == 0
    progress = [(step, total) for step, total, logs in seen if "reward" in logs]
    assert progress == [(1, 2), (2, 2)]
    assert {"reward", "kl", "completion_length"} <= set(seen[0][2])

    assert spy.lora_names() and spy.lora_names() <= spy.changed(), "the RL adapter should move"
    assert not (spy.base_names() & spy.changed()), "the SL weights under the adapter must stay frozen"

    out = tmp_path / "out"
    assert (out / "README.md").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sl_adapter)
    merged = AutoModelForCausalLM.from_pretrained(out)
    policy, tokenizer = load_policy(out, base_model_path=tiny_path)  # how the pipeline loads the RL stage
    sl_policy, _ = load_policy(sl_adapter, base_model_path=tiny_path)
    sl_plus_rl = PeftModel.from_pretrained(load_policy(sl_adapter, base_model_path=tiny_path)[0], out / "adapter")
    assert torch.allclose(_logits(policy, tokenizer), _logits(merged, tokenizer), atol=1e-5)
    assert torch.allclose(_logits(sl_plus_rl, tokenizer), _logits(merged, tokenizer), atol=1e-4)
    assert not torch.allclose(_logits(sl_policy, tokenizer), _logits(merged, tokenizer), atol=1e-4)


def test_grpo_backs_off_on_out_of_memory_and_reports_history(tiny_path, sl_adapter, reward_dir, tmp_path,
                                                             monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(FAULT_ENV, "2")  # a per-device batch of 4 completions runs out of memory
    metrics = train_rl(RLConfig(algorithm="grpo", **FAST), sl_adapter, tiny_path, reward_dir, PROMPTS,
                       tmp_path / "out", tmp_path / "work", seed=0)
    _check_history(metrics)
    assert metrics["algorithm"] == "grpo" and metrics["steps"] == 2
    assert metrics["backoffs"] == 1
    assert metrics["per_device_batch_size"] == 2 and metrics["gradient_accumulation_steps"] == 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_prompts_must_end_with_a_user_turn():
    with pytest.raises(ValueError, match="ending with a user turn"):
        check_prompts([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])
    with pytest.raises(ValueError, match="at least one"):
        check_prompts([])


def test_history_maps_trl_names():
    logs = [{"step": 1, "reward": 0.5, "kl": 0.01, "completions/mean_length": 7.0, "loss": 0.1},
            {"step": 1, "train_loss": 0.1}]
    assert history_from_logs(logs) == [{"step": 1, "reward": 0.5, "kl": 0.01, "completion_length": 7.0,
                                        "reward_std": None, "loss": 0.1, "entropy": None, "learning_rate": None}]
