"""Training precision: whether bf16 autocast runs, and where it pays (``bf16_autocast``).

``true`` and ``false`` are taken as they are (``true`` stops with an error on hardware without
native bfloat16); ``auto``, the default, is on for a float32 model on a GPU with bf16, or on a CPU
with native bfloat16 whose bfloat16 products run at least BF16_MIN_GAIN times its float32 ones,
timed once per process (on some AVX512-BF16 CPUs they run slower). A run resolves ``auto`` once,
when it is planned (`caiflow.plan.resolve_auto_settings`), so its fingerprints hold what ran.
"""

from __future__ import annotations

from caiflow.training.common import has_cuda


def bf16_supported() -> bool:
    """Whether this machine computes in bfloat16 natively (a recent GPU, or a CPU with AVX512-BF16/AMX)."""
    import torch

    if has_cuda():
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# `bf16_autocast: auto` trains under bf16 autocast where bfloat16 products beat float32 by this much.
BF16_MIN_GAIN = 1.25
_BF16_RATES: dict[str, float] = {}


def bf16_rates() -> dict[str, float]:
    """GFLOP/s of one training-shaped product here, in bfloat16 and in float32 (measured once per process).

    float32 is the faster of torch's product and oneDNN's packed one (what `model.cpu_kernels` uses);
    on a GPU both are left unmeasured (empty dict). A (400 x 576) @ (576 x 1536) product, the default
    model's MLP at a training batch, best of 10 after 3 warm-ups: about 0.1 s in all.
    """
    import time

    import torch
    import torch.nn.functional as F

    from caiflow.cpu_kernels import pack

    if _BF16_RATES or has_cuda():
        return dict(_BF16_RATES)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(400, 576, generator=gen), torch.randn(1536, 576, generator=gen)

    def rate(product) -> float:
        for _ in range(3):
            product()
        best = float("inf")
        for _ in range(10):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        return 2.0 * 400 * 576 * 1536 / best / 1e9

    float32 = rate(lambda: F.linear(x, w))
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        packed = pack(w)
        packed_rate = rate(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
        float32 = max(float32, packed_rate)
    xb, wb = x.bfloat16(), w.bfloat16()
    _BF16_RATES.update(bfloat16=rate(lambda: F.linear(xb, wb)), float32=float32)
    return dict(_BF16_RATES)


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
