"""Training precision: whether bf16 autocast runs, and where it pays (``bf16_autocast``).

``true`` and ``false`` are taken as they are (``true`` stops with an error on hardware without
native bfloat16); ``auto``, the default, is on for a float32 model on a GPU with bf16, or on a CPU
with native bfloat16 whose bfloat16 products run at least BF16_MIN_GAIN times its float32 ones
(on some AVX512-BF16 CPUs they run slower). The products are timed once per machine and remembered
(`bf16_rates`), so every run here decides alike. A run resolves ``auto`` once, when it is planned
(`caiflow.plan.resolve_auto_settings`), so its fingerprints hold what ran.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from caiflow.training.common import has_cuda

log = logging.getLogger(__name__)


def bf16_supported() -> bool:
    """Whether this machine computes in bfloat16 natively (a recent GPU, or a CPU with AVX512-BF16/AMX)."""
    import torch

    if has_cuda():
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# `bf16_autocast: auto` trains under bf16 autocast where bfloat16 products beat float32 by this much.
BF16_MIN_GAIN = 1.25
_BF16_RATES: dict[str, float] = {}


def machine_cache_dir() -> Path:
    """Where caiflow remembers what it measured about this machine: $CAIFLOW_CACHE_DIR, else
    $XDG_CACHE_HOME/caiflow, else ~/.cache/caiflow."""
    if os.environ.get("CAIFLOW_CACHE_DIR"):
        return Path(os.environ["CAIFLOW_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "caiflow"


def rates_file() -> Path:
    return machine_cache_dir() / "precision.json"


def machine_key() -> str:
    """What the measured rates belong to: this host, its CPU, torch's threads and torch's version."""
    import socket

    import torch

    from caiflow.environment import cpu_name

    threads = torch.get_num_threads()
    return f"{socket.gethostname()} | {cpu_name()} | {threads} threads | torch {torch.__version__}"


def bf16_rates() -> dict[str, float]:
    """GFLOP/s of one training-shaped product here, in bfloat16 and in float32: measured once per
    machine (`measure_rates`) and remembered in `rates_file()`, so that `auto` becomes the same on
    every run here, whatever else the machine is doing then (the fingerprints, and so the store's
    reuse, depend on it). Delete the file to measure again. On a GPU: unmeasured (empty dict)."""
    import fcntl

    if _BF16_RATES or has_cuda():
        return dict(_BF16_RATES)
    path, key = rates_file(), machine_key()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs: one measures, the others read
            known = _read_rates(path)
            if key not in known:
                known[key] = measure_rates()
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n", encoding="utf-8")
                os.replace(tmp, path)
            rates = known[key]
    except OSError as exc:  # a read-only home: measure, and say the figures are not kept
        log.warning("cannot keep the measured products in %s (%s): measuring in this process only", path, exc)
        rates = measure_rates()
    _BF16_RATES.update(bfloat16=float(rates["bfloat16"]), float32=float(rates["float32"]))
    return dict(_BF16_RATES)


def _read_rates(path: Path) -> dict[str, dict[str, float]]:
    """The remembered rates by machine; {} for a missing or unreadable file (it is measured again)."""
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {
        k: v
        for k, v in known.items()
        if isinstance(v, dict) and all(isinstance(v.get(n), (int, float)) for n in ("bfloat16", "float32"))
    }


def measure_rates(repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of a (400 x 576) @ (576 x 1536) product (the default model's MLP at a training batch),
    in bfloat16 and in float32: the faster of torch's product and oneDNN's packed one (what
    `model.cpu_kernels` uses). The products take turns, best of `repeats` each after 3 warm-ups, so
    a burst of other work slows every kind alike: about 0.3 s in all."""
    import time

    import torch
    import torch.nn.functional as F

    from caiflow.cpu_kernels import pack

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(400, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    xb, wb = x.bfloat16(), w.bfloat16()
    products = {"float32": lambda: F.linear(x, w), "bfloat16": lambda: F.linear(xb, wb)}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        packed = pack(w)
        products["float32 packed"] = lambda: torch.ops.mkldnn._linear_pointwise(
            x, packed, None, "none", [], ""
        )
    best = dict.fromkeys(products, float("inf"))
    for turn in range(3 + repeats):
        for name, product in products.items():
            start = time.perf_counter()
            product()
            if turn >= 3:
                best[name] = min(best[name], time.perf_counter() - start)
    rates = {name: 2.0 * 400 * 576 * 1536 / seconds / 1e9 for name, seconds in best.items()}
    return {"bfloat16": rates["bfloat16"], "float32": max(rates["float32"], rates.get("float32 packed", 0.0))}


def bf16_pays() -> bool:
    """Whether bf16 autocast speeds training up here: a GPU with bf16, or a CPU with native bfloat16
    whose bfloat16 products run at least BF16_MIN_GAIN times its float32 ones (on some AVX512-BF16
    machines they run slower, README "Training on the CPU")."""
    if not bf16_supported():
        return False
    if has_cuda():
        return True
    rates = bf16_rates()
    return rates["bfloat16"] >= BF16_MIN_GAIN * rates["float32"]


def resolve_bf16_autocast(setting: bool | str, dtype: str = "float32") -> bool:
    """A `bf16_autocast` setting as a yes or no: true and false as they are, 'auto' on where it pays
    (`bf16_pays`) for a float32 model (a 16-bit model computes in 16 bits already)."""
    if setting == "auto":
        return dtype == "float32" and bf16_pays()
    return bool(setting)


def scoring_products(setting: bool | str, dtype: str, quantized: bool = False) -> str | None:
    """The products a reward model is scored with: 'bfloat16' when a float32 model (not 4-bit) trains
    under bf16 autocast (`setting`), so it is scored as it trained (ensemble.json's `products`); None:
    in `dtype`."""
    if dtype != "float32" or quantized or not resolve_bf16_autocast(setting, dtype):
        return None
    return "bfloat16"


def check_bf16(wanted: bool | str) -> bool:
    """`wanted` ('auto' resolved), after checking the hardware: bf16 autocast emulated in software would
    only be slower."""
    if wanted == "auto":
        return resolve_bf16_autocast(wanted)
    if wanted and not bf16_supported():
        raise ValueError(
            "bf16_autocast is set but this machine has no native bfloat16 (no CUDA bf16, no AVX512-BF16/AMX "
            "CPU): set sft.bf16_autocast / reward_model.bf16_autocast / rl.bf16_autocast to false or auto."
        )
    return bool(wanted)
