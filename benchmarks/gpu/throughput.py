"""Section 1 of the GPU check: the engine's generation throughput against plain batched
``model.generate`` on the same model, prompts and batches. Holds the baseline (``hf_generate``),
the interleaved timing harness that section 1b reuses (``time_interleaved``, ``ForwardCounter``,
``summarize`` and the table cells) and ``part_generation``, the section itself.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessorList

from caiflow.generation import GenerationEngine, Sampling

from .common import (
    TEMPERATURE,
    TOP_P,
    Clock,
    Plan,
    Report,
    _cell,
    count,
    free,
    hf_encode,
    is_oom,
    on_cuda,
    peak_gib,
    setup_generation,
    sync,
)

# ---------------------------------------------------------------- 1. generation throughput


def new_token_count(rows: list[list[int]], eos: set[int]) -> int:
    """Real new tokens: each row up to (not including) its first EOS; pads only ever follow an EOS."""
    return sum(next((k for k, t in enumerate(r) if t in eos), len(r)) for r in rows)


def hf_config(tok, new_tokens: int, sample: bool = True) -> GenerationConfig:
    """The baseline's generation config: do_sample, temperature 0.7, top_p 0.9; or greedy (sample=False)."""
    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if not sample:
        return GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, **ids)
    return GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=True,
        temperature=TEMPERATURE,
        top_p=TOP_P,
        top_k=0,  # 0 = off (None means the library default, 50); the engine has none
        num_beams=1,
        **ids,
    )


def hf_generate(
    model,
    tok,
    prompts: list[str],
    batch: int,
    new_tokens: int,
    device: torch.device,
    sample: bool = True,
    processors: Callable[[list[int]], LogitsProcessorList] | None = None,
) -> int:
    """Plain batched model.generate, left-padded, longest prompts first (the engine's order); new tokens.

    Encodes, generates and decodes, as the engine's generate_text does, so both timings cover the same work.
    ``processors(seeds)``, if given, makes the logits processors of a batch from its rows' seeds (a row's
    seed is its prompt's index in ``prompts``), as the engine makes its PerRowSampler.
    """
    encoded = hf_encode(tok, prompts)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # stable sort, as the engine's
    config = hf_config(tok, new_tokens, sample)
    total = 0
    for start in range(0, len(order), batch):
        batch_rows = order[start : start + batch]
        rows = [encoded[i] for i in batch_rows]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, width - len(r) :] = torch.tensor(r)
            mask[k, width - len(r) :] = 1
        extra = {"logits_processor": processors(batch_rows)} if processors is not None else {}
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config, **extra
            )
        new = out[:, width:].tolist()
        tok.batch_decode(new, skip_special_tokens=True)  # the engine decodes too: same work on both sides
        total += new_token_count(new, {tok.eos_token_id})
    return total


# A timed variant: run(prompts, batch, new_tokens) -> (real new tokens, note).
Variant = tuple[str, Callable[[list[str], int, int], tuple[int, str]]]


class ForwardCounter:
    """Counts the model's forward calls (prefill + decode steps), to put a per-step cost next to tokens/s."""

    def __init__(self, model: torch.nn.Module):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.n += 1

    def close(self) -> None:
        self.handle.remove()


def time_interleaved(
    variants: list[Variant],
    prompts: list[str],
    batch: int,
    new_tokens: int,
    device: torch.device,
    clock: Clock,
    rep: Report,
    counter: ForwardCounter | None = None,
    reps: int = 2,
    tag: str = "",
) -> dict[str, dict[str, Any]]:
    """Timings of several variants at one batch size in which running first favours or costs none of them.

    First a full-size warm-up of each variant, not timed: its first ``batch`` prompts at the real
    ``new_tokens`` (the allocator's growth to this size, kernel selection and autotuning for these shapes).
    Then ``reps`` timed runs of each over all the prompts, in alternating order (A B C, C B A, A B C, ...),
    so a drift along the run falls on every variant alike. The global RNG is reseeded before every run
    (generate's do_sample draws from it), so each run of a variant makes the same tokens; no empty_cache
    between runs, so no run starts from an empty allocator. Returns per variant ``warmup_s``, ``runs``
    (tokens, forwards, seconds, peak_gib, note; in repetition order), ``error`` (a failed variant is left
    out of the later runs) and ``skipped`` (runs the time guard left out).
    """
    fns = dict(variants)
    out: dict[str, dict[str, Any]] = {
        name: {"warmup_s": None, "runs": [], "error": None, "skipped": 0} for name, _ in variants
    }

    def once(name: str, ps: list[str], label: str) -> dict[str, Any] | None:
        gc.collect()
        torch.manual_seed(0)
        sync(device)
        if on_cuda(device):
            torch.cuda.reset_peak_memory_stats(device)
        if counter is not None:
            counter.n = 0
        t0 = time.perf_counter()
        try:
            tokens, note = fns[name](ps, batch, new_tokens)
            sync(device)
        except Exception as exc:
            traceback.print_exc()
            kind = "OOM" if is_oom(exc) else "ERROR"
            out[name]["error"] = f"{kind} {type(exc).__name__}: {str(exc)[:80]}"
            rep.data.setdefault("failed", {})[f"{tag}{name} B={batch} {label}"] = kind
            rep.line(f"  B={batch} {name} {label}: {kind} {type(exc).__name__}")
            free(device)
            return None
        secs = time.perf_counter() - t0
        forwards = counter.n if counter is not None else None
        rep.line(
            f"  B={batch} {name} {label}: {tokens} tokens"
            + (f", {forwards} forwards" if forwards is not None else "")
            + f", {secs:.2f}s (total {clock.elapsed():.0f}s)"
        )
        return {
            "tokens": tokens,
            "forwards": forwards,
            "seconds": secs,
            "peak_gib": peak_gib(device),
            "note": note,
        }

    warm_ps = prompts[:batch]
    for name, _ in variants:
        if clock.over():
            out[name]["skipped"] = reps + 1
            continue
        first = once(name, warm_ps, f"warm-up ({len(warm_ps)} prompts, not timed)")
        if first is not None:
            out[name]["warmup_s"] = first["seconds"]
    ready = [name for name, _ in variants if out[name]["warmup_s"] is not None]
    for r in range(reps):
        for name in ready if r % 2 == 0 else ready[::-1]:
            if out[name]["error"] is not None:
                continue
            if clock.over():
                out[name]["skipped"] += 1
                continue
            run = once(name, prompts, f"run {r + 1}/{reps}")
            if run is not None:
                out[name]["runs"].append(run)
    return out


def _middle(values: list[float]) -> float:
    """The median; the value itself when all are equal (token counts stay integers)."""
    return values[0] if len(set(values)) == 1 else statistics.median(values)


def summarize(result: dict[str, Any]) -> dict[str, Any] | None:
    """One variant's figures from its runs: medians, the spread of its seconds, its runs; None if none ran."""
    runs = result["runs"]
    if not runs:
        return None
    secs = [r["seconds"] for r in runs]
    forwards = [r["forwards"] for r in runs if r["forwards"]]
    peaks = [r["peak_gib"] for r in runs if r["peak_gib"] is not None]
    return {
        "tokens": _middle([r["tokens"] for r in runs]),
        "forwards": _middle(forwards) if forwards else None,
        "seconds": _middle(secs),
        "tokens_per_s": _middle([r["tokens"] / r["seconds"] for r in runs]),
        "ms_per_forward": (
            _middle([r["seconds"] / r["forwards"] * 1e3 for r in runs])
            if len(forwards) == len(runs)
            else None
        ),
        "min_s": min(secs),
        "max_s": max(secs),
        "runs_s": secs,
        "warmup_s": result["warmup_s"],
        "peak_gib": max(peaks) if peaks else None,
        "note": runs[-1]["note"],
        "error": result["error"],
        "skipped_runs": result["skipped"],
    }


def spread_cells(s: dict[str, Any]) -> list[str]:
    """The min-max and runs cells of a summary: "2.31-2.45" and "2.31/2.45" (seconds, repetition order)."""
    return [f"{_cell(s['min_s'])}-{_cell(s['max_s'])}", "/".join(_cell(x) for x in s["runs_s"])]


def status_note(s: dict[str, Any] | None, result: dict[str, Any], reps: int) -> str:
    """What went short for a variant: its error, or the runs the time guard left out."""
    if result["error"]:
        return result["error"]
    if s is None:
        return "skipped (time guard)"
    return f"{len(s['runs_s'])} of {reps} runs (time guard)" if len(s["runs_s"]) < reps else ""


def part_generation(plan: Plan, device: torch.device, clock: Clock, rep: Report) -> None:
    shape = plan.gen_model
    tok, model, prompts, lengths = setup_generation(plan, device, rep)
    seeds = list(range(len(prompts)))
    reps = 2

    def engine(ps: list[str], batch: int, n: int) -> tuple[int, str]:
        eng = GenerationEngine(model, tok, batch_size=batch)
        eng.generate_text(
            ps, Sampling(max_new_tokens=n, temperature=TEMPERATURE, top_p=TOP_P), seeds[: len(ps)]
        )
        return eng.generated_tokens, f"backoffs={eng.backoffs}"

    variants: list[Variant] = [
        ("engine", engine),
        ("generate", lambda ps, b, n: (hf_generate(model, tok, ps, b, n, device), "")),
    ]
    rep.line(
        f"each side: a full-size warm-up batch (first B prompts x {plan.new_tokens} new tokens, not timed), "
        f"then {reps} timed runs over all prompts in alternating order (engine, generate, generate, engine)"
    )
    rows, figures = [], {}
    for batch in plan.batch_sizes:
        if clock.over():
            rep.line(f"B={batch}: skipped (time guard)")
            continue
        results = time_interleaved(variants, prompts, batch, plan.new_tokens, device, clock, rep, reps=reps)
        sums = {name: summarize(results[name]) for name, _ in variants}
        e, g = sums["engine"], sums["generate"]
        ratio = e["tokens_per_s"] / g["tokens_per_s"] if e and g else None
        for name, _ in variants:
            s = sums[name]
            short = status_note(s, results[name], reps)
            if s is None:
                rows.append([f"{name} B={batch}", None, None, None, None, None, None, None, short])
                continue
            note = s["note"] if name == "engine" else f"engine/generate={_cell(ratio)}"
            note = "; ".join(x for x in (note, short) if x)
            rows.append(
                [f"{name} B={batch}", s["tokens"], s["seconds"], s["tokens_per_s"], s["peak_gib"]]
                + spread_cells(s)
                + [s["warmup_s"], note]
            )
        figures[str(batch)] = {**sums, "ratio_engine_over_generate": ratio}
        rep.data["generation"] = {"by_batch": figures}
        rep.save()
    rep.line(
        f"-- {len(prompts)} prompts x {plan.new_tokens} new tokens; tokens, seconds, tokens/s: median of the "
        f"{reps} runs; runs s: each run's seconds in the order of the repetitions"
    )
    rep.table(
        ["side", "tokens", "seconds", "tokens/s", "peak GiB", "min-max s", "runs s", "warm-up s", "note"],
        rows,
    )
    rep.data["generation"] = {
        "model": asdict(shape),
        "params": count(model),
        "prompts": len(prompts),
        "prompt_tokens": [min(lengths), max(lengths), float(np.mean(lengths))],
        "new_tokens": plan.new_tokens,
        "repetitions": reps,
        "order": "full-size warm-up of each, then A B, B A",
        "by_batch": figures,
    }
