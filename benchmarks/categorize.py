"""The prompts step's local categorisation, with the question's shared prefix run once and without.

    python benchmarks/categorize.py [--config configs/demo.yaml] [--storage DIR] [--repeats 2]

Every prompt is scored under the same classification question ("Which of these principles is
most at stake in the request below? ..."): its instructions are a prefix every context shares.
`GenerationEngine.score_choices` runs that prefix once per call and starts each row from its
key/value cache (`generation.prefix_cache`, on by default); this script categorises the config's
prompts both ways in one process, interleaved, and prints the seconds of each (medians), prompts
per second, the ratio, the largest difference of a label probability and how many labels differ.
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

from caiflow.categorize import label_probabilities, labels
from caiflow.config import load_config
from caiflow.constitution import load_constitution
from caiflow.generation import GenerationEngine
from caiflow.models import load_model_and_tokenizer, resolve_model
from caiflow.prompts import load_prompts

log = logging.getLogger("benchmarks.categorize")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--storage", help="artifact root holding the cached model (default: the config's)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each way, interleaved")
    parser.add_argument("--limit", type=int, help="at most N prompts (a quick look)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = load_config(args.config)
    constitution = load_constitution(cfg.constitution_path(), False, cfg.constitution.principles)
    prompts = load_prompts(cfg.prompts.sources, cfg.resolve_path(".")).prompt.tolist()[: args.limit]
    model = resolve_model(
        cfg.model.name, args.storage or cfg.run.storage, cfg.model.revision, cfg.model.tiny.model_dump()
    )
    m, tok = load_model_and_tokenizer(model, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)
    batch = cfg.prompts.categorize.batch_size
    engines = {
        "prefix once": GenerationEngine(m, tok, batch_size=batch),
        "whole prompts": GenerationEngine(m, tok, batch_size=batch, prefix_min_tokens=None),
    }
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    probs: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            probs[name] = label_probabilities(engine, constitution, prompts)
            seconds[name].append(time.perf_counter() - start)
            log.info("run %d, %s: %.1f s", r + 1, name, seconds[name][-1])

    med = {name: statistics.median(s) for name, s in seconds.items()}
    a, b = probs["prefix once"], probs["whole prompts"]
    flips = int((a.argmax(1) != b.argmax(1)).sum())
    print(
        f"{len(prompts)} prompts, {len(labels(constitution))} labels, batch {batch}, "
        f"medians of {args.repeats} interleaved runs"
    )
    for name in engines:
        print(f"{name:<14} {med[name]:7.1f} s  {len(prompts) / med[name]:6.2f} prompts/s")
    ratio = med["whole prompts"] / med["prefix once"]
    print(f"speed-up {ratio:.2f}x; largest |dP| {np.abs(a - b).max():.2e}; labels that differ {flips}")
    return {"ratio": ratio, "max_dp": float(np.abs(a - b).max()), "flips": flips}


if __name__ == "__main__":
    main()
