"""The evaluation prompts: the held-out prompts plus `evaluate.prompts`, and the built-in judge checks.

Every stage answers the same set, so differences between stages are paired by prompt. Extra
sources go through the same cleaning as training prompts (normalised, deduplicated, too short or
too long dropped); a prompt that is also a training prompt is dropped from the extra sources,
so a user's own set cannot leak training data into the report. Rows from the built-in
look-alike set (benign prompts that only look harmful) are marked `lookalike`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from caiflow.prompt_filters import clean_prompts, kept_prompts
from caiflow.prompts import load_prompts

if TYPE_CHECKING:
    from caiflow.generation import Sampling

# Pairs whose better answer is not in doubt (a refusal vs harmful instructions, a right vs a wrong
# fact, an on-topic vs an off-topic answer): the judge is measured on them before it is trusted.
CALIBRATION_PATH = Path(__file__).resolve().parent / "data" / "judge_calibration.jsonl"
COLUMNS = ["prompt_id", "prompt", "kind", "source", "lookalike"]


def evaluation_prompts(prompts: pd.DataFrame, cfg: Any) -> tuple[pd.DataFrame, dict[str, int]]:
    """(rows with COLUMNS ordered by prompt id, counts of what was dropped from the extra sources)."""
    held_out = kept_prompts(prompts, "eval")
    rows = held_out.assign(lookalike=False)[COLUMNS]
    counts = {
        "held_out": len(rows),
        "extra_read": 0,
        "extra_kept": 0,
        "extra_dropped_in_training": 0,
        "extra_dropped_other": 0,
    }
    if cfg.evaluate.prompts:
        extra = load_prompts(cfg.evaluate.prompts, Path(cfg.base_dir))
        counts["extra_read"] = len(extra)
        extra = clean_prompts(extra, cfg.prompts.min_chars, cfg.prompts.max_chars)
        training = set(prompts.loc[prompts["split"] != "eval", "prompt_id"])  # trained or tuned on
        in_training = extra["drop_reason"].isna() & extra["prompt_id"].isin(training)
        counts["extra_dropped_in_training"] = int(in_training.sum())
        duplicate = extra["prompt_id"].isin(set(rows["prompt_id"]))
        keep = extra["drop_reason"].isna() & ~in_training & ~duplicate
        counts["extra_dropped_other"] = int((~keep).sum()) - counts["extra_dropped_in_training"]
        extra = extra[keep].assign(lookalike=extra["source"].str.startswith("lookalike:"))
        counts["extra_kept"] = len(extra)
        rows = pd.concat([rows, extra[COLUMNS]], ignore_index=True)
    rows = rows.sort_values("prompt_id", kind="stable").reset_index(drop=True)
    rows["lookalike"] = rows["lookalike"].astype(bool)
    return rows, counts


def eval_sampling(cfg: Any) -> Sampling:
    """How every stage answers the evaluation prompts (`evaluate.sampling`; greedy by default)."""
    from caiflow.generation import Sampling  # torch: imported when a step generates

    s = cfg.evaluate.sampling
    return Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)


def calibration_pairs(path: Path = CALIBRATION_PATH) -> list[dict[str, str]]:
    """The built-in calibration pairs: id, kind, dimension, prompt, better, worse."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
