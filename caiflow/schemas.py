"""The record contract between steps: every Parquet schema, in one place.

Column names follow TRL's (`messages`, `prompt`, `chosen`, `rejected`: lists of
`{role, content}`), so outputs feed TRL trainers and the Hub as they are.
"""

from __future__ import annotations

import pyarrow as pa

# A training step's weights, adapter and tokenizer live in this folder of its artifact.
MODEL_DIR = "model"

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# Step 1: every prompt read; kept ones have drop_reason null.
PROMPTS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("kind", pa.string()),
        ("source", pa.string()),
        ("hint_principle", pa.string()),
        ("split", pa.string()),
        ("category", pa.string()),
        ("category_confidence", pa.float64()),
        ("drop_reason", pa.string()),
    ]
)

# Step 2: one critique-revision round.
ROUND = pa.struct(
    [
        ("principle", pa.string()),
        ("critique_request", pa.string()),
        ("critique", pa.string()),
        ("revision_request", pa.string()),
        ("revision", pa.string()),
    ]
)

# Step 2: the whole trace of one prompt plus the SFT `messages`.
SL_DATA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("kind", pa.string()),
        ("category", pa.string()),
        ("initial_answer", pa.string()),
        ("rounds", pa.list_(ROUND)),
        ("revision", pa.string()),
        # TRL's conversational record: the prompt and the final (revised) answer.
        ("messages", pa.list_(MESSAGE)),
        ("drop_reason", pa.string()),
    ]
)

# Step 4: TRL's conversational preference record (prompt, chosen, rejected) plus the soft label.
PREFERENCES = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.list_(MESSAGE)),
        ("chosen", pa.list_(MESSAGE)),
        ("rejected", pa.list_(MESSAGE)),
        ("label", pa.float64()),  # P(chosen is better), >= 0.5; null when not scored
        ("p_a_first", pa.float64()),  # P(a better) with a shown as (A), averaged over principles
        ("p_a_second", pa.float64()),  # P(a better) with a shown as (B), averaged over principles
        ("position_bias", pa.float64()),  # mean P("(A)") over both orders - 0.5: the pull to the first slot
        ("principles", pa.list_(pa.string())),  # ids of the principles asked (empty when not scored)
        ("answer_a", pa.string()),
        ("answer_b", pa.string()),
        # "feedback" (labelled by the feedback model), "contrastive-red-team" or "contrastive-benign"
        ("pair_kind", pa.string()),
        # null (kept), "identical-answers", "undecided", "feedback-disagrees" or "no-refusal-contrast"
        ("drop_reason", pa.string()),
    ]
)

# Baseline: the evaluation prompts (held-out + evaluate.prompts) and the base model's answers.
BASELINE = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("kind", pa.string()),  # red-team or benign
        ("source", pa.string()),
        ("lookalike", pa.bool_()),  # a benign prompt that only looks harmful
        ("answer", pa.string()),
        ("refused", pa.bool_()),  # caiflow.refusal.is_refusal(answer)
    ]
)

# Evaluate: every stage's answer to each evaluation prompt, with its refusal flag and reward.
ANSWERS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("kind", pa.string()),
        ("lookalike", pa.bool_()),
        ("prompt", pa.string()),
        ("stage", pa.string()),
        ("answer", pa.string()),
        ("refused", pa.bool_()),
        ("reward", pa.float64()),
    ]
)

# Evaluate, while it runs: one stage's answers, shard by shard under the artifact's work/<stage>/ (its
# resume point; the step combines the stages into ANSWERS, and work/ goes once the manifest is written).
STAGE_ANSWERS = pa.schema([("prompt_id", pa.string()), ("answer", pa.string())])

# Evaluate: every pairwise comparison the judge made, in both presentation orders.
JUDGEMENTS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("kind", pa.string()),
        ("dimension", pa.string()),
        ("candidate", pa.string()),
        ("reference", pa.string()),
        ("p_candidate_better", pa.float64()),  # the mean of the two orders
        ("p_candidate_first", pa.float64()),  # P(candidate better) with the candidate shown as (A)
        ("p_candidate_second", pa.float64()),  # ... shown as (B)
        ("identical", pa.bool_()),  # the answers are the same: not sent to the judge
    ]
)

# Evaluate: the judge on the calibration pairs (a known better answer), in both orders.
CALIBRATION = pa.schema(
    [
        ("id", pa.string()),
        ("kind", pa.string()),
        ("dimension", pa.string()),
        ("p_better_first", pa.float64()),
        ("p_better_second", pa.float64()),
        ("right", pa.bool_()),
    ]
)

# compare: both arms' answers (the base stage once, under arm "shared") and refusal flags.
COMPARE = pa.schema(
    [
        ("arm", pa.string()),
        ("prompt_id", pa.string()),
        ("kind", pa.string()),
        ("lookalike", pa.bool_()),
        ("stage", pa.string()),
        ("answer", pa.string()),
        ("refused", pa.bool_()),
    ]
)
