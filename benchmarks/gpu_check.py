"""One prepared GPU check: engine throughput and peak memory of a 7B-shaped pipeline.

    bash benchmarks/gpu_check.sh            # on the GPU machine (about 3-4 minutes on an H100)
    bash benchmarks/gpu_check.sh --smoke    # tiny configs on CPU, to validate the code paths
    bash benchmarks/gpu_check.sh --diagnose # only 1b below: why the engine is slower (about 1.5-2 min)
    bash benchmarks/gpu_check.sh --diagnose --profile  # 1b with its micro-benchmark and profiler too
    PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --smoke   # with this repository's venv

Everything is built offline from configs with random weights; no download, no checkpoint. The
script imports only torch, numpy, transformers (with its ``tokenizers``), peft and
``caiflow.generation`` (which itself imports only torch, numpy and transformers), so it runs where
pydantic, trl and bitsandbytes are missing.

1. Generation throughput. A ~1.7B Llama-style model (SmolLM2-1.7B's shape) in bf16 generates
   128 new tokens for 128 synthetic chat prompts of 20-200 tokens, at batch sizes 32 and 128,
   once through ``caiflow.generation.GenerationEngine.generate_text`` (per-row seeded sampling)
   and once through plain batched ``model.generate`` (left padding, do_sample, same temperature
   0.7 and top_p 0.9, the same length-sorted order and batches). Only real new tokens count (up
   to EOS, no padding). So that running first (allocator growth, kernel selection and autotuning
   for new shapes) costs neither side, each side first runs one untimed full-size warm-up batch at
   that batch size (the first B prompts, 128 new tokens); then both are timed twice over all
   prompts in alternating order (engine, generate, generate, engine). The table gives each side's
   median of its two runs, their min-max and each run's seconds.
2. Peak accelerator memory of the memory-heavy parts of a 7B pipeline (Llama-2-7B shape, bf16):
   (a) weights, (b) one LoRA SFT step at 1x1024 and 4x1024 (gradient checkpointing, AdamW),
   (c) the KV cache of greedy generation at batch 32, prompt 512, 256 new tokens, (d) a LoRA
   reward-model step at 4 chosen + 4 rejected x 1024, (e) loading and deleting a second 7B model
   (a judge) next to the policy. Each measured peak stands next to the estimate of the project's
   memory plan (``caiflow.memory``, what ``caiflow memory`` prints, without its 1 GiB runtime
   reserve) and to the bare arithmetic, so the plan's formulas can be checked against it.
   Earlier H200 figures (which calibrated the plan): weights 12.58 GiB (arithmetic 12.55),
   LoRA SFT 1x1024 13.43 and 4x1024 15.71, KV cache 12.19 over the weights (arithmetic 12.00),
   LoRA reward step 4+4x1024 17.83, judge load 25.17 and 12.61 after del.
3. Device, library versions and timings.

1b. ``--diagnose`` runs only this (no sections 1 and 2; time guard 200 s unless ``--time-limit``):
   why the engine is slower than plain ``model.generate``, on section 1's model and prompts.
   (i) Syncs per forward of each variant below, on one short batch (torch.cuda's sync debug mode).
   (ii) At B=128 only: 1 generate do_sample (the baseline: temperature 0.7, top_p 0.9, top_k off),
   2 generate greedy, 3 engine greedy (temperature 0: the engine without its sampler), 4 engine
   sampling top_p 1.0 (no sort), 5 engine sampling top_p 0.9 (as in 1), 6 generate greedy with the
   engine's PerRowSampler passed directly as logits_processor. Each variant first runs one untimed
   full-size warm-up batch (the first 128 prompts, 128 new tokens); then all are timed twice, in
   the order 1..6 and then 6..1, so the order's effects show up and cancel. Per variant: real new
   tokens, forwards (prefill + decode steps, by a forward hook), seconds, tokens/s and ms per
   forward (medians of its two runs), tokens/s over the baseline's, min-max and each run's
   seconds, the warm-up's seconds. With ``--profile`` also, first, (iii) ``PerRowSampler.__call__``
   on one (128, 49152) scores tensor, whole and part by part (log_softmax, the top-p filter,
   row_uniforms, Gumbel noise + argmax, full_like + scatter), next to what generate does instead
   (its temperature and top-p warpers, softmax, multinomial): host ms to enqueue, wall ms with a
   synchronize, syncs per call; and last (iv) torch.profiler on one B=128 batch of 16 new tokens
   of variants 5 and 1: the top 15 ops by self CUDA time (and variant 5's top 10 by self CPU time).

Output: plain-text tables on stdout; when ``$OUT`` is set, also ``$OUT/gpu_check.txt`` and the
figures as ``$OUT/gpu_check.json`` (both rewritten after every part, so a run cut short still
leaves what it measured). A global time guard (``--time-limit``, 300 s) skips the parts not
started in time; an out-of-memory error in a part is recorded as "OOM" and the next part runs; any
other error is printed with its traceback, recorded as "ERROR", and makes the exit status 1.
``--skip generation`` or ``--skip memory`` leaves a section out.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import numpy as np
import peft
import torch
import transformers

# benchmarks/gpu/: importable as `gpu`, since a script's own folder (benchmarks/) leads sys.path
from gpu.common import FULL, GIB, SMOKE, Clock, Report, free, is_oom, on_cuda
from gpu.diagnose import part_diagnose
from gpu.memory import LORA_TARGETS, MemoryRows, part_judge, part_kv_cache, part_reward, part_weights_and_sft
from gpu.throughput import part_generation

# ---------------------------------------------------------------- main


def run_part(name: str, fn: Callable[[], None], clock: Clock, rep: Report) -> None:
    if clock.over():
        rep.line(f"[{name}] skipped: over the {clock.limit_s:.0f}s time guard ({clock.elapsed():.0f}s)")
        rep.data.setdefault("skipped", []).append(name)
        rep.save()
        return
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # one shot on the GPU machine: note the failure and go on to the next part
        kind = "OOM" if is_oom(exc) else "ERROR"
        if kind == "ERROR":
            traceback.print_exc()
        rep.line(f"[{name}] {kind}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
        rep.data.setdefault("failed", {})[name] = kind
    free(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    secs = time.perf_counter() - t0
    rep.data.setdefault("part_seconds", {})[name] = secs
    rep.line(f"[{name}] {secs:.1f}s (total {clock.elapsed():.1f}s)")
    rep.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny configs (CPU is fine): validates the code paths"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds after which parts not yet started are skipped (default 300; 200 with --diagnose)",
    )
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: generation,memory")
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="only section 1b: why the engine is slower than model.generate (syncs, the timed "
        "variants at the largest batch size); no sections 1 and 2",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="with --diagnose, also the PerRowSampler micro-benchmark and the torch.profiler tables",
    )
    args = parser.parse_args(argv)
    if args.time_limit is None:
        args.time_limit = 200.0 if args.diagnose else 300.0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.smoke and not on_cuda(device):
        print("no CUDA device: the full check needs a GPU; use --smoke to validate on CPU", file=sys.stderr)
        return 2
    # Generation-flag and checkpointing notices would drown the tables; gradient_checkpointing_* is
    # renamed in newer transformers (a FutureWarning) but is the name the GPU machine's version has.
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(0)
    plan = SMOKE if args.smoke else FULL
    clock = Clock(args.time_limit)
    rep = Report(os.environ.get("OUT"))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.diagnose:
        skip |= {"generation", "memory"}

    name = torch.cuda.get_device_name(device) if on_cuda(device) else platform.processor() or "cpu"
    total_mem = torch.cuda.get_device_properties(device).total_memory / GIB if on_cuda(device) else None
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
    }
    mode = (
        ("smoke" if args.smoke else "full")
        + (" diagnose" if args.diagnose else "")
        + (" profile" if args.diagnose and args.profile else "")
    )
    rep.data.update(
        {
            "mode": mode,
            "device": name,
            "device_total_gib": total_mem,
            "versions": versions,
            "time_limit_s": args.time_limit,
        }
    )
    rep.line(
        f"gpu_check ({mode}): device {name}"
        + (f", {total_mem:.1f} GiB" if total_mem else "")
        + f"; time guard {args.time_limit:.0f}s"
    )
    rep.line("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))

    if args.diagnose:
        rep.line()
        g = plan.gen_model
        rep.line(
            f"== 1b. diagnosis: engine vs model.generate ({g.hidden}-hidden, {g.layers} layers, "
            f"vocab {g.vocab}, bf16; batch size {max(plan.batch_sizes)})"
        )
        run_part("diagnose", lambda: part_diagnose(plan, device, clock, rep, args.profile), clock, rep)
        free(device)

    if "generation" not in skip:
        rep.line()
        g = plan.gen_model
        rep.line(
            f"== 1. generation throughput: engine vs batched model.generate ({g.hidden}-hidden, "
            f"{g.layers} layers, vocab {g.vocab}, bf16)"
        )
        run_part("generation", lambda: part_generation(plan, device, clock, rep), clock, rep)
        free(device)

    if "memory" not in skip:
        rep.line()
        m = plan.mem_model
        rep.line(
            f"== 2. peak memory, 7B-shaped pipeline ({m.hidden}-hidden, {m.layers} layers, "
            f"vocab {m.vocab}, bf16, LoRA r={plan.lora_r} on {len(LORA_TARGETS)} projections)"
        )
        mem = MemoryRows(rep)
        # c and e before d: the KV cache and the judge swap matter most to the planner if time runs short.
        for part, fn in [
            ("a+b weights, SFT", part_weights_and_sft),
            ("c KV cache", part_kv_cache),
            ("e judge", part_judge),
            ("d reward", part_reward),
        ]:
            run_part(part, lambda fn=fn: fn(plan, device, clock, mem), clock, rep)
        rep.line()
        rep.table(
            ["part", "measured peak GiB", "plan GiB", "arithmetic GiB", "note"],
            sorted(mem.rows, key=lambda r: r[0]),
        )
        if not on_cuda(device):
            rep.line("(no accelerator: measured figures are n/a)")

    rep.line()
    rep.line(f"total {clock.elapsed():.1f}s")
    rep.data["total_s"] = clock.elapsed()
    rep.save()
    return 1 if "ERROR" in rep.data.get("failed", {}).values() else 0


if __name__ == "__main__":
    sys.exit(main())
