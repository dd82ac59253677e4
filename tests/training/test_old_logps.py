"""RLOO's old log-probabilities from the pass that trains: the same run as TRL's own three passes, in two."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from trl import RLOOTrainer

import caiflow.training.old_logps as old_logps
from caiflow.training.config import RLConfig
from caiflow.training.rl import train_rl
from tests.training.test_rl import FAST, PROMPTS

SETTINGS = {**FAST, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}  # rl.disable_dropout turns it off


def _adapter(out_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("bf16_autocast", [False, True])
def test_rloo_takes_its_old_log_probabilities_from_the_trained_pass(
    bf16_autocast, tiny_path, sl_adapter, reward_dir, tmp_path, monkeypatch
):
    """The policy runs twice per step (the trained pass, the reference) instead of three times, and the run is
    the one TRL's own old pass gives: the same rewards, KL and loss per step, the same adapter weights."""
    passes: list[bool] = []  # per policy pass: did it record gradients?
    real = RLOOTrainer._get_per_token_logps_and_entropies

    def counted(self, *args, **kwargs):
        passes.append(torch.is_grad_enabled())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RLOOTrainer, "_get_per_token_logps_and_entropies", counted)
    runs = {}
    for way, reason in (("fused", None), ("own", "the test asks for it")):
        monkeypatch.setattr(old_logps, "own_pass_reason", lambda trainer, reason=reason: reason)
        passes.clear()
        runs[way] = train_rl(
            RLConfig(**SETTINGS, bf16_autocast=bf16_autocast),
            sl_adapter,
            tiny_path,
            reward_dir,
            PROMPTS,
            tmp_path / way,
            tmp_path / f"work-{way}",
            seed=0,
        )
        runs[way]["passes"] = list(passes)
    fused, own = runs["fused"], runs["own"]
    assert fused["old_logps"] == "trained pass"
    assert own["old_logps"] == "own pass (the test asks for it)"
    # per step, fused: the trained pass (with gradients), the reference; TRL's: old, reference, trained
    assert fused["passes"] == [True, False] * SETTINGS["max_steps"]
    assert own["passes"] == [False, False, True] * SETTINGS["max_steps"]
    for key in ("reward", "kl", "loss"):
        assert [h[key] for h in fused["history"]] == pytest.approx([h[key] for h in own["history"]], abs=1e-6)
    assert fused["history"][-1]["kl"] != 0.0  # the policy left the reference: the KL compared means something
    a, b = _adapter(tmp_path / "fused"), _adapter(tmp_path / "own")
    assert a.keys() == b.keys()
    # the same up to rounding (TRL's ratio is exp(0) up to it; Adam divides by the gradients' size)
    assert max(b[name].abs().max() for name in b if "lora_B" in name) > 1e-3  # lora_B started at zero
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def _trainer(**args) -> SimpleNamespace:
    defaults = dict(disable_dropout=True, steps_per_generation=1, gradient_checkpointing=False)
    return SimpleNamespace(args=SimpleNamespace(**{**defaults, **args}), num_iterations=1)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ({}, None),
        ({"disable_dropout": False}, "dropout is on"),
        ({"steps_per_generation": 2}, "several passes or iterations"),  # OOM back-off's accumulation
        ({"gradient_checkpointing": True}, "gradient checkpointing"),
    ],
)
def test_the_old_pass_is_its_own_where_the_two_passes_differ(args, reason):
    got = old_logps.own_pass_reason(_trainer(**args))
    assert got is None if reason is None else reason in got
