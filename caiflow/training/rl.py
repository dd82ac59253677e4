"""Step 6: RL from the SL model against the reward model (TRL RLOOTrainer by default, GRPOTrainer on request).

The policy starts from the SL model: a full model folder as it is, or a LoRA adapter merged into
its base in memory. A fresh LoRA adapter (``cfg.lora``) is trained on top; with the adapter
disabled the model *is* the SL model, so TRL uses it as the KL reference (``beta = cfg.kl_coef``)
without a second copy in memory. Completions are rewarded by
:class:`~caiflow.training.reward_scorer.RewardScorer` (an ensemble scores mean - lambda * std).
RLOO puts the KL into the reward (sequence-level log-ratio); GRPO adds it to the per-token loss.
RLOO's old log-probabilities come from the pass that trains where the two are one function
(``caiflow.training.old_logps``).
With ``cfg.rollouts == "engine"`` (the default) the completions are sampled by caiflow's
generation engine on the adapter merged into copies of the weights (``caiflow.training.rollouts``);
``"trl"`` keeps TRL's own ``generate``.

Batches: ``cfg.batch_size`` completions (``batch_size / num_generations`` prompts) per optimiser
step, ``cfg.per_device_batch_size`` of them per forward pass, the rest by gradient accumulation;
the reward model scores ``cfg.scoring_batch_size`` at a time. On out-of-memory the per-device
batch halves and gradient accumulation doubles;
TRL generates once per optimiser step for per-device x accumulation completions, so the groups and
the result stay the same. Checkpoints (the adapter and optimiser state) live in ``work_dir``.

``method: qlora`` (the 7B preset) loads the SL policy's full weights (SFT's ``merged/``, or the
SL adapter merged once into ``work_dir/sl-merged``) quantised to 4-bit nf4 and trains the adapter
on that (the KL reference, the adapter switched off, is the 4-bit SL policy); the saved policy is
the adapter merged into a full-precision reload of the SL policy on the CPU.

Multi-GPU: this step runs in one process on one GPU (`launch.num_processes` applies to SFT and
the reward model only). TRL's RLOO and GRPO trainers scale out with vLLM generation, either a
server on its own GPU (``trl vllm-serve``; ``use_vllm=True, vllm_mode="server"``) or colocated in
each training process (``vllm_mode="colocate"`` under ``accelerate launch``); caiflow does not set
either up yet, and the reward scorer would then run on every process.

Output layout (``out_dir``)::

    model.safetensors, config.json, ...   the RL policy with the adapter merged in (full weights):
                                          AutoModelForCausalLM.from_pretrained(out_dir) and
                                          caiflow.models.load_policy(out_dir) load it directly
    tokenizer files                       the SL model's tokenizer
    adapter/                              the RL LoRA adapter alone; its base is the SL policy
                                          (PeftModel.from_pretrained(
                                          load_policy(sl_model_path)[0], out_dir/"adapter"))
    README.md                             model card with the reward history summary
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from caiflow.training.common import (
    fault_callback,
    has_cuda,
    load_base_for_training,
    log_history_value,
    log_to_logger,
    lora_config,
    quiet_libraries,
    score_labelled_positions_only,
    seed_everything,
    train_with_backoff,
    trainer_args,
    write_card,
)
from caiflow.training.config import RLConfig
from caiflow.training.old_logps import with_old_logps_from_trained_pass
from caiflow.training.precision import resolve_bf16_autocast
from caiflow.training.rollouts import with_engine_rollouts

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
# What TRL 1.16 (RLOO and GRPO) logs -> the names in our history.
LOGGED = {
    "reward": "reward",
    "kl": "kl",
    "completions/mean_length": "completion_length",
    "reward_std": "reward_std",
    "loss": "loss",
    "entropy": "entropy",
    "learning_rate": "learning_rate",
}

OnLog = Callable[[int, int, dict], None]


def check_prompts(prompts: list[list[dict]]) -> list[list[dict]]:
    """Plain lists of {role, content} ending with a user turn (what the policy answers)."""
    if len(prompts) == 0:
        raise ValueError(
            "no prompts to train on: RL needs at least one conversation ending with a user turn."
        )
    out = []
    for i, conv in enumerate(prompts):
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in conv]
        if not msgs or msgs[-1]["role"] != "user":
            raise ValueError(
                f"RL prompt {i} must be a conversation ending with a user turn; got roles "
                f"{[m['role'] for m in msgs]}. Drop the trailing assistant answer."
            )
        out.append(msgs)
    return out


def reward_function(scorer) -> Callable[..., list[float]]:
    """A TRL reward function (prompts, completions, **kw) -> one float per completion, from a RewardScorer."""

    def reward_model(prompts, completions, **kwargs) -> list[float]:
        # Conversational datasets give completions as [{"role": "assistant", "content": ...}].
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        return [float(x) for x in scorer.score(prompts, texts)]

    return reward_model


def history_from_logs(log_history: list[dict]) -> list[dict]:
    """Per logged step: reward, kl, completion_length (and loss, reward_std, entropy, learning_rate
    when logged)."""
    rows = []
    for entry in log_history:
        if "reward" not in entry:
            continue  # the end-of-training summary and eval entries
        row = {"step": int(entry.get("step", 0))}
        row.update(
            {
                ours: (float(entry[theirs]) if entry.get(theirs) is not None else None)
                for theirs, ours in LOGGED.items()
            }
        )
        rows.append(row)
    return rows


def _progress_callback(on_log: OnLog | None):
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log is None or not logs or not state.is_world_process_zero:
                return
            mapped = {ours: logs[theirs] for theirs, ours in LOGGED.items() if theirs in logs}
            mapped.update({k: v for k, v in logs.items() if k not in LOGGED})
            try:
                on_log(int(state.global_step), int(state.max_steps), mapped)
            except Exception as exc:  # noqa: BLE001 - progress reporting must not stop training
                log.warning(
                    "rl: the on_log callback failed (%s: %s); training goes on", type(exc).__name__, exc
                )

    return _Progress()


def _trainer_classes(algorithm: str):
    if algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer
    from trl import RLOOConfig, RLOOTrainer

    return RLOOConfig, RLOOTrainer


def train_rl(
    cfg: RLConfig,
    sl_model_path: Path,
    base_model_path: Path,
    reward_dir: Path,
    prompts: list[list[dict]],
    out_dir: Path,
    work_dir: Path,
    seed: int,
    dtype: str = "float32",
    card_extra: dict | None = None,
    on_log: OnLog | None = None,
    fast_cpu: bool = True,
) -> dict:
    """Train a LoRA adapter on the SL policy with RLOO (or GRPO) against the reward model; write
    out_dir (see above)."""
    from datasets import Dataset

    from caiflow.models import load_policy, load_tokenizer
    from caiflow.training.reward_scorer import RewardScorer

    out_dir, work_dir, sl_model_path = Path(out_dir), Path(work_dir), Path(sl_model_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    score_labelled_positions_only()  # the output head skips prompt and padding positions on the CPU too
    seed_everything(seed)
    prompts = check_prompts(prompts)
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    device = "cuda" if has_cuda() else "cpu"
    scorer = RewardScorer(
        reward_dir, device=device, batch_size=cfg.scoring_batch_size, dtype=dtype, fast_cpu=fast_cpu
    )
    reward_fn = reward_function(scorer)
    tokenizer = load_tokenizer(
        sl_model_path if (sl_model_path / "tokenizer_config.json").is_file() else base_model_path
    )
    config_cls, trainer_cls = _trainer_classes(cfg.algorithm)
    if cfg.rollouts == "engine":
        trainer_cls = with_engine_rollouts(trainer_cls, seed, fast_cpu)
    if cfg.algorithm == "rloo":  # GRPO computes old log-probabilities only where it needs them
        trainer_cls = with_old_logps_from_trained_pass(trainer_cls)
    peft_config = lora_config(cfg.lora)
    sl_full = full_weights(sl_model_path, base_model_path, work_dir, dtype) if cfg.method == "qlora" else None

    def build(per_device: int, accumulation: int):
        seed_everything(seed)
        # The SL policy, with an SL adapter merged in memory (or its merged weights quantised to
        # 4-bit for 'qlora'); loaded afresh because the trainer wraps it in place.
        if cfg.method == "qlora":
            model = load_base_for_training(
                sl_full, "qlora", dtype, gradient_checkpointing=cfg.gradient_checkpointing
            )
        else:
            model, _ = load_policy(sl_model_path, base_model_path, device="cpu", dtype=dtype)
        args = trainer_args(
            config_cls,
            work_dir,
            seed=seed,
            learning_rate=cfg.learning_rate,
            per_device=per_device,
            accumulation=accumulation,
            max_steps=cfg.max_steps,
            save_steps=cfg.save_steps,
            logging_steps=cfg.logging_steps,
            gradient_checkpointing=cfg.gradient_checkpointing,
            bf16_autocast=resolve_bf16_autocast(cfg.bf16_autocast, dtype),
            beta=cfg.kl_coef,  # KL to the SL model (the adapter-disabled policy)
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature,
            disable_dropout=cfg.disable_dropout,
            # the reward function only needs prompts and completions; keep the rest
            remove_unused_columns=False,
            log_completions=False,  # no rich tables on stdout; the history goes into the metrics instead
        )
        trainer = trainer_cls(
            model=model,
            reward_funcs=reward_fn,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[fault_callback("rl"), _progress_callback(on_log)],
        )
        return log_to_logger(trainer)

    # One generation batch of cfg.batch_size completions per optimiser step (TRL's default
    # steps_per_generation = accumulation), trained in per-device slices.
    per_device = cfg.per_device_batch_size or cfg.batch_size
    outcome = train_with_backoff(build, cfg.batch_size, per_device, work_dir, fast_cpu)
    trainer = outcome.trainer
    history = history_from_logs(trainer.state.log_history)
    _save_policy(trainer, tokenizer, out_dir, sl_model_path, base_model_path, dtype, cfg.method == "qlora")

    rewards = [h["reward"] for h in history if h["reward"] is not None]
    metrics = {
        "algorithm": cfg.algorithm,
        # what sampled the completions: 'engine, merged', 'engine, adapter live (why)', 'trl (why)' or 'trl'
        "rollouts": getattr(trainer, "rollouts_used", None) or "trl",
        # RLOO's old log-probabilities: 'trained pass' or 'own pass (why)'; None for GRPO
        "old_logps": getattr(trainer, "old_logps_used", None),
        "prompts": len(prompts),
        "steps": int(trainer.state.global_step),
        "train_loss": float(outcome.train_output.training_loss),
        "last_logged_loss": log_history_value(trainer, "loss"),
        "first_mean_reward": rewards[0] if rewards else None,
        "last_mean_reward": rewards[-1] if rewards else None,
        "reward_gain": (rewards[-1] - rewards[0]) if rewards else None,
        # mean reward over the first and the last quarter of the logged steps: did RL raise it?
        **reward_trend(rewards),
        "last_kl": next((h["kl"] for h in reversed(history) if h["kl"] is not None), None),
        "reward_members": scorer.size,
        "backoffs": outcome.backoffs,
        "per_device_batch_size": outcome.per_device_batch_size,
        "gradient_accumulation_steps": outcome.gradient_accumulation_steps,
        "resumed_from": outcome.resumed_from,
        "history": history,
    }
    write_card(
        out_dir,
        f"Constitutional RL policy ({cfg.algorithm.upper()})",
        "lora on the SL policy, merged",
        cfg.model_dump(),
        seed,
        {
            **(card_extra or {}),
            "layout": "merged weights here; RL adapter in adapter/ (its base is the SL policy)",
        },
        metrics,
    )
    del trainer, outcome
    return metrics


def full_weights(sl_model_path: Path, base_model_path: Path, work_dir: Path, dtype: str) -> Path:
    """A folder of the SL policy's full weights: its own, SFT's merged/, or merged once into work_dir."""
    from caiflow.models import is_adapter_dir, load_policy

    if not is_adapter_dir(sl_model_path):
        return sl_model_path
    if (sl_model_path / "merged" / "config.json").is_file():
        return sl_model_path / "merged"
    dest = work_dir / "sl-merged"
    if not (dest / "config.json").is_file():
        model, tok = load_policy(sl_model_path, base_model_path, device="cpu", dtype=dtype)
        model.save_pretrained(dest)
        tok.save_pretrained(dest)
        del model
    return dest


def _save_policy(
    trainer,
    tokenizer,
    out_dir: Path,
    sl_model_path: Path,
    base_model_path: Path,
    dtype: str,
    quantized: bool,
) -> None:
    """The adapter to out_dir/adapter, then the merged policy and tokenizer to out_dir.

    A 4-bit policy ('qlora') is not merged in place (that would save rounded 4-bit weights): the
    adapter goes onto a full-precision reload of the SL policy on the CPU instead.
    """
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    adapter = out_dir / ADAPTER_DIR
    shutil.rmtree(adapter, ignore_errors=True)
    peft_model.save_pretrained(adapter)
    spec_file = adapter / "adapter_config.json"
    spec: dict[str, Any] = json.loads(spec_file.read_text())
    spec["base_model_name_or_path"] = str(sl_model_path)  # the SL policy, not the raw base model
    spec_file.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if quantized:
        from peft import PeftModel

        from caiflow.models import load_policy

        sl, _ = load_policy(sl_model_path, base_model_path, device="cpu", dtype=dtype)
        merged = PeftModel.from_pretrained(sl, str(adapter)).merge_and_unload()
    else:
        merged = peft_model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def reward_trend(rewards: list[float]) -> dict:
    """Mean reward of the first and last quarter of the logged steps (at least one step each)."""
    if not rewards:
        return {"reward_first_quarter": None, "reward_last_quarter": None, "reward_rose": None}
    q = max(1, len(rewards) // 4)
    first, last = float(np.mean(rewards[:q])), float(np.mean(rewards[-q:]))
    return {"reward_first_quarter": first, "reward_last_quarter": last, "reward_rose": last > first}
