"""One Prefect worker per GPU: each run gets a card of its own.

On a box with N GPUs, `make ui` starts N process workers on the `gpu` pool, worker i with
``CUDA_VISIBLE_DEVICES=<i-th device>`` and ``--limit 1`` (one flow run at a time). A flow run is a
subprocess of the worker that picked it up, so it inherits that one device and sees it as
``cuda:0``: two runs never land on the same card, and no run needs to know which card it has.
All workers poll the same pool and queue, so whichever card is free takes the next run.

When ``CUDA_VISIBLE_DEVICES`` is already set where `make ui` starts (say ``2,3``), worker i gets
the i-th device of that list. On a machine without a GPU, one worker without a device runs one
run at a time. Generation shards sent to a Ray cluster (`generation.executor.kind: ray`) run on
GPUs that Ray assigns to its actors; the training steps stay on the run's own card.
"""

from __future__ import annotations

from dataclasses import dataclass


class WorkerSetupError(ValueError):
    """The GPUs asked for do not match the devices this machine exposes; the message says the fix."""


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    args: tuple[str, ...]  # after `prefect`
    env: dict[str, str]  # added to the stack's environment
    device: str | None  # the CUDA device its runs see (None: no GPU)


def count_gpus() -> int:
    """CUDA devices here; the pool and tag limits use max(1, this) so a CPU box still runs one at a time."""
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch or no driver: no GPU
        return 0


def visible_devices(env: dict[str, str], count: int) -> list[str]:
    """The device ids this machine offers: the CUDA_VISIBLE_DEVICES list when set, else 0..count-1."""
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in listed.split(",") if d.strip()]


def worker_specs(
    pool: str, host: str, gpus: int | None, counted: int, env: dict[str, str]
) -> list[WorkerSpec]:
    """The workers to start: one per GPU (`gpus` asked for, or `counted`), or one without a device.

    `gpus` given on a machine without GPUs still assigns device ids 0..gpus-1 (what each run would
    see, and what tests/test_deployments.py checks on a CPU-only machine).
    """
    wanted = gpus if gpus is not None else counted
    if wanted <= 0:
        return [_spec(pool, f"caiflow-{host}", None)]
    devices = visible_devices(env, max(wanted, counted))
    if len(devices) < wanted:
        raise WorkerSetupError(
            f"--gpus {wanted} but CUDA_VISIBLE_DEVICES lists {len(devices)} device(s) "
            f"({env.get('CUDA_VISIBLE_DEVICES')}): pass --gpus {len(devices)} or list more devices"
        )
    return [_spec(pool, f"caiflow-{host}-gpu{device}", device) for device in devices[:wanted]]


def _spec(pool: str, name: str, device: str | None) -> WorkerSpec:
    args = ("worker", "start", "--pool", pool, "--type", "process", "--name", name)
    # --limit 1: a worker never runs two flow runs at once, so a card never holds two runs.
    args += ("--limit", "1", "--install-policy", "never")
    return WorkerSpec(name, args, {"CUDA_VISIBLE_DEVICES": device} if device is not None else {}, device)
