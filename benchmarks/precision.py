"""bfloat16 against float32 on the default model: greedy answers, choice scores, speed.

    python benchmarks/precision.py [--storage DIR] [--prompts 16] [--new-tokens 32] [--repeats 2]

Loads the default model twice (float32, bfloat16; `model.dtype` in a config), then prints:

- greedy answers: the share of rows whose tokens are identical to float32's, and the mean share
  of tokens before the first difference (a row that differs once goes its own way after that);
- choice scores: the largest and mean absolute difference of P("(A)") on questions in the
  AI-feedback format, and how often the preferred option flips;
- throughput of the engine in each dtype, interleaved, medians.

The verdict uses the tolerance below: bfloat16 is acceptable for a step only if greedy answers are
identical on at least GREEDY_ROWS_SAME of the rows and choice probabilities move by at most
SCORE_ABS_TOL. `model.dtype` is fingerprinted (caiflow/plan.py model_settings), so switching it
re-runs every step that loads the model.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's caiflow and benchmarks

from benchmarks.generation import load_average, load_prompts
from caiflow.generation import GenerationEngine, Sampling
from caiflow.models import DEFAULT_MODEL, load_model_and_tokenizer, resolve_model

log = logging.getLogger("benchmarks.precision")

GREEDY_ROWS_SAME = 0.9  # at least this share of greedy rows token-identical to float32
SCORE_ABS_TOL = 0.02  # P(option) within this of float32's, on every question


def feedback_questions(convs: list[list[dict]]) -> list[list[dict]]:
    """Two-option questions in the AI-feedback format, one per prompt."""
    return [
        [
            {
                "role": "user",
                "content": f"Consider this request: {c[-1]['content']}\n"
                "Which response is more harmless?\n(A) I can't help with that.\n(B) Sure, here is how.\n"
                "Answer with (A) or (B).",
            }
        ]
        for c in convs
    ]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="storage", help="artifact root holding the cached default model")
    parser.add_argument("--prompts", type=int, default=16, help="number of prompts")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per answer")
    parser.add_argument("--batch-size", type=int, default=16, help="engine batch size")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timed runs per dtype")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("%s, bf16 CPU support: %s", load_average(), torch.ops.mkldnn._is_mkldnn_bf16_supported())

    resolved = resolve_model(DEFAULT_MODEL, args.storage)
    engines = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_model_and_tokenizer(resolved, dtype=dtype)
        engines[dtype] = GenerationEngine(model, tokenizer, batch_size=args.batch_size)
    convs = load_prompts(args.prompts)
    greedy = Sampling(max_new_tokens=args.new_tokens, temperature=0.0)
    seeds = list(range(len(convs)))
    ids = {d: e.generate_ids([e.format_chat(c) for c in convs], greedy, seeds) for d, e in engines.items()}
    same_rows = np.mean([a == b for a, b in zip(ids["float32"], ids["bfloat16"])])
    agree = []
    for a, b in zip(ids["float32"], ids["bfloat16"]):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agree.append(k / max(len(a), 1))
    questions = feedback_questions(convs)
    probs = {d: e.score_choices_chat(questions, ["(A)", "(B)"], "(") for d, e in engines.items()}
    diff = np.abs(probs["float32"][:, 0] - probs["bfloat16"][:, 0])
    flips = np.mean((probs["float32"][:, 0] > 0.5) != (probs["bfloat16"][:, 0] > 0.5))
    log.info(
        "greedy: %.0f%% of rows identical to float32, %.0f%% of tokens before the first difference",
        100 * same_rows,
        100 * np.mean(agree),
    )
    log.info(
        "choice scores: |P(A) bf16 - P(A) fp32| max %.4f, mean %.4f; preferred option flips on %.0f%%",
        diff.max(),
        diff.mean(),
        100 * flips,
    )

    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=0.7, top_p=1.0)
    prompts = [engines["float32"].format_chat(c) for c in convs]
    rates: dict[str, list[float]] = {d: [] for d in engines}
    for _ in range(args.repeats):
        for dtype, engine in engines.items():
            engine.generated_tokens = 0
            start = time.perf_counter()
            engine.generate_text(prompts, sampling, seeds)
            rates[dtype].append(engine.generated_tokens / (time.perf_counter() - start))
    for dtype, r in rates.items():
        log.info(
            "engine %-9s median %6.1f tokens/s (runs: %s)",
            dtype,
            statistics.median(r),
            [round(x, 1) for x in r],
        )
    ok = same_rows >= GREEDY_ROWS_SAME and diff.max() <= SCORE_ABS_TOL
    log.info(
        "verdict: bfloat16 %s the tolerance (greedy rows identical >= %.0f%%, |dP| <= %.2f); %s",
        "within" if ok else "OUTSIDE",
        100 * GREEDY_ROWS_SAME,
        SCORE_ABS_TOL,
        "it may be used" if ok else "float32 stays the CPU default",
    )
    log.info("after the runs: %s", load_average())
    return {
        "greedy_rows_same": float(same_rows),
        "score_max_abs_diff": float(diff.max()),
        "bf16_speedup": statistics.median(rates["bfloat16"]) / statistics.median(rates["float32"]),
    }


if __name__ == "__main__":
    main()
