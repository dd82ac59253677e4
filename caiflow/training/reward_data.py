"""The reward model's data: checking preference pairs, a stable held-out split, principle shares.

Plain pandas and numpy: the checks name the column or value to fix; the held-out split is picked
by a hash of (seed, pair), so it does not depend on row order.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from caiflow.training.reward_scorer import conversation_ids

REQUIRED = ("prompt", "chosen", "rejected", "label")


def check_prefs(prefs: pd.DataFrame, mode: str) -> None:
    missing = [c for c in REQUIRED if c not in prefs.columns]
    if mode == "principles" and "principle" not in prefs.columns:
        missing.append("principle")
    if missing:
        raise ValueError(
            f"preference pairs lack column(s) {missing}: pass the preferences artifact "
            "(prompt, chosen, rejected, label, principle)."
        )
    labels = pd.to_numeric(prefs["label"], errors="coerce")
    if labels.isna().any() or ((labels < 0) | (labels > 1)).any():
        raise ValueError(
            "every preference label must be a probability in [0, 1] (P(chosen is better)); "
            f"found {prefs['label'][labels.isna() | (labels < 0) | (labels > 1)].head(3).tolist()}."
        )
    if len(prefs) < 2:
        raise ValueError(f"a reward model needs at least 2 preference pairs; got {len(prefs)}.")


def pair_key(seed: int, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> str:
    text = json.dumps([seed, prompt, chosen, rejected], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def split_pairs(pairs: pd.DataFrame, eval_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, eval): the eval share is picked by a hash of (seed, pair), so it does not depend on
    row order."""
    n_eval = int(round(eval_fraction * len(pairs)))
    n_eval = min(n_eval, len(pairs) - 1)  # keep at least one pair to train on
    if n_eval <= 0:
        return pairs.reset_index(drop=True), pairs.iloc[:0]
    keys = [pair_key(seed, p, c, r) for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]
    order = np.argsort(np.array(keys), kind="stable")
    eval_rows = np.zeros(len(pairs), dtype=bool)
    eval_rows[order[:n_eval]] = True
    return pairs[~eval_rows].reset_index(drop=True), pairs[eval_rows].reset_index(drop=True)


def assign_principles(principles: list[str], k: int) -> list[list[str]]:
    """Round-robin over the sorted distinct principle names: member i gets names i, i+k, i+2k, ..."""
    names = sorted(set(principles))
    if len(names) < k:
        raise ValueError(
            f"ensemble_mode 'principles' needs at least ensemble_size ({k}) distinct principles; "
            "the pairs have "
            f"{len(names)} ({names}). Lower reward_model.ensemble_size or use ensemble_mode: seeds."
        )
    return [names[i::k] for i in range(k)]


def pairs_to_rows(pairs: pd.DataFrame, tokenizer, balance_kinds: bool = False) -> list[dict]:
    """Token ids of both sides, the soft label and the pair's loss weight (1, or with `balance_kinds`
    n / (kinds * n_kind), so each pair_kind weighs the same in total and the mean weight is 1)."""
    weights = np.ones(len(pairs))
    if balance_kinds and "pair_kind" not in pairs:
        raise ValueError(
            "reward_model.balance_kinds weighs pairs by their pair_kind, but the preferences have no "
            "pair_kind column: rerun the preferences step with this version, or set balance_kinds: false."
        )
    if balance_kinds and len(pairs):
        counts = pairs["pair_kind"].map(pairs["pair_kind"].value_counts()).to_numpy(dtype=float)
        weights = len(pairs) / (pairs["pair_kind"].nunique() * counts)
    return [
        {
            "chosen_ids": conversation_ids(tokenizer, p, c),
            "rejected_ids": conversation_ids(tokenizer, p, r),
            "soft_label": float(label),
            "weight": float(w),
        }
        for p, c, r, label, w in zip(
            pairs["prompt"], pairs["chosen"], pairs["rejected"], pairs["label"], weights
        )
    ]
