"""Step 3: supervised fine-tuning on the critique-revision answers (TRL SFTTrainer).

The training mix is every red-team row (prompt -> revised answer) plus benign plain answers making
up ``benign_ratio`` of the result, so the model learns to be harmless without forgetting to help.
Rows are turned into TRL's conversational prompt/completion format, so the loss covers only the
answer whatever the tokenizer's chat template looks like.

Methods: ``lora`` (adapters on a full-precision base), ``qlora`` (adapters on the base loaded 4-bit
nf4 through bitsandbytes; works on CPU too), ``full`` (every weight). Checkpoints go to
``work_dir``; a rerun resumes from the last one. Output layout (``out_dir``)::

    adapter_config.json, adapter_model.safetensors   lora / qlora: the adapter (its base: base_model_path)
    config.json, model.safetensors                   full: the whole model instead
    tokenizer files                                  the base model's tokenizer (left padding)
    merged/                                          with ``merge: true``: adapter merged into a
                                                     full-precision base
    README.md                                        model card: config, inputs, metrics

:func:`caiflow.models.load_policy` turns any of these into (model, tokenizer) for generation.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from caiflow.training.common import (
    fault_callback,
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
from caiflow.training.config import SFTConfig
from caiflow.training.launch import is_main_process
from caiflow.training.precision import resolve_bf16_autocast

log = logging.getLogger(__name__)


def mix_records(records: pd.DataFrame, benign_ratio: float, seed: int) -> pd.DataFrame:
    """All red-team rows plus benign rows so that benign ~= benign_ratio of the result
    (deterministic by seed)."""
    missing = {"messages", "kind"} - set(records.columns)
    if missing:
        raise ValueError(
            f"SFT records lack column(s) {sorted(missing)}: pass the sl_data artifact (messages, kind)."
        )
    benign_mask = records["kind"] == "benign"
    red, benign = records[~benign_mask], records[benign_mask]
    if benign_ratio <= 0 or benign.empty:
        want = 0
    elif red.empty:
        want = len(benign)
    else:
        want = min(len(benign), round(benign_ratio / (1.0 - benign_ratio) * len(red)))
    picked = benign.sample(n=want, random_state=seed) if want < len(benign) else benign
    mixed = pd.concat([red, picked]).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    if mixed.empty:
        raise ValueError("no SFT rows to train on: the sl_data artifact is empty.")
    return mixed


def to_prompt_completion(messages: Any) -> dict:
    """[user..., assistant] -> {'prompt': [...], 'completion': [assistant]} (TRL conversational format)."""
    msgs = [dict(role=str(m["role"]), content=str(m["content"])) for m in messages]
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
        raise ValueError(
            "each SFT row's messages must end with the assistant's answer after at least one user turn; "
            f"got roles {[m['role'] for m in msgs]}."
        )
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def train_sft(
    cfg: SFTConfig,
    base_model_path: Path,
    records: pd.DataFrame,
    out_dir: Path,
    work_dir: Path,
    seed: int,
    dtype: str = "float32",
    card_extra: dict | None = None,
    fast_cpu: bool = True,
) -> dict:
    """Fine-tune the base model on the SL mix; write the adapter (or full model), tokenizer and a
    card to out_dir."""
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from caiflow.models import load_tokenizer

    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    score_labelled_positions_only()  # the output head skips prompt and padding positions on the CPU too
    seed_everything(seed)

    mixed = mix_records(records, cfg.benign_ratio, seed)
    n_benign = int((mixed["kind"] == "benign").sum())
    dataset = Dataset.from_list([to_prompt_completion(m) for m in mixed["messages"]])
    tokenizer = load_tokenizer(base_model_path)
    tokenizer.padding_side = "right"  # training pads on the right; generation code sets left itself

    peft_config = None if cfg.method == "full" else lora_config(cfg.lora)

    def build(per_device: int, accumulation: int):
        seed_everything(seed)
        model = load_base_for_training(
            base_model_path, cfg.method, dtype, gradient_checkpointing=cfg.gradient_checkpointing
        )
        args = trainer_args(
            TRLSFTConfig,
            work_dir,
            seed=seed,
            learning_rate=cfg.learning_rate,
            per_device=per_device,
            accumulation=accumulation,
            max_steps=cfg.max_steps,
            epochs=cfg.epochs,
            save_steps=cfg.save_steps,
            logging_steps=cfg.logging_steps,
            gradient_checkpointing=cfg.gradient_checkpointing,
            max_length=cfg.max_length,
            completion_only_loss=True,
            packing=cfg.packing,
            bf16_autocast=resolve_bf16_autocast(cfg.bf16_autocast, dtype),
        )
        return log_to_logger(
            SFTTrainer(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=[fault_callback("sft")],
            )
        )

    outcome = train_with_backoff(build, cfg.batch_size, cfg.per_device_batch_size, work_dir, fast_cpu)
    trainer = outcome.trainer
    trainer.save_model(str(out_dir))  # adapter for lora/qlora, full weights for full (rank 0 only)
    if is_main_process():  # under `accelerate launch`, one process writes the outputs
        (out_dir / "training_args.bin").unlink(
            missing_ok=True
        )  # the Trainer's settings pickled: not an output
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(out_dir)
        if cfg.merge and cfg.method != "full":
            merge_adapter(out_dir, base_model_path, out_dir / "merged", dtype)

    metrics = {
        "train_loss": float(outcome.train_output.training_loss),
        "last_logged_loss": log_history_value(trainer, "loss"),
        "steps": int(trainer.state.global_step),
        "rows": len(mixed),
        "red_team_rows": len(mixed) - n_benign,
        "benign_rows": n_benign,
        "backoffs": outcome.backoffs,
        "per_device_batch_size": outcome.per_device_batch_size,
        "gradient_accumulation_steps": outcome.gradient_accumulation_steps,
        "resumed_from": outcome.resumed_from,
    }
    if is_main_process():
        write_card(
            out_dir, "Constitutional SL model", cfg.method, cfg.model_dump(), seed, card_extra, metrics
        )
    del trainer
    return metrics


def merge_adapter(adapter_dir: Path, base_model_path: Path, dest: Path, dtype: str = "float32") -> Path:
    """Merge a LoRA adapter into a full-precision reload of its base (also right for QLoRA) and save it."""
    from peft import PeftModel

    from caiflow.models import load_tokenizer

    base = load_base_for_training(base_model_path, "lora", dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if dest.exists():
        shutil.rmtree(dest)
    merged.save_pretrained(dest)
    load_tokenizer(adapter_dir).save_pretrained(dest)
    return dest
