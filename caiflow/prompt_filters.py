"""Prompt filters: normalise, dedupe, split and cap prompts, and pick the kept ones of a split.

Every function here is plain pandas (no Prefect, no models), so step 1 of the pipeline is
testable on three-row DataFrames. Rows are never removed: a row that should not be used gets a
``drop_reason`` and stays visible in the artifact (reasons are counted in the step's report).

Columns added along the way:

- ``clean_prompts``: ``prompt`` normalised, ``prompt_id``, ``drop_reason``;
- ``split_prompts``: ``split`` ("train" | "tune" | "eval");
- ``cap_prompts``: more ``drop_reason`` values ("over-cap").
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from typing import Any

import pandas as pd

from caiflow.prompts import PromptSourceError


def kept_prompts(prompts: pd.DataFrame, split: str, include_benign: bool = True) -> pd.DataFrame:
    """The kept prompts (no drop_reason) of one split ("train", "tune" or "eval"), ordered by prompt id.

    A fixed order makes shards stable: the same prompt lands in the same shard on every run.
    """
    rows = prompts[prompts["drop_reason"].isna() & (prompts["split"] == split)]
    if not include_benign:
        rows = rows[rows["kind"] == "red-team"]
    return rows.sort_values("prompt_id", kind="stable").reset_index(drop=True)


def token_counter(tokenizer) -> Callable[[list[str]], list[int]]:
    """Token counts of texts under a tokenizer (no special tokens)."""
    return lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def check_fits_context(
    df: pd.DataFrame, context_tokens: int, count_tokens: Callable[[list[str]], list[int]]
) -> None:
    """Raise PromptSourceError for the first prompt (of `load_prompts` output) longer than the
    model's context.

    Such a prompt is a sign of a wrong column or format (a whole transcript, a document) rather
    than a long question, so it stops the run instead of being dropped. Prompts that fit the
    context but not ``prompts.max_chars`` / ``max_tokens`` are dropped with a reason instead.
    Only texts with more UTF-8 bytes than the context can exceed it (a token covers >= 1 byte),
    so a large source is not tokenised in full.
    """
    texts = [p if isinstance(p, str) else "" for p in df["prompt"]]
    suspects = [i for i, t in enumerate(texts) if len(t.encode("utf-8")) > context_tokens]
    if not suspects:
        return
    for i, n_tok in zip(suspects, count_tokens([texts[i] for i in suspects])):
        if n_tok > context_tokens:
            source = df["source"].iat[i]
            row = int((df["source"].iloc[:i] == source).sum()) + 1  # its row within its own source
            raise PromptSourceError(
                f"prompt source '{source}': row {row} is {n_tok} tokens, longer than the model's context "
                f"({context_tokens} tokens); shorten or remove it, or check text_column/format "
                f"(a whole transcript or document in one field?)."
            )


_HSPACE = re.compile(r"[^\S\n]+")  # whitespace runs without newlines
_MANY_NEWLINES = re.compile(r"\n{3,}")
_ZERO_WIDTH = {"\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"}


def normalise(text: str) -> str:
    """NFC, no control or zero-width characters, single spaces, at most one blank line, stripped."""
    text = unicodedata.normalize("NFC", str(text))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(
        ch for ch in text if ch in "\n\t" or (unicodedata.category(ch) != "Cc" and ch not in _ZERO_WIDTH)
    )
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def prompt_id(text: str) -> str:
    """Stable id of a prompt: sha256 of its normalised text, first 16 hex characters."""
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:16]


def _stable_unit(*parts: Any) -> float:
    """A number in [0, 1) from a hash of the parts: the same on every run and machine."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def clean_prompts(
    df: pd.DataFrame,
    min_chars: int,
    max_chars: int,
    max_tokens: int | None = None,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
) -> pd.DataFrame:
    """Normalise prompts and add prompt_id and drop_reason (None for rows kept).

    Reasons, first match wins: "empty", "too-short (<N chars)", "too-long (N chars > max)",
    "too-long (N tokens > max)", "duplicate of <prompt_id>" (the first occurrence is kept).
    """
    if max_tokens is not None and count_tokens is None:
        raise ValueError("clean_prompts: max_tokens needs count_tokens (a tokenizer-backed counter).")
    out = df.copy()
    out["prompt"] = [normalise(p) if isinstance(p, str) else "" for p in out["prompt"]]
    out["prompt_id"] = [prompt_id(p) for p in out["prompt"]]
    reasons: list[str | None] = []
    for p in out["prompt"]:
        n = len(p)
        if n == 0:
            reasons.append("empty")
        elif n < min_chars:
            reasons.append(f"too-short (<{min_chars} chars)")
        elif n > max_chars:
            reasons.append(f"too-long ({n} chars > {max_chars})")
        else:
            reasons.append(None)
    if max_tokens is not None and count_tokens is not None:
        idx = [i for i, r in enumerate(reasons) if r is None]
        counts = count_tokens([out["prompt"].iat[i] for i in idx]) if idx else []
        for i, n_tok in zip(idx, counts):
            if n_tok > max_tokens:
                reasons[i] = f"too-long ({n_tok} tokens > {max_tokens})"
    seen: set[str] = set()
    for i, pid in enumerate(out["prompt_id"]):
        if reasons[i] is not None:
            continue
        if pid in seen:
            reasons[i] = f"duplicate of {pid}"
        else:
            seen.add(pid)
    out["drop_reason"] = pd.Series(reasons, index=out.index, dtype=object)
    return out


def split_prompts(
    df: pd.DataFrame,
    eval_fraction: float,
    seed: int,
    benign_eval_fraction: float | None = None,
    tune_fraction: float = 0.0,
) -> pd.DataFrame:
    """Add split ("train" / "tune" / "eval") from a stable hash of (seed, prompt_id).

    A prompt lands in the same split on every run and machine, whatever else is in the set,
    so adding prompts later never moves old ones between train and eval. Benign prompts use
    `benign_eval_fraction` when given (they are few; training needs them for helpfulness).
    `tune_fraction` of the red-team prompts become "tune": neither trained on nor reported, the
    prompts settings are chosen on. They come out of the training side of the hash, so the
    held-out "eval" prompts are the same with or without a tune split.
    """
    out = df.copy()
    ids = out["prompt_id"] if "prompt_id" in out.columns else out["prompt"].map(prompt_id)
    kinds = out["kind"] if "kind" in out.columns else pd.Series(["red-team"] * len(out), index=out.index)
    splits = []
    for pid, kind in zip(ids, kinds):
        benign = kind == "benign"
        held_out = benign_eval_fraction if (benign and benign_eval_fraction is not None) else eval_fraction
        tune = 0.0 if benign else tune_fraction
        u = _stable_unit("split", seed, pid)
        splits.append("eval" if u < held_out else "tune" if u < held_out + tune else "train")
    out["split"] = splits
    return out


def cap_prompts(
    df: pd.DataFrame, max_red_team: int | None, max_benign: int | None, seed: int
) -> pd.DataFrame:
    """Keep at most N kept rows per kind, chosen by a stable hash order; the rest get "over-cap"."""
    out = df.copy()
    if "drop_reason" not in out.columns:
        out["drop_reason"] = pd.Series([None] * len(out), index=out.index, dtype=object)
    ids = out["prompt_id"] if "prompt_id" in out.columns else out["prompt"].map(prompt_id)
    reasons = out["drop_reason"].astype(object).where(out["drop_reason"].notna(), None).tolist()
    for kind, cap in (("red-team", max_red_team), ("benign", max_benign)):
        if cap is None:
            continue
        rows = [i for i in range(len(out)) if reasons[i] is None and out["kind"].iat[i] == kind]
        if len(rows) <= cap:
            continue
        rows.sort(key=lambda i: (_stable_unit("cap", seed, ids.iat[i]), i))
        for i in rows[cap:]:
            reasons[i] = "over-cap"
    out["drop_reason"] = pd.Series(reasons, index=out.index, dtype=object)
    return out
