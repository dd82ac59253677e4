"""Typed settings of the three training steps: SFT, reward model, RL.

Every field says what it does. Per-device batch sizes, checkpoint and logging cadence are not
fingerprinted: a smaller per-device batch with more gradient accumulation computes the same
update up to float rounding. The effective batch size *is* fingerprinted: it changes the
optimisation.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from caiflow.sections import Section, by_content, not_fingerprinted


def gradient_checkpointing_field() -> Any:
    """The same setting in every training section: not fingerprinted, it changes memory, not results."""
    return not_fingerprinted(
        False,
        description="Recompute each layer's activations in the backward pass instead of keeping them: "
        "much less memory for ~30% more compute; the same update (what `caiflow memory` counts).",
    )


def bf16_autocast_field() -> Any:
    """The same setting in every training section. 'auto' is resolved to true or false when a run is
    planned (`caiflow.plan.resolve_auto_settings`), so the fingerprint holds what ran."""
    return Field(
        "auto",
        description="Train under bfloat16 autocast (weights and optimiser state stay in model.dtype). "
        "'auto': on where it pays: a GPU with bf16, or a CPU with native bfloat16 whose bfloat16 products "
        "run at least 1.25x its float32 ones (measured once per machine and kept in ~/.cache/caiflow; some "
        "AVX512-BF16 CPUs run them slower), for a float32 model; true: on (an error where the hardware has "
        "no bf16); false: off. Changes the numbers, so what it resolves to is fingerprinted.",
    )


class LoraSettings(Section):
    r: int = Field(16, ge=1, description="LoRA rank: width of the low-rank update (higher = more capacity).")
    alpha: int = Field(
        32, ge=1, description="LoRA alpha: the update is scaled by alpha / r (2x rank is the usual choice)."
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: 'all-linear' (every linear layer but the output head) "
        "or a list of names.",
    )


class SFTConfig(Section):
    method: Literal["lora", "qlora", "full"] = Field(
        "lora",
        description="'lora': adapters on a full-precision base; 'qlora': adapters on a 4-bit (nf4) base; "
        "'full': all weights.",
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="Adapter shape for 'lora' and 'qlora'."
    )
    learning_rate: float = Field(
        2e-4, gt=0, description="Peak learning rate (2e-4 suits LoRA; use ~1e-5 for 'full')."
    )
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training set (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimiser steps (overrides epochs)."
    )
    batch_size: int = Field(8, ge=1, description="Effective batch size (sequences per optimiser step).")
    per_device_batch_size: int = not_fingerprinted(
        4,
        ge=1,
        description="Sequences per forward pass; the rest comes from gradient accumulation. "
        "Halved on out-of-memory.",
    )
    max_length: int = Field(
        512, ge=8, description="Longest training sequence in tokens (longer ones are truncated)."
    )
    benign_ratio: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="Share of benign plain answers in the training mix (keeps the model helpful); "
        "0 = red-team only.",
    )
    merge: bool = Field(False, description="Also save the adapter merged into full weights under merged/.")
    packing: bool = Field(
        False,
        description="Pack several short examples into each max_length sequence (TRL best-fit-decreasing, "
        "padding-free; position ids keep the examples apart in attention): fewer padded tokens per step, "
        "but fewer, fuller optimiser steps per epoch, so a different run.",
    )
    bf16_autocast: bool | Literal["auto"] = bf16_autocast_field()
    gradient_checkpointing: bool = gradient_checkpointing_field()
    save_steps: int = not_fingerprinted(
        50, ge=1, description="Checkpoint every this many steps (resume point after a crash)."
    )
    logging_steps: int = not_fingerprinted(
        10, ge=1, description="Log training metrics every this many steps."
    )

    @model_validator(mode="after")
    def _batches(self) -> SFTConfig:
        _check_batches(self.batch_size, self.per_device_batch_size, "sft")
        return self


class RewardModelConfig(Section):
    backbone: str | None = by_content(
        None,
        description="Model the reward model starts from (a folder or model name); "
        "None = the policy's base model.",
    )
    method: Literal["lora", "qlora", "full"] = Field(
        "lora",
        description="'lora': adapters + a trainable score head; 'qlora': the same on a 4-bit (nf4) "
        "backbone (needs shared_backbone); 'full': all weights.",
    )
    shared_backbone: bool = Field(
        False,
        description="Keep each member as a LoRA adapter with its score head and score them on one "
        "shared frozen backbone, switching adapters (one backbone in memory instead of "
        "ensemble_size full models); false: each member is saved merged, as a full model.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter shape for 'lora'.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training pairs (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimiser steps (overrides epochs)."
    )
    batch_size: int = Field(
        8, ge=1, description="Effective batch size in preference pairs per optimiser step."
    )
    per_device_batch_size: int = not_fingerprinted(
        4, ge=1, description="Pairs per forward pass; halved on out-of-memory."
    )
    max_length: int = Field(
        512, ge=8, description="Pairs with a side longer than this many tokens are dropped."
    )
    ensemble_size: int = Field(
        1, ge=1, description="Number of reward models; more gives a conservative (uncertainty-aware) score."
    )
    ensemble_mode: Literal["seeds", "principles"] = Field(
        "seeds",
        description="'seeds': members differ by seed (same data); "
        "'principles': member k trains on its own share of the principles.",
    )
    ensemble_lambda: float = Field(
        0.5, ge=0.0, description="Ensemble score = mean - lambda * std across members (0 = plain mean)."
    )
    eval_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of pairs held out for accuracy and calibration."
    )
    balance_kinds: bool = Field(
        False,
        description="Weight each training pair's loss so every pair kind (contrastive-red-team, "
        "contrastive-benign, feedback) counts as much in total: with twice as many benign pairs (answer "
        "beats refusal) as red-team ones (refusal beats answer), the reward model otherwise learns that "
        "refusing is bad wherever it is asked, instead of when.",
    )
    gradient_checkpointing: bool = gradient_checkpointing_field()
    bf16_autocast: bool | Literal["auto"] = bf16_autocast_field()
    save_steps: int = not_fingerprinted(50, ge=1, description="Checkpoint every this many steps.")
    logging_steps: int = not_fingerprinted(
        10, ge=1, description="Log training metrics every this many steps."
    )

    @model_validator(mode="after")
    def _batches(self) -> RewardModelConfig:
        _check_batches(self.batch_size, self.per_device_batch_size, "reward_model")
        if self.method == "qlora" and not self.shared_backbone:
            raise ValueError(
                "reward_model.method 'qlora' keeps members as adapters on a 4-bit backbone "
                "(merging into 4-bit weights would round them): set reward_model.shared_backbone to true."
            )
        return self


class RLConfig(Section):
    algorithm: Literal["rloo", "grpo"] = Field(
        "rloo",
        description="'rloo': REINFORCE leave-one-out (critic-free); "
        "'grpo': group-relative clipped surrogate.",
    )
    method: Literal["lora", "qlora"] = Field(
        "lora",
        description="'lora': the adapter on the SL policy in model.dtype; 'qlora': on the SL policy "
        "quantised to 4-bit nf4 (the KL reference is quantised too).",
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings, description="Adapter trained on top of the SL model."
    )
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    kl_coef: float = Field(
        0.05, ge=0.0, description="KL penalty (beta) towards the SL model; 0 drops the reference model."
    )
    num_generations: int = Field(
        4, ge=2, description="Completions sampled per prompt (the group the baseline is taken over)."
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest sampled completion, in tokens.")
    temperature: float = Field(0.9, gt=0.0, description="Sampling temperature of the completions.")
    rollouts: Literal["engine", "trl"] = Field(
        "engine",
        description="What samples the completions: 'engine', caiflow's generation engine on the policy "
        "with its adapter's update added into float32 copies of the weights (faster; no LoRA dropout while "
        "sampling; the adapter stays live for 16-bit weights; TRL's way where the engine cannot stand in, "
        "the step's metrics say which); 'trl', TRL's generate on the live adapter. Fingerprinted.",
    )
    disable_dropout: bool = Field(
        True,
        description="No dropout in RL (TRL's disable_dropout): the policy that samples, the one whose "
        "log-probabilities TRL takes for the KL and the one trained are then one function, as the "
        "engine's rollouts (which run without dropout) assume; false: the adapter's lora.dropout in "
        "every training pass.",
    )
    max_steps: int = Field(20, ge=1, description="Optimiser steps.")
    batch_size: int = Field(
        8,
        ge=1,
        description="Completions per optimiser step, the effective batch (prompts per step = batch_size / "
        "num_generations).",
    )
    per_device_batch_size: int | None = not_fingerprinted(
        None,
        ge=1,
        description="Completions per forward pass (null: the whole batch); "
        "the rest is gradient accumulation. "
        "Halved on out-of-memory.",
    )
    scoring_batch_size: int = not_fingerprinted(
        8, ge=1, description="Completions the reward model scores per forward pass."
    )
    gradient_checkpointing: bool = gradient_checkpointing_field()
    bf16_autocast: bool | Literal["auto"] = bf16_autocast_field()
    save_steps: int = not_fingerprinted(10, ge=1, description="Checkpoint every this many steps.")
    logging_steps: int = not_fingerprinted(
        1, ge=1, description="Log reward, KL and length every this many steps."
    )

    @model_validator(mode="after")
    def _groups(self) -> RLConfig:
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"rl.batch_size ({self.batch_size}) must be a multiple of "
                f"rl.num_generations ({self.num_generations}): "
                "set rl.batch_size to "
                f"{self.num_generations * max(1, self.batch_size // self.num_generations)}."
            )
        if self.per_device_batch_size is not None:
            _check_batches(self.batch_size, self.per_device_batch_size, "rl")
        return self


def _check_batches(batch: int, per_device: int, section: str) -> None:
    if per_device > batch or batch % per_device:
        raise ValueError(
            f"{section}.batch_size ({batch}) must be a multiple of "
            f"{section}.per_device_batch_size ({per_device}): "
            f"the rest is gradient accumulation. Set per_device_batch_size to a divisor of batch_size."
        )
