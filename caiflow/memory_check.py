"""Does a step fit, and which setting would make it: the memory plan (`caiflow.memory`) against
the visible GPU memory, the pre-step check and the printed table of `caiflow memory`."""

from __future__ import annotations

import copy
import os
from typing import Any

from caiflow.memory import GIB, RUNTIME_RESERVE, Shapes, StepMemory, step_memory

GPU_MEMORY_ENV = "CAIFLOW_GPU_MEMORY_GIB"  # overrides the visible GPU memory (tests, shared GPUs)


class MemoryPlanError(RuntimeError):
    """A step whose estimated peak exceeds the visible GPU memory; the message names the setting."""


def visible_gpu_bytes() -> float | None:
    """The GPU memory a step may use: $CAIFLOW_GPU_MEMORY_GIB, else the first CUDA device's total,
    else None (CPU only: the plan is printed, never enforced)."""
    value = os.environ.get(GPU_MEMORY_ENV)
    if value:
        try:
            return float(value) * GIB
        except ValueError:
            raise MemoryPlanError(
                f"{GPU_MEMORY_ENV}={value!r} is not a number: set it to GiB, e.g. 24."
            ) from None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.mem_get_info(0)[1])


def _set(cfg: dict, path: str, value: Any) -> dict:
    out = copy.deepcopy(cfg)
    node = out
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return out


def _candidates(step: str, cfg: dict) -> list[tuple[str, Any]]:
    """Single settings that lower a step's peak, cheapest for the results first."""
    section = {"sft": "sft", "reward_model": "reward_model", "rl": "rl"}.get(step)
    out: list[tuple[str, Any]] = []
    if section:
        out.append((f"{section}.gradient_checkpointing", True))
        per_device = cfg[section]["per_device_batch_size"] or cfg[section]["batch_size"]
        out += [
            (f"{section}.per_device_batch_size", d)
            for d in range(per_device - 1, 0, -1)
            if cfg[section]["batch_size"] % d == 0
        ]
    if step == "rl":
        out += [("reward_model.shared_backbone", True), ("rl.method", "qlora")]
        out += [("rl.scoring_batch_size", b) for b in (4, 2, 1) if b < cfg["rl"]["scoring_batch_size"]]
    if section in ("sft", "reward_model"):
        out.append((f"{section}.method", "qlora"))
    if step in ("prompts",):
        out += [
            ("prompts.categorize.batch_size", b)
            for b in (16, 8, 4, 2, 1)
            if b < cfg["prompts"]["categorize"]["batch_size"]
        ]
    if step in ("critique_revision", "preferences", "baseline", "evaluate"):
        b = cfg["generation"]["batch_size"]
        out += [("generation.batch_size", b // 2**k) for k in range(1, 8) if b // 2**k >= 1]
    if cfg["model"]["dtype"] == "float32":
        out.append(("model.dtype", "bfloat16"))
    return out


def suggest(step: str, cfg: dict, shapes: Shapes, limit: float) -> str:
    """The first single setting that brings the step under `limit`, as 'set KEY=VALUE (~X GiB)'."""
    for key, value in _candidates(step, cfg):
        try:
            peak = step_memory(step, _set(cfg, key, value), shapes).peak
        except (KeyError, TypeError):
            continue
        if peak <= limit:
            shown = str(value).lower() if isinstance(value, bool) else value
            return f"set {key}={shown} (plan ~{peak / GIB:.1f} GiB)"
    return "no single setting fits it: use a GPU with more memory or a smaller model"


def check_step(step: str, cfg: dict, shapes: Shapes, visible: float | None) -> StepMemory:
    """Raise MemoryPlanError (one line, naming the setting) when the step's plan exceeds `visible`."""
    m = step_memory(step, cfg, shapes)
    if visible is not None and m.peak > visible:
        raise MemoryPlanError(
            f"memory plan: step '{step}' needs ~{m.peak / GIB:.1f} GiB "
            f"but the GPU shows {visible / GIB:.1f} GiB: "
            f"{suggest(step, cfg, shapes, visible)}; `caiflow memory --config ...` shows the whole plan."
        )
    return m


def format_plan(plans: list[StepMemory], visible: float | None, title: str) -> str:
    lines = [title]
    for p in plans:
        verdict = ""
        if visible is not None:
            verdict = "  fits" if p.peak <= visible else f"  DOES NOT FIT {visible / GIB:.1f} GiB"
        lines.append(f"{p.step}: peak ~{p.peak / GIB:.2f} GiB{verdict}")
        for held in p.models:
            quant = f", {held.quant}" if held.quant != "none" else ""
            lines.append(
                f"  model  {held.role}: {held.params / 1e9:.3f}B params, {held.dtype}{quant}: "
                f"{held.bytes / GIB:.2f} GiB"
            )
        for label, size in p.parts.items():
            lines.append(f"  +      {label}: {size / GIB:.2f} GiB")
        lines.append(
            f"  +      runtime reserve (CUDA context, fragmentation): {RUNTIME_RESERVE / GIB:.2f} GiB"
        )
        lines += [f"  note   {n}" for n in p.notes]
    return "\n".join(lines)
