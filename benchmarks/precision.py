"""bfloat16 and int8 products against float32 on the default model: answers, choice scores, speed.

    python benchmarks/precision.py [--storage DIR] [--model NAME] [--prompts 16] [--new-tokens 32]
        [--repeats 2] [--candidates bfloat16,int8]

Loads the model in float32 and builds one engine per candidate: `bfloat16` (`model.dtype` in a
config) and `int8` (`generation.matmul: int8`, caiflow/int8.py). For each candidate it prints:

- greedy answers: the share of rows whose tokens are identical to float32's, and the mean share
  of tokens before the first difference (a row that differs once goes its own way after that);
- teacher-forced: float32's greedy answers fed to both models, the share of positions where the
  next-token argmax agrees and the mean KL(float32 || candidate) per position, in nats; this
  measures how far one step moves, which greedy rows (chaotic after one flip) do not;
- choice scores: the largest and mean absolute difference of P("(A)") on questions in the
  AI-feedback format, and how often the preferred option flips;
- throughput of the engine, float32 and each candidate interleaved, medians.

The prompts come after the first `caiflow.int8.CALIBRATION_PROMPTS` built-in prompts, which int8's
calibration reads. The verdict uses the tolerance below: a candidate is acceptable in place of
float32 only if greedy answers are identical on at least GREEDY_ROWS_SAME of the rows and choice
probabilities move by at most SCORE_ABS_TOL. `model.dtype` and `generation.matmul` are
fingerprinted, so switching either re-runs every step that generates.
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
from caiflow.int8 import CALIBRATION_PROMPTS
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


def greedy_agreement(ref: list[list[int]], other: list[list[int]]) -> tuple[float, float]:
    """Share of rows identical, mean share of a row's tokens before its first difference."""
    same = float(np.mean([a == b for a, b in zip(ref, other)]))
    before = []
    for a, b in zip(ref, other):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        before.append(k / max(len(a), 1))
    return same, float(np.mean(before))


@torch.no_grad()
def answer_log_probs(
    engine: GenerationEngine, prompts: list[str], answers: list[list[int]]
) -> list[torch.Tensor]:
    """Per row, the next-token log-probabilities at each answer position (prompt + answer fed whole)."""
    rows = [engine._encode(p) + a for p, a in zip(prompts, answers)]
    out = []
    for start in range(0, len(rows), 8):
        batch = rows[start : start + 8]
        ids, mask = engine._pad_left(batch)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = engine.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
        for i, answer in enumerate(answers[start : start + 8]):
            # left padding: the row ends at the last column; answer token j is predicted at -len(answer)-1+j
            width = len(answer)
            out.append(torch.log_softmax(logits[i, -width - 1 : -1], -1) if width else logits[i, :0])
    return out


def teacher_forced(ref: list[torch.Tensor], other: list[torch.Tensor]) -> tuple[float, float]:
    """Share of positions whose argmax agrees, mean KL(ref || other) per position."""
    r, o = torch.cat(ref), torch.cat(other)
    agree = (r.argmax(-1) == o.argmax(-1)).float().mean().item()
    kl = (r.exp() * (r - o)).sum(-1).mean().item()
    return agree, max(kl, 0.0)  # identical models: rounding can leave -1e-9


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="storage", help="artifact root holding the cached default model")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model (default: the built-in default)")
    parser.add_argument("--prompts", type=int, default=16, help="number of prompts")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per answer")
    parser.add_argument("--batch-size", type=int, default=16, help="engine batch size")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timed runs per side")
    parser.add_argument(
        "--candidates", default="bfloat16,int8", help="comma-separated: bfloat16, int8 (each against float32)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    candidates = [c for c in args.candidates.split(",") if c]
    unknown = sorted(set(candidates) - {"bfloat16", "int8"})
    if unknown:
        parser.error(f"--candidates: unknown {unknown}; use bfloat16 and/or int8")
    log.info("%s, bf16 CPU support: %s", load_average(), torch.ops.mkldnn._is_mkldnn_bf16_supported())

    resolved = resolve_model(args.model, args.storage)
    model, tokenizer = load_model_and_tokenizer(resolved, dtype="float32")
    engines = {"float32": GenerationEngine(model, tokenizer, batch_size=args.batch_size)}
    for name in candidates:
        if name == "bfloat16":
            bf16, tok = load_model_and_tokenizer(resolved, dtype="bfloat16")
            engines[name] = GenerationEngine(bf16, tok, batch_size=args.batch_size)
        else:
            engines[name] = GenerationEngine(model, tokenizer, batch_size=args.batch_size, matmul="int8")
    convs = load_prompts(CALIBRATION_PROMPTS + args.prompts)[CALIBRATION_PROMPTS:]
    prompts = [engines["float32"].format_chat(c) for c in convs]
    greedy = Sampling(max_new_tokens=args.new_tokens, temperature=0.0)
    seeds = list(range(len(convs)))
    ids = {name: e.generate_ids(prompts, greedy, seeds) for name, e in engines.items()}
    forced = {name: answer_log_probs(e, prompts, ids["float32"]) for name, e in engines.items()}
    questions = feedback_questions(convs)
    probs = {name: e.score_choices_chat(questions, ["(A)", "(B)"], "(") for name, e in engines.items()}
    log.info(
        "%d prompts (built-in, after the %d int8 calibrates on), %d greedy tokens",
        len(prompts),
        CALIBRATION_PROMPTS,
        args.new_tokens,
    )

    results: dict[str, dict[str, float]] = {}
    for name in candidates:
        same, before = greedy_agreement(ids["float32"], ids[name])
        agree, kl = teacher_forced(forced["float32"], forced[name])
        diff = np.abs(probs["float32"][:, 0] - probs[name][:, 0])
        flips = float(np.mean((probs["float32"][:, 0] > 0.5) != (probs[name][:, 0] > 0.5)))
        log.info(
            "%-8s greedy: %.0f%% of rows identical to float32, %.0f%% of tokens before the first difference; "
            "teacher-forced: argmax agrees on %.1f%%, KL %.4f nats/token; "
            "|dP(A)| max %.4f, mean %.4f; preferred option flips on %.0f%%",
            name,
            100 * same,
            100 * before,
            100 * agree,
            kl,
            diff.max(),
            diff.mean(),
            100 * flips,
        )
        results[name] = {
            "greedy_rows_same": same,
            "teacher_forced_agree": agree,
            "kl": kl,
            "score_max_abs_diff": float(diff.max()),
        }

    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=0.7, top_p=1.0)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            engine.generated_tokens = 0
            start = time.perf_counter()
            engine.generate_text(prompts, sampling, seeds)
            rates[name].append(engine.generated_tokens / (time.perf_counter() - start))
    base = statistics.median(rates["float32"])
    for name, r in rates.items():
        log.info(
            "engine %-9s median %6.1f tokens/s = %.2fx float32 (runs: %s)",
            name,
            statistics.median(r),
            statistics.median(r) / base,
            [round(x, 1) for x in r],
        )
    for name in candidates:
        res = results[name]
        res["speedup"] = statistics.median(rates[name]) / base
        ok = res["greedy_rows_same"] >= GREEDY_ROWS_SAME and res["score_max_abs_diff"] <= SCORE_ABS_TOL
        log.info(
            "verdict: %s %s the tolerance (greedy rows identical >= %.0f%%, |dP| <= %.2f)%s",
            name,
            "within" if ok else "OUTSIDE",
            100 * GREEDY_ROWS_SAME,
            SCORE_ABS_TOL,
            "" if ok else ": an opt-in, float32 stays the default",
        )
    log.info("after the runs: %s", load_average())
    return results


if __name__ == "__main__":
    main()
