"""Step 5: a reward model (or an ensemble of them) trained on soft AI-feedback labels.

The preference step gives each pair a probability, ``label = P(chosen is better)``, not a hard
winner. The loss is therefore the binary cross-entropy between sigmoid(r_chosen - r_rejected) and
that probability (:func:`soft_label_loss`); with label 1.0 it is the usual Bradley-Terry loss.
TRL's ``RewardTrainer`` is used with its loss swapped for this one (``SoftLabelRewardTrainer``).

Training and scoring share one formatting function (:func:`conversation_ids`: the chat template
over prompt + answer, as TRL's RewardTrainer does it), and one scoring path (right padding: the
sequence-classification head reads the rightmost non-pad token, and right padding keeps the
position ids the model was trained with).

Ensembles: ``ensemble_size`` members, either with different seeds (``seed + k``, same data) or
each trained on its own share of the principles (assigned round-robin over the sorted principle
names; members also get ``seed + k``). The members' scores are centred (the mean reward over a
sample of their training answers is subtracted, stored as ``offsets`` in ensemble.json): the
Bradley-Terry loss fixes only reward differences, so without centring the spread across members
would measure arbitrary offsets rather than disagreement. :func:`aggregate` combines them
conservatively: mean - lambda * std.

Output layout (``out_dir``)::

    member-00/ ...     a full AutoModelForSequenceClassification (LoRA merged in), tokenizer;
                       with ``shared_backbone``: the member's LoRA adapter and score head only
                       (ensemble.json names the backbone; 'qlora' loads it 4-bit for scoring)
    ensemble.json      members, lambda, mode, offsets, seeds, principles per member, max_length, products
    tokenizer files    the shared tokenizer (same as in each member)
    README.md          model card with the held-out metrics

Held-out metrics (a ``eval_fraction`` share of the pairs, chosen by a hash of seed and pair, so
the split is stable): ``accuracy`` is plain (unweighted) agreement between the sign of the reward
margin and the side the label prefers (pairs labelled exactly 0.5 are left out); ``soft_agreement``
is the mean of p*label + (1-p)*(1-label) with p = sigmoid(margin) (the chance model and labeller
agree on a random draw); ``brier`` is mean (p - label)^2; ``ece`` is the expected calibration
error of p against the labels over 10 equal-width bins; ``loss`` is the soft-label loss.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from caiflow.faults import free_accelerator_memory
from caiflow.training.common import (
    fault_callback,
    load_base_for_training,
    log_history_value,
    log_to_logger,
    lora_config,
    quiet_libraries,
    seed_everything,
    train_with_backoff,
    trainer_args,
    write_card,
)
from caiflow.training.config import RewardModelConfig
from caiflow.training.launch import is_main_process
from caiflow.training.precision import resolve_bf16_autocast, scoring_products
from caiflow.training.reward_data import assign_principles, check_prefs, pairs_to_rows, split_pairs
from caiflow.training.reward_scorer import (
    ENSEMBLE_FILE,
    PRODUCTS_KEY,
    aggregate,
    conversation_ids,
    messages_of,
    pair_metrics,
    score_ids,
)

log = logging.getLogger(__name__)

OFFSET_SAMPLE = 256  # pairs whose answers set a member's centring offset (enough for a stable mean)


# ---------------------------------------------------------------- loss and aggregation


def soft_label_loss(r_chosen, r_rejected, label, weight=None):
    """Mean binary cross-entropy of sigmoid(r_chosen - r_rejected) against label = P(chosen is better),
    each pair's term times its `weight` when given.

    Written with logsigmoid (-(l * logsig(m) + (1 - l) * logsig(-m))), which stays finite for large margins.
    """
    import torch.nn.functional as F

    margin = r_chosen - r_rejected
    label = label.to(margin.dtype)
    loss = -(label * F.logsigmoid(margin) + (1.0 - label) * F.logsigmoid(-margin))
    return (loss * weight.to(margin.dtype)).mean() if weight is not None else loss.mean()


# ---------------------------------------------------------------- the trainer


def _soft_label_trainer_class():
    """RewardTrainer whose loss is the soft-label cross-entropy, and whose batches carry each pair's label."""
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    @dataclass
    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch["soft_label"] = torch.tensor([float(e["soft_label"]) for e in examples], dtype=torch.float)
            batch["weight"] = torch.tensor([float(e.get("weight", 1.0)) for e in examples], dtype=torch.float)
            return batch

    class SoftLabelRewardTrainer(RewardTrainer):
        def _set_signature_columns_if_needed(self):
            # remove_unused_columns keeps only these: without "soft_label" and "weight" they would be
            # dropped silently.
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "soft_label", "weight"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            label, weight = inputs.pop("soft_label"), inputs.pop("weight")
            outputs = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            )
            r_chosen, r_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            loss = soft_label_loss(r_chosen, r_rejected, label, weight)
            with torch.no_grad():  # the same metrics RewardTrainer logs, plus agreement with the soft label
                p = torch.sigmoid(r_chosen - r_rejected)
                self._metrics[mode]["accuracy"].append((r_chosen > r_rejected).float().mean().item())
                self._metrics[mode]["margin"].append((r_chosen - r_rejected).mean().item())
                self._metrics[mode]["mean_reward"].append(outputs.logits.mean().item())
                self._metrics[mode]["soft_agreement"].append(
                    (p * label + (1 - p) * (1 - label)).mean().item()
                )
            return (loss, outputs) if return_outputs else loss

    return SoftLabelCollator, SoftLabelRewardTrainer


def _train_member(
    cfg: RewardModelConfig,
    backbone_path: Path,
    rows: list[dict],
    tokenizer,
    work: Path,
    seed: int,
    dtype: str,
    fast_cpu: bool = True,
):
    """Train one member; returns (model with LoRA merged, or the adapter model with
    ``shared_backbone``, and the outcome)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig

    collator_cls, trainer_cls = _soft_label_trainer_class()
    dataset = Dataset.from_list(rows)
    peft_config = (
        None if cfg.method == "full" else lora_config(cfg.lora, "SEQ_CLS", modules_to_save=["score"])
    )

    def build(per_device: int, accumulation: int):
        seed_everything(seed)  # the score head is initialised randomly on load
        model = load_base_for_training(
            backbone_path,
            cfg.method,
            dtype,
            auto_class=AutoModelForSequenceClassification,
            gradient_checkpointing=cfg.gradient_checkpointing,
            num_labels=1,
        )
        model.config.pad_token_id = tokenizer.pad_token_id  # the head finds the last non-pad token with it
        args = trainer_args(
            RewardConfig,
            work,
            seed=seed,
            learning_rate=cfg.learning_rate,
            per_device=per_device,
            accumulation=accumulation,
            max_steps=cfg.max_steps,
            epochs=cfg.epochs,
            save_steps=cfg.save_steps,
            logging_steps=cfg.logging_steps,
            gradient_checkpointing=cfg.gradient_checkpointing,
            bf16_autocast=resolve_bf16_autocast(cfg.bf16_autocast, dtype),
            max_length=cfg.max_length,
        )
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            data_collator=collator_cls(pad_token_id=tokenizer.pad_token_id),
            peft_config=peft_config,
            callbacks=[fault_callback("reward_model")],
        )
        if cfg.method == "qlora":
            # TRL casts a 4-bit model's trainable weights to bf16; the score head is a plain Linear
            # that must match the hidden states' dtype (float32 on CPU)
            import torch

            for name, param in trainer.model.named_parameters():
                if "modules_to_save" in name and param.requires_grad:
                    param.data = param.data.to(getattr(torch, dtype))
        return log_to_logger(trainer)

    outcome = train_with_backoff(build, cfg.batch_size, cfg.per_device_batch_size, work, fast_cpu)
    model = outcome.trainer.model
    if peft_config is not None and not cfg.shared_backbone:
        model = model.merge_and_unload()  # LoRA folded in, the trained score head kept
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, outcome


# ---------------------------------------------------------------- the entry point


def _train_and_score_member(
    cfg: RewardModelConfig,
    backbone_path: Path,
    data: pd.DataFrame,
    eval_rows: list[dict],
    tokenizer,
    dest: Path,
    work: Path,
    seed: int,
    dtype: str,
    fast_cpu: bool = True,
) -> dict:
    """Train one member, save it to dest, and score its centring sample and the held-out pairs."""
    log.info("reward_model: training %s on %d pairs (seed %d)", dest.name, len(data), seed)
    rows = pairs_to_rows(data, tokenizer, cfg.balance_kinds)
    model, outcome = _train_member(cfg, backbone_path, rows, tokenizer, work, seed, dtype, fast_cpu)
    if is_main_process():  # under `accelerate launch`, one process writes the outputs
        _save_member(model, tokenizer, dest)
    pad, batch = tokenizer.pad_token_id, cfg.per_device_batch_size * 2
    sample = np.random.default_rng(seed).permutation(len(rows))[:OFFSET_SAMPLE]
    packed: dict = {}  # the trained member's packed weights, shared by its three scoring calls
    products = scoring_products(cfg.bf16_autocast, dtype, cfg.method == "qlora")  # as ensemble.json says

    def score(ids: list[list[int]]) -> np.ndarray:
        return score_ids(model, ids, pad, batch, fast_cpu=fast_cpu, packed=packed, products=products)

    offset = float(score([rows[j][s] for j in sample for s in ("chosen_ids", "rejected_ids")]).mean())
    chosen = score([r["chosen_ids"] for r in eval_rows]) - offset
    rejected = score([r["rejected_ids"] for r in eval_rows]) - offset
    return {
        "train_pairs": len(data),
        "train_loss": float(outcome.train_output.training_loss),
        "last_logged_loss": log_history_value(outcome.trainer, "loss"),
        "steps": int(outcome.trainer.state.global_step),
        "backoffs": outcome.backoffs,
        "per_device_batch_size": outcome.per_device_batch_size,
        "gradient_accumulation_steps": outcome.gradient_accumulation_steps,
        "resumed_from": outcome.resumed_from,
        "offset": offset,
        "eval_chosen": chosen.tolist(),
        "eval_rejected": rejected.tolist(),
    }


def _save_member(model, tokenizer, dest: Path) -> None:
    """Write a member folder whole: into a temp folder first, then rename (no half-written member)."""
    tmp = dest.with_name(f".{dest.name}-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def train_reward_model(
    cfg: RewardModelConfig,
    backbone_path: Path,
    prefs: pd.DataFrame,
    out_dir: Path,
    work_dir: Path,
    seed: int,
    dtype: str = "float32",
    card_extra: dict | None = None,
    fast_cpu: bool = True,
) -> dict:
    """Train ``cfg.ensemble_size`` reward models on soft labels; write them, ensemble.json and a
    card to out_dir."""
    from caiflow.models import load_tokenizer

    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    check_prefs(prefs, cfg.ensemble_mode)

    tokenizer = load_tokenizer(backbone_path)
    tokenizer.padding_side = "right"  # what the collator and the scorer use
    pairs = pd.DataFrame(
        {
            "prompt": [messages_of(p, "prompt") for p in prefs["prompt"]],
            "chosen": [messages_of(c, "chosen") for c in prefs["chosen"]],
            "rejected": [messages_of(r, "rejected") for r in prefs["rejected"]],
            "label": prefs["label"].astype(float).to_numpy(),
            "principle": prefs["principle"].astype(str).to_numpy() if "principle" in prefs else "",
        }
    )
    if "pair_kind" in prefs:  # feedback or contrastive: held-out accuracy is reported per kind
        pairs["pair_kind"] = prefs["pair_kind"].astype(str).to_numpy()
    lengths = [
        max(len(conversation_ids(tokenizer, p, c)), len(conversation_ids(tokenizer, p, r)))
        for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])
    ]
    fits = np.array(lengths) <= cfg.max_length
    if fits.sum() < 2:
        raise ValueError(
            f"only {int(fits.sum())} of {len(pairs)} pairs fit in reward_model.max_length "
            f"({cfg.max_length} tokens; longest {max(lengths)}): raise reward_model.max_length."
        )
    pairs = pairs[fits].reset_index(drop=True)
    train, held_out = split_pairs(pairs, cfg.eval_fraction, seed)
    k = cfg.ensemble_size
    shares = (
        assign_principles(train["principle"].tolist(), k) if cfg.ensemble_mode == "principles" else [None] * k
    )
    eval_rows = pairs_to_rows(held_out, tokenizer)

    members, member_metrics, offsets, eval_scores = [], [], [], []
    for i in range(k):
        name, member_seed = f"member-{i:02d}", seed + i
        data = (
            train if shares[i] is None else train[train["principle"].isin(shares[i])].reset_index(drop=True)
        )
        if data.empty:
            raise ValueError(
                f"{name} has no training pairs (principles {shares[i]}): lower reward_model.ensemble_size "
                "or use ensemble_mode: seeds."
            )
        done_file = work_dir / f"{name}.json"  # a finished member (saved + scored) is not retrained on resume
        saved = (out_dir / name / "config.json").is_file() or (
            out_dir / name / "adapter_config.json"
        ).is_file()
        if done_file.is_file() and saved:
            record = json.loads(done_file.read_text())
            log.info("reward_model: %s already trained, reusing it", name)
        else:
            record = _train_and_score_member(
                cfg,
                backbone_path,
                data,
                eval_rows,
                tokenizer,
                out_dir / name,
                work_dir / name,
                member_seed,
                dtype,
                fast_cpu,
            )
            record.update(name=name, seed=member_seed, principles=shares[i])
            record["eval"] = pair_metrics(
                np.array(record["eval_chosen"]) - np.array(record["eval_rejected"]),
                held_out["label"].to_numpy(),
            )
            if is_main_process():
                done_file.write_text(json.dumps(record), encoding="utf-8")
            # the member's trainer and optimiser state are gone; return their memory
            free_accelerator_memory()
        offsets.append(record["offset"])
        eval_scores.append((np.array(record.pop("eval_chosen")), np.array(record.pop("eval_rejected"))))
        members.append(name)
        member_metrics.append(record)

    spec = {
        "members": members,
        "lambda": cfg.ensemble_lambda,
        "mode": cfg.ensemble_mode,
        "offsets": offsets,
        "seeds": [m["seed"] for m in member_metrics],
        "principles": {m["name"]: m["principles"] for m in member_metrics},
        "max_length": cfg.max_length,
        "format": "chat template over prompt + assistant answer, right padding",
        # members are adapters (with their score heads) on this backbone, loaded 4-bit when quantized
        "layout": "adapters" if cfg.shared_backbone else "merged",
        "backbone": str(backbone_path) if cfg.shared_backbone else None,
        "quantized": cfg.method == "qlora",
    }
    if products := scoring_products(cfg.bf16_autocast, dtype, cfg.method == "qlora"):
        spec[PRODUCTS_KEY] = products  # absent: scored in the loaded dtype, as before the key existed
    if is_main_process():
        tokenizer.save_pretrained(out_dir)
        (out_dir / ENSEMBLE_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")

    labels = held_out["label"].to_numpy()
    chosen_agg = aggregate(np.stack([c for c, _ in eval_scores]), cfg.ensemble_lambda)
    rejected_agg = aggregate(np.stack([r for _, r in eval_scores]), cfg.ensemble_lambda)
    margins = chosen_agg - rejected_agg
    overall = pair_metrics(margins, labels)
    metrics = {
        "pairs": len(pairs),
        "dropped_too_long": int((~fits).sum()),
        "train_pairs": len(train),
        "eval_pairs": len(held_out),
        "ensemble_size": k,
        "ensemble_mode": cfg.ensemble_mode,
        "ensemble_lambda": cfg.ensemble_lambda,
        "accuracy_kind": "plain (unweighted), label 0.5 pairs excluded",
        **{f"eval_{key}": value for key, value in overall.items() if key != "pairs"},
        "train_loss": float(np.mean([m["train_loss"] for m in member_metrics])),
        "steps": int(sum(m["steps"] for m in member_metrics)),
        "backoffs": int(sum(m["backoffs"] for m in member_metrics)),
        "per_device_batch_size": int(min(m["per_device_batch_size"] for m in member_metrics)),
        "members": member_metrics,
        **accuracy_intervals(margins, labels, held_out.get("pair_kind")),
    }
    if not is_main_process():
        return metrics
    write_card(
        out_dir,
        "Constitutional reward model" + (f" ensemble ({k} members)" if k > 1 else ""),
        cfg.method,
        cfg.model_dump(),
        seed,
        card_extra,
        metrics,
    )
    return metrics


def accuracy_intervals(margins: np.ndarray, labels: np.ndarray, kinds: pd.Series | None) -> dict:
    """Held-out accuracy with its Wilson 95% interval, overall and per pair kind (when given).

    A pair counts when its label is not exactly 0.5: right when the reward margin has the sign the
    label prefers. With a few held-out pairs the interval is wide; it says how much the accuracy
    can be trusted.
    """
    from caiflow.refusal import wilson

    def one(mask: np.ndarray) -> dict:
        decided = mask & (labels != 0.5)
        right = int(((margins > 0) == (labels > 0.5))[decided].sum())
        n = int(decided.sum())
        lo, hi = wilson(right, n)
        return {"pairs": n, "accuracy": right / n if n else None, "lo": lo, "hi": hi}

    everything = one(np.ones(len(labels), dtype=bool))
    out: dict = {"eval_accuracy_lo": everything["lo"], "eval_accuracy_hi": everything["hi"]}
    if kinds is not None and len(kinds):
        values = kinds.to_numpy()
        out["eval_accuracy_by_kind"] = {str(k): one(values == k) for k in sorted({str(v) for v in values})}
    return out
