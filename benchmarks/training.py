"""SFT time on the default model: float32, bf16 autocast, packing, every position scored, torch's kernels.

    python benchmarks/training.py [--storage DIR] [--rows 32] [--variants fp32,bf16,packing]

Each variant fine-tunes a LoRA adapter (the demo's settings: r 16, batch 8, per-device 4,
max_length 384) for one epoch over the same rows (built-in prompts with a short answer each)
and prints the epoch's seconds (model loading included) and its optimiser steps: packing puts
several rows in one sequence, so it takes fewer steps for the same rows. The variants run one
after another; the load average is printed with each. First it prints the rate of one matrix
product of the model's MLP shape in float32 and in bfloat16 on this machine (what autocast
could gain at best). ``all-positions`` is float32 with TRL's output head scoring every position
(prompt and padding too), as TRL does on the CPU unless `score_labelled_positions_only` is in place.
``torch-kernels`` is float32 on torch's own products (``model.cpu_kernels: false``); every other
variant runs LoRA's frozen base weights on oneDNN's packed products (caiflow.cpu_kernels).
``bf16-flash`` and ``fp32-flash`` send training's attention to SDPA's flash kernel, as before the
CPU kernels took it over (``caiflow.cpu_kernels._training_attention``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's caiflow and benchmarks

import pandas as pd

import caiflow.training.sft as sft_module
from benchmarks.generation import load_average, load_prompts
from caiflow.models import DEFAULT_MODEL, resolve_model
from caiflow.training.common import score_labelled_positions_only
from caiflow.training.config import SFTConfig
from caiflow.training.sft import train_sft

log = logging.getLogger("benchmarks.training")

VARIANTS = {
    "fp32": {},
    "bf16": {"bf16_autocast": True},
    "packing": {"packing": True},
    "bf16+packing": {"bf16_autocast": True, "packing": True},
    "all-positions": {},  # float32, the output head scoring every position (see every_position)
    "torch-kernels": {},  # float32 on torch's products (train_sft's fast_cpu=False)
    "bf16-flash": {"bf16_autocast": True},  # training's attention on SDPA's flash kernel (flash_attention)
    "fp32-flash": {},
}


@contextmanager
def flash_attention(enabled: bool):
    """While enabled, the CPU kernels leave training's attention to transformers' SDPA (its flash kernel)."""
    if not enabled:
        yield
        return
    import caiflow.cpu_kernels as kernels

    own = kernels._training_attention

    def sdpa(module, query, key, value, attention_mask, scaling, is_causal):
        out, _ = kernels.sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, is_causal=is_causal
        )
        return out

    kernels._training_attention = sdpa
    try:
        yield
    finally:
        kernels._training_attention = own


@contextmanager
def every_position(enabled: bool):
    """While enabled, train_sft leaves TRL's output head scoring every position (TRL's CPU default)."""
    if not enabled:
        yield
        return
    sft_module.score_labelled_positions_only = lambda: score_labelled_positions_only(False)
    try:
        yield
    finally:
        sft_module.score_labelled_positions_only = score_labelled_positions_only
        score_labelled_positions_only()  # as every training entry point leaves it


def records(n: int) -> pd.DataFrame:
    rows = []
    for i, conv in enumerate(load_prompts(n)):
        prompt = conv[-1]["content"]
        answer = "I can't help with that, but here is something safer you could do instead. " * (1 + i % 3)
        rows.append(
            {
                "prompt_id": f"p{i}",
                "kind": "red-team" if i % 4 else "benign",
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                "drop_reason": None,
            }
        )
    return pd.DataFrame(rows)


def matmul_rates(m: int = 400, k: int = 576, n: int = 1536, repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of an (m x k) @ (k x n) product in float32 and bfloat16 (best of `repeats`), and in
    float32 through oneDNN with the weight packed (caiflow.cpu_kernels)."""
    import torch

    from caiflow.cpu_kernels import pack

    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        packed = pack(b.t().contiguous())
        products = {str(dtype).removeprefix("torch."): partial(torch.matmul, a, b)}
        if dtype == torch.float32:
            linear = torch.ops.mkldnn._linear_pointwise
            products["float32 packed"] = partial(linear, a, packed, None, "none", [], "")
        for name, product in products.items():
            for _ in range(3):  # kernel selection, threads waking up
                product()
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - start)
            rates[name] = 2 * m * k * n / best / 1e9
    return rates


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="storage", help="artifact root holding the cached default model")
    parser.add_argument("--rows", type=int, default=32, help="training rows (one epoch per variant)")
    parser.add_argument(
        "--variants", default="fp32,bf16,packing", help=f"comma-separated of {list(VARIANTS)}"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = resolve_model(DEFAULT_MODEL, args.storage).path
    data = records(args.rows)
    log.info("%s, %d rows, one epoch per variant, %s", DEFAULT_MODEL, args.rows, load_average())
    rates = matmul_rates()
    log.info(
        "matrix product 400x576 @ 576x1536: float32 %.0f GFLOP/s, bfloat16 %.0f GFLOP/s, "
        "float32 packed (oneDNN) %.0f GFLOP/s",
        rates["float32"],
        rates["bfloat16"],
        rates["float32 packed"],
    )
    out: dict[str, float] = {}
    for name in args.variants.split(","):
        cfg = SFTConfig(
            method="lora",
            lora={"r": 16, "alpha": 32},
            batch_size=8,
            per_device_batch_size=4,
            max_length=384,
            epochs=1.0,
            logging_steps=1,
            save_steps=1000,
            **VARIANTS[name],
        )
        with (
            tempfile.TemporaryDirectory() as tmp,
            every_position(name == "all-positions"),
            flash_attention(name.endswith("-flash")),
        ):
            start = time.perf_counter()
            fast = name != "torch-kernels"
            metrics = train_sft(cfg, path, data, Path(tmp) / "out", Path(tmp) / "work", seed=0, fast_cpu=fast)
            seconds = time.perf_counter() - start
        out[name] = seconds
        log.info("%-14s %6.1f s for the epoch, %d steps, %s", name, seconds, metrics["steps"], load_average())
    return out


if __name__ == "__main__":
    main()
