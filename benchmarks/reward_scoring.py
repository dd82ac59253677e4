"""Reward-model scoring with the shared prefix run once and without.

    python benchmarks/reward_scoring.py [--config configs/demo.yaml] [--storage DIR] [--repeats 2]
        [--limit N] [--reward-model DIR]

The reward model scores (prompt, answer) conversations through the chat template, whose preamble
(the template's default system prompt, a constitution's) every sequence of a call shares.
`caiflow.training.reward_scorer.score_ids` runs that prefix once and starts every row from its
key/value cache; this script scores the config's prompts, each with four answers of different
lengths (a refusal, a short and two longer answers, as evaluate scores four stages' answers), both
ways in one process, interleaved, and prints the seconds of each (medians), sequences per second,
the ratio and the largest difference of a reward. Without ``--reward-model`` the scorer is the
config's model with a fresh one-output head (the time does not depend on what the head learned).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's caiflow

from caiflow.config import load_config
from caiflow.models import resolve_model
from caiflow.prompts import load_prompts
from caiflow.training.reward_scorer import conversation_ids, score_ids

log = logging.getLogger("benchmarks.reward_scoring")

ANSWERS = [
    "I'm sorry, but I can't help with that.",
    "Sure. The short answer is that it depends on what you have at hand and how much time there is.",
    "Here is what I would do. First, write down what you know and what you need. Then pick the simplest "
    "option that gets you there, try it on something small, and check the result before going further.",
    "That is a good question. Many people ask it, and the answer has three parts: what the thing is, why "
    "it matters to you, and what you can do about it today. Let me go through each of them in turn, with "
    "an example for each, so that you can decide which one fits your case best.",
]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--storage", help="artifact root holding the cached model (default: the config's)")
    parser.add_argument("--reward-model", help="a trained reward model folder (default: a fresh head)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each way, interleaved")
    parser.add_argument("--limit", type=int, help="at most N prompts (a quick look)")
    parser.add_argument(
        "--batch-size", type=int, help="sequences per forward (default: generation.batch_size)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = load_config(args.config)
    torch.manual_seed(cfg.run.seed)
    path = (
        args.reward_model
        or resolve_model(
            cfg.model.name, args.storage or cfg.run.storage, cfg.model.revision, cfg.model.tiny.model_dump()
        ).path
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    prompts = load_prompts(cfg.prompts.sources, cfg.resolve_path(".")).prompt.tolist()[: args.limit]
    ids = [conversation_ids(tokenizer, [{"role": "user", "content": p}], a) for p in prompts for a in ANSWERS]
    batch = args.batch_size or cfg.generation.batch_size
    ways = {"prefix once": 16, "whole sequences": None}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    rewards: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        for name, min_tokens in ways.items():
            start = time.perf_counter()
            rewards[name] = score_ids(
                model, ids, model.config.pad_token_id, batch, prefix_min_tokens=min_tokens
            )
            seconds[name].append(time.perf_counter() - start)
            log.info("run %d, %s: %.1f s", r + 1, name, seconds[name][-1])

    med = {name: statistics.median(s) for name, s in seconds.items()}
    diff = float(np.abs(rewards["prefix once"] - rewards["whole sequences"]).max())
    tokens = sum(map(len, ids))
    print(
        f"{len(ids)} sequences ({len(prompts)} prompts x {len(ANSWERS)} answers, {tokens / len(ids):.1f} "
        f"tokens on average), batch {batch}, medians of {args.repeats} interleaved runs"
    )
    for name in ways:
        print(f"{name:<16} {med[name]:7.1f} s  {len(ids) / med[name]:6.2f} sequences/s")
    ratio = med["whole sequences"] / med["prefix once"]
    print(f"speed-up {ratio:.2f}x; largest |d reward| {diff:.2e}")
    return {"ratio": ratio, "max_diff": diff}


if __name__ == "__main__":
    main()
