"""Section 1b of the GPU check (``--diagnose``): why the engine is slower than plain
``model.generate``. Host-device syncs per forward, the six timed variants at the largest batch
size (generate and the engine, sampling and greedy, the engine's sampler inside generate) and,
with ``--profile``, a micro-benchmark of ``PerRowSampler`` part by part and torch.profiler's top
ops; ``part_diagnose`` runs them in that order.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from caiflow.generation import GenerationEngine, Sampling

from .common import (
    DTYPE,
    TEMPERATURE,
    TOP_P,
    Clock,
    Plan,
    Report,
    _cell,
    free,
    is_oom,
    on_cuda,
    setup_generation,
    sync,
)
from .throughput import (
    ForwardCounter,
    Variant,
    hf_generate,
    spread_cells,
    status_note,
    summarize,
    time_interleaved,
)

# ---------------------------------------------------------------- 1b. diagnosis: why the engine is slower


def count_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Host-device synchronisations during fn() (torch.cuda's sync debug mode); None without CUDA."""
    if not on_cuda(device):
        fn()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)  # outside the debug mode: this one is ours, not fn's
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def time_calls(fn: Callable[[], Any], calls: int, device: torch.device) -> tuple[float, float]:
    """(host ms per call to enqueue, wall ms per call with a synchronize at the end) over `calls` calls.

    wall >> host: the device is the bottleneck and wall is its time; wall ~ host: host-bound or syncing.
    """
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync(device)
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e3, (t2 - t0) / calls * 1e3


def diag_sampler_micro(batch: int, vocab: int, device: torch.device, rep: Report, calls: int = 50) -> None:
    """PerRowSampler.__call__ on one (batch, vocab) bf16 scores tensor, whole and part by part."""
    from caiflow import generation as cgen  # attributes read here, so a renamed helper fails only this part

    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.randn(batch, vocab, device=device, generator=g).to(DTYPE)  # ~ the random model's logits
    scores32 = scores.float()  # what generate passes to logits processors (it upcasts the logits)
    input_ids = torch.randint(3, vocab, (batch, 200), device=device, generator=g)
    seeds = list(range(batch))
    sampler = cgen.PerRowSampler(seeds, TEMPERATURE, TOP_P, device)
    sampler_p1 = cgen.PerRowSampler(seeds, TEMPERATURE, 1.0, device)
    logp = torch.log_softmax(scores.float() / TEMPERATURE, dim=-1)
    try:
        u = cgen.row_uniforms(sampler.seeds, 5, vocab)
    except Exception:  # its own row below reports the error; the other parts still run
        u = torch.rand(batch, vocab, device=device, generator=g)
    picks = (logp - torch.log(-torch.log(u))).argmax(dim=-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(TEMPERATURE), TopPLogitsWarper(TOP_P)])
    parts: list[tuple[str, Callable[[], Any]]] = [
        ("PerRowSampler.__call__ top_p=0.9, bf16 scores", lambda: sampler(input_ids, scores)),
        ("PerRowSampler.__call__ top_p=0.9, fp32 scores", lambda: sampler(input_ids, scores32)),
        ("PerRowSampler.__call__ top_p=1.0, fp32 scores", lambda: sampler_p1(input_ids, scores32)),
        ("  a. log_softmax(scores.float() / T)", lambda: torch.log_softmax(scores.float() / TEMPERATURE, -1)),
        ("  b. top-p: log(_top_p_filter(exp))", lambda: torch.log(cgen._top_p_filter(logp.exp(), TOP_P))),
        ("  c. row_uniforms", lambda: cgen.row_uniforms(sampler.seeds, 5, vocab)),
        ("  d. gumbel noise + argmax", lambda: (logp - torch.log(-torch.log(u))).argmax(dim=-1)),
        (
            "  e. full_like(-inf) + scatter_",
            lambda: torch.full_like(scores32, float("-inf")).scatter_(1, picks.unsqueeze(1), 0.0),
        ),
        (
            "generate sampling: warpers+softmax+multinomial",
            lambda: torch.multinomial(
                torch.softmax(warpers(input_ids, scores32.clone()), dim=-1), num_samples=1
            ),
        ),
        ("generate greedy: argmax", lambda: scores32.argmax(dim=-1)),
    ]
    rows, figures = [], {}
    with torch.inference_mode():
        for name, fn in parts:
            try:
                host, wall = time_calls(fn, calls, device)
                syncs = count_syncs(fn, device)
                rows.append([name, host, wall, syncs])
                figures[name.strip()] = {"host_ms": host, "wall_ms": wall, "syncs": syncs}
            except Exception as exc:
                rows.append([name, None, None, f"ERROR {type(exc).__name__}: {str(exc)[:60]}"])
                figures[name.strip()] = {"error": f"{type(exc).__name__}: {exc}"}
    rep.line(
        f"-- PerRowSampler micro-benchmark: scores ({batch}, {vocab}), {calls} calls each; host = time "
        "to enqueue, wall = with one synchronize at the end (device-bound: wall >> host)"
    )
    rep.table(["part", "host ms/call", "wall ms/call", "syncs/call"], rows)
    rep.data.setdefault("diagnose", {})["sampler_micro"] = {
        "batch": batch,
        "vocab": vocab,
        "calls": calls,
        "parts": figures,
    }
    rep.save()


def diag_variants(
    model, tok, prompts: list[str], device: torch.device
) -> list[tuple[str, Callable[[list[str], int, int], tuple[int, str]]]]:
    """The timed variants: run(prompts, batch, new_tokens) -> (real new tokens, note)."""
    from caiflow import generation as cgen

    seeds = list(range(len(prompts)))

    def engine(temperature: float, top_p: float) -> Callable[[list[str], int, int], tuple[int, str]]:
        def run(ps: list[str], batch: int, n: int) -> tuple[int, str]:
            eng = GenerationEngine(model, tok, batch_size=batch)
            eng.generate_text(
                ps, Sampling(max_new_tokens=n, temperature=temperature, top_p=top_p), seeds[: len(ps)]
            )
            return eng.generated_tokens, f"backoffs={eng.backoffs}"

        return run

    def sampler(rows: list[int]) -> LogitsProcessorList:  # rows' seeds: their prompt indices
        return LogitsProcessorList([cgen.PerRowSampler(rows, TEMPERATURE, TOP_P, device)])

    return [
        ("1 generate sample p=0.9", lambda ps, b, n: (hf_generate(model, tok, ps, b, n, device), "baseline")),
        ("2 generate greedy", lambda ps, b, n: (hf_generate(model, tok, ps, b, n, device, sample=False), "")),
        ("3 engine greedy", engine(0.0, 1.0)),
        ("4 engine sample p=1.0", engine(TEMPERATURE, 1.0)),
        ("5 engine sample p=0.9", engine(TEMPERATURE, TOP_P)),
        (
            "6 generate greedy+PerRowSampler",
            lambda ps, b, n: (
                hf_generate(model, tok, ps, b, n, device, sample=False, processors=sampler),
                "p=0.9, direct",
            ),
        ),
    ]


def diag_generation(
    variants: list[Variant],
    prompts: list[str],
    batch: int,
    new_tokens: int,
    device: torch.device,
    counter: ForwardCounter,
    clock: Clock,
    rep: Report,
    reps: int = 2,
) -> None:
    """Every variant over all prompts at one batch size: full-size warm-ups, then interleaved timed runs."""
    order = " ".join(name.split()[0] for name, _ in variants)
    rep.line(
        f"-- B={batch}: each variant warmed up on a full batch ({min(batch, len(prompts))} prompts x "
        f"{new_tokens} new tokens, not timed), then {reps} timed runs each in alternating order "
        f"({order}, then reversed)"
    )
    results = time_interleaved(
        variants, prompts, batch, new_tokens, device, clock, rep, counter=counter, reps=reps, tag="diagnose "
    )
    sums = {name: summarize(results[name]) for name, _ in variants}
    base = sums[variants[0][0]]
    rows, figures = [], {}
    for name, _ in variants:
        s = sums[name]
        short = status_note(s, results[name], reps)
        if s is None:
            rows.append([name] + [None] * 11 + [short])
            figures[name] = {"error": results[name]["error"], "skipped_runs": results[name]["skipped"]}
            continue
        ratio = s["tokens_per_s"] / base["tokens_per_s"] if base else None
        rows.append(
            [name, s["tokens"], s["forwards"], s["seconds"], s["tokens_per_s"], s["ms_per_forward"], ratio]
            + spread_cells(s)
            + [s["warmup_s"], s["peak_gib"], "; ".join(x for x in (s["note"], short) if x)]
        )
        figures[name] = {**s, "ratio_vs_baseline": ratio}
    rep.data.setdefault("diagnose", {}).setdefault("by_batch", {})[str(batch)] = {
        "repetitions": reps,
        "variants": figures,
    }
    rep.line(
        f"-- B={batch}, {len(prompts)} prompts x {new_tokens} new tokens; tokens to ms/forward: median of "
        f"the {reps} runs; ratio = tokens/s over variant 1's; runs s: each run's seconds, repetition order"
    )
    rep.table(
        [
            "variant",
            "tokens",
            "forwards",
            "seconds",
            "tokens/s",
            "ms/forward",
            "ratio",
            "min-max s",
            "runs s",
            "warm-up s",
            "peak GiB",
            "note",
        ],
        rows,
    )
    rep.save()


def diag_syncs(
    variants,
    prompts: list[str],
    batch: int,
    device: torch.device,
    counter: ForwardCounter,
    rep: Report,
    new_tokens: int = 4,
) -> None:
    """Host-device synchronisations per forward of each variant, on one short batch."""
    rows, figures = [], {}
    for name, run in variants:
        try:
            counter.n = 0
            syncs = count_syncs(lambda run=run: run(prompts[:batch], batch, new_tokens), device)
            per = syncs / counter.n if syncs is not None and counter.n else None
            rows.append([name, counter.n, syncs, per])
            figures[name] = {"forwards": counter.n, "syncs": syncs, "syncs_per_forward": per}
        except Exception as exc:
            rows.append([name, None, None, f"ERROR {type(exc).__name__}: {str(exc)[:80]}"])
    rep.line(
        f"-- host-device syncs (torch.cuda sync debug mode), one batch of {batch} x {new_tokens} new tokens"
    )
    rep.table(["variant", "forwards", "syncs", "syncs/forward"], rows)
    rep.data.setdefault("diagnose", {})["syncs"] = figures
    rep.save()


def diag_profile(
    variants,
    prompts: list[str],
    batch: int,
    new_tokens: int,
    device: torch.device,
    counter: ForwardCounter,
    rep: Report,
) -> None:
    """torch.profiler on one short batch of the engine (top_p 0.9) and of plain generate: the top ops."""
    from torch.profiler import ProfilerActivity, profile

    chosen = {name: run for name, run in variants if name[0] in "15"}
    cuda = on_cuda(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for name in sorted(chosen, reverse=True):  # the engine (5) first
        try:
            counter.n = 0
            sync(device)
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                chosen[name](prompts[:batch], batch, new_tokens)
                sync(device)
            wall = time.perf_counter() - t0
            avg = prof.key_averages()
            dev_ms = sum(getattr(e, "self_device_time_total", 0) or 0 for e in avg) / 1e3 if cuda else None
            cpu_ms = sum(e.self_cpu_time_total for e in avg) / 1e3
            rep.line(
                f"-- profile: {name}, one batch of {batch} x {new_tokens} new tokens: "
                f"{counter.n} forwards, wall {wall:.2f}s (profiled), "
                f"self device total {_cell(dev_ms)} ms, self CPU total {cpu_ms:.1f} ms; top 15 by {key}"
            )
            for line in avg.table(sort_by=key, row_limit=15).splitlines():
                rep.line(line)
            if cuda and name.startswith("5 "):
                rep.line(f"-- profile: {name}: top 10 by self_cpu_time_total")
                for line in avg.table(sort_by="self_cpu_time_total", row_limit=10).splitlines():
                    rep.line(line)
            rep.data.setdefault("diagnose", {}).setdefault("profile", {})[name] = {
                "wall_s": wall,
                "forwards": counter.n,
                "self_device_ms": dev_ms,
                "self_cpu_ms": cpu_ms,
            }
        except Exception as exc:  # the profiler is a nicety: never the reason the run fails
            first = (str(exc).splitlines() or [""])[0][:200]
            rep.line(f"-- profile {name} failed: {type(exc).__name__}: {first}")
        rep.save()


def part_diagnose(plan: Plan, device: torch.device, clock: Clock, rep: Report, profile: bool = False) -> None:
    tok, model, prompts, _ = setup_generation(plan, device, rep)
    variants = diag_variants(model, tok, prompts, device)
    counter = ForwardCounter(model)
    big = max(plan.batch_sizes)
    steps: list[tuple[str, Callable[[], None]]] = []
    if profile:
        steps.append(
            ("sampler micro-benchmark", lambda: diag_sampler_micro(big, plan.gen_model.vocab, device, rep))
        )
    steps.append(("syncs", lambda: diag_syncs(variants, prompts, min(big, 8), device, counter, rep)))
    steps.append(
        (
            f"variants B={big}",
            lambda: diag_generation(variants, prompts, big, plan.new_tokens, device, counter, clock, rep),
        )
    )
    if profile:  # last, so no profiler state can touch the timings above
        steps.append(
            (
                "profile",
                lambda: diag_profile(variants, prompts, big, min(16, plan.new_tokens), device, counter, rep),
            )
        )
    else:
        rep.line("(sampler micro-benchmark and profiler: only with --profile)")
    try:
        for name, step in steps:
            rep.line()
            if clock.over():
                rep.line(f"[diagnose: {name}] skipped: over the {clock.limit_s:.0f}s time guard")
                rep.data.setdefault("skipped", []).append(f"diagnose {name}")
                continue
            t0 = time.perf_counter()
            try:
                step()
            except Exception as exc:
                traceback.print_exc()
                kind = "OOM" if is_oom(exc) else "ERROR"
                rep.line(f"[diagnose: {name}] {kind}: {type(exc).__name__}: {str(exc)[:200]}")
                rep.data.setdefault("failed", {})[f"diagnose {name}"] = kind
            free(device)
            rep.line(f"[diagnose: {name}] {time.perf_counter() - t0:.1f}s (total {clock.elapsed():.1f}s)")
            rep.save()
    finally:
        counter.close()
