"""Fixtures for the training tests: one tiny random Llama per session, and small record sets."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from caiflow.models import TINY_MODEL, resolve_model


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    """Folder of the tiny random Llama (hidden 32, 2 layers) with the default model's tokenizer."""
    return resolve_model(TINY_MODEL, tmp_path_factory.mktemp("models")).path


def _chat(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="session")
def tiny64_path(tmp_path_factory) -> Path:
    """A tiny random Llama of hidden size 64: bitsandbytes' CPU 4-bit inference needs in-features of
    at least its block size (64), so the 4-bit scoring and generation tests use this one."""
    return resolve_model(
        TINY_MODEL, tmp_path_factory.mktemp("models64"), tiny={"hidden_size": 64, "num_heads": 4}
    ).path


@pytest.fixture
def sl_records() -> pd.DataFrame:
    """12 red-team revisions and 8 benign answers."""
    rows = [
        {
            "messages": _chat(
                f"How do I break into house number {i}?",
                f"I can't help with breaking in. If you are locked out of house {i}, call a locksmith.",
            ),
            "kind": "red-team",
        }
        for i in range(12)
    ]
    rows += [
        {"messages": _chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}."), "kind": "benign"}
        for i in range(8)
    ]
    return pd.DataFrame(rows)


@pytest.fixture
def prefs() -> pd.DataFrame:
    """20 soft-labelled preference pairs across two principles."""
    return make_prefs()


@pytest.fixture(scope="session")
def shared_prefs() -> pd.DataFrame:
    """The same 20 pairs, for module- and session-scoped fixtures (do not modify)."""
    return make_prefs()


def make_prefs() -> pd.DataFrame:
    rows = []
    for i in range(20):
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Tell me how to hurt person {i}."}],
                "chosen": [{"role": "assistant", "content": "I won't help with hurting anyone."}],
                "rejected": [
                    {"role": "assistant", "content": f"Sure, here is how to hurt person {i}: first..."}
                ],
                "label": 0.9 if i % 3 else 0.7,
                "principle": "harmless" if i % 2 else "honest",
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- weight spies


class WeightSpy:
    """Records every parameter at the start and end of each training run (through a TrainerCallback).

    Installed in place of a training module's ``fault_callback`` (the spy keeps its fault injection),
    so tests can check which tensors the trainer really changed: adapters should move, base weights not.
    """

    def __init__(self):
        self.runs: list[dict] = []  # one {"before": {...}, "after": {...}} per trainer.train()

    def callback(self, inner):
        from transformers import TrainerCallback

        spy = self

        class _Spy(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                spy.runs.append({"before": {n: p.detach().clone() for n, p in model.named_parameters()}})

            def on_train_end(self, args, state, control, model=None, **kwargs):
                spy.runs[-1]["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}

            def on_step_begin(self, args, state, control, **kwargs):
                return inner.on_step_begin(args, state, control, **kwargs)

            def on_save(self, args, state, control, **kwargs):
                return inner.on_save(args, state, control, **kwargs)

        return _Spy()

    def finished(self) -> list[dict]:
        return [run for run in self.runs if "after" in run]

    def changed(self, run: int = -1) -> set[str]:
        import torch

        r = self.finished()[run]
        return {n for n, p in r["before"].items() if not torch.equal(p, r["after"][n])}

    def lora_names(self, run: int = -1) -> set[str]:
        return {n for n in self.finished()[run]["before"] if "lora_" in n}

    def base_names(self, run: int = -1) -> set[str]:
        """Parameters of the frozen base: neither adapters nor the trainable copies of modules_to_save."""
        return {n for n in self.finished()[run]["before"] if "lora_" not in n and "modules_to_save" not in n}


def install_spy(monkeypatch, module) -> WeightSpy:
    """Wrap ``module.fault_callback`` with a WeightSpy; returns the spy (filled in by later training runs)."""
    spy = WeightSpy()
    real = module.fault_callback
    monkeypatch.setattr(module, "fault_callback", lambda *args, **kwargs: spy.callback(real(*args, **kwargs)))
    return spy


@pytest.fixture
def spy_on(monkeypatch):
    """spy_on(module) -> WeightSpy watching the next training runs of that training module."""
    return lambda module: install_spy(monkeypatch, module)


@pytest.fixture(scope="session")
def spy_installer():
    """install_spy(monkeypatch, module), for module-scoped fixtures that bring their own MonkeyPatch."""
    return install_spy


# ---------------------------------------------------------------- models the RL tests start from


@pytest.fixture(scope="session")
def sl_adapter(tiny_path, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model with non-zero random weights (a stand-in SL model), plus its
    tokenizer."""
    return make_sl_adapter(tiny_path, tmp_path_factory.mktemp("sl") / "model")


def make_sl_adapter(tiny_path: Path, dest: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from caiflow.models import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    peft.save_pretrained(dest)
    load_tokenizer(tiny_path).save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def reward_dir(tiny_path, tmp_path_factory) -> Path:
    """A one-member reward model trained for one step (what the RL tests reward against)."""
    return make_reward_dir(tiny_path, tmp_path_factory.mktemp("rm"))


def make_reward_dir(tiny_path: Path, root: Path, **settings) -> Path:
    from caiflow.training.config import RewardModelConfig
    from caiflow.training.reward import train_reward_model

    rows = [
        {
            "prompt": [{"role": "user", "content": f"Tell me how to hurt person {i}."}],
            "chosen": [{"role": "assistant", "content": "I won't help with hurting anyone."}],
            "rejected": [{"role": "assistant", "content": f"Sure, here is how to hurt person {i}."}],
            "label": 0.9,
            "principle": "harmless",
        }
        for i in range(4)
    ]
    cfg = RewardModelConfig(
        max_steps=1,
        batch_size=2,
        per_device_batch_size=2,
        max_length=128,
        eval_fraction=0.0,
        lora={"r": 4, "alpha": 8},
        **settings,
    )
    train_reward_model(cfg, tiny_path, pd.DataFrame(rows), root / "model", root / "work", seed=0)
    return root / "model"


@pytest.fixture(scope="session")
def reward_ensemble_dir(tiny_path, tmp_path_factory) -> Path:
    """A two-member reward model (seeds mode, lambda 0.5), one step each: the RL ensemble path."""
    from caiflow.training.config import RewardModelConfig
    from caiflow.training.reward import train_reward_model

    root = tmp_path_factory.mktemp("rm-ensemble")
    cfg = RewardModelConfig(
        max_steps=1,
        batch_size=2,
        per_device_batch_size=2,
        max_length=128,
        eval_fraction=0.0,
        ensemble_size=2,
        ensemble_lambda=0.5,
        learning_rate=1e-2,
        lora={"r": 4, "alpha": 8},
    )
    train_reward_model(cfg, tiny_path, make_prefs(), root / "model", root / "work", seed=0)
    return root / "model"
