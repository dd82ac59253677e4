"""Fault injection for resilience tests: the real failure, at a chosen point, in a real process.

``CAIFLOW_FAULT_KILL=<point>`` sends SIGKILL to the current process (what the kernel's
out-of-memory killer does) the first time execution reaches ``<point>``. Points:

- ``<step>:shard:<n>``      after shard n of a generation step is written
- ``<step>:checkpoint:<n>`` after a training step saved its checkpoint at optimiser step n
- ``after:<step>``          after a step finished, before the next one starts

``CAIFLOW_FAULT_KILL_WORKER=<step>:shard:<n>`` SIGKILLs the Ray worker process making shard n, in the
middle of the shard (model loaded, rows not returned), once per storage root: a marker file under
``<storage>/faults/`` stops the restarted worker from being killed again (`kill_worker_once`).

``CAIFLOW_FAULT_STEP=<step>:<kind>:<n>`` fails the first n attempts of a step before it does any
work, with ``kind`` ``oom`` (the real out-of-memory exception: Prefect retries it) or ``bug``
(a RuntimeError: never retried).

``CAIFLOW_FAULT_OOM_ABOVE_BATCH=N`` raises the real out-of-memory exception type for any
generation batch (`caiflow.generation`) or per-device training batch (`caiflow.training.common`)
larger than N. These switches are for tests; nothing sets them in normal runs.

This module also says what counts as out of memory (`is_out_of_memory`), for the engine's and
the trainers' own back-off and for the Prefect retry condition alike.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
from pathlib import Path

KILL_ENV = "CAIFLOW_FAULT_KILL"
KILL_WORKER_ENV = "CAIFLOW_FAULT_KILL_WORKER"
STEP_ENV = "CAIFLOW_FAULT_STEP"
OOM_ABOVE_ENV = "CAIFLOW_FAULT_OOM_ABOVE_BATCH"

log = logging.getLogger(__name__)


def kill_point(point: str) -> None:
    """SIGKILL this process if `point` is the configured fault point."""
    if os.environ.get(KILL_ENV) == point:
        log.warning("fault injection: SIGKILL at %s", point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def kill_worker_once(point: str, fault: str | None, storage: str) -> None:
    """SIGKILL this (Ray worker) process at `point` if it is the `fault` given, the first time only.

    The driver reads CAIFLOW_FAULT_KILL_WORKER and passes it along (a Ray worker's environment is the
    cluster's, not the run's); the marker file makes the fault fire once, not after every restart.
    """
    if not fault or fault != point:
        return
    marker = Path(storage) / "faults" / f"{point.replace(':', '-')}.fired"
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        marker.open("x").close()
    except FileExistsError:
        return
    log.warning("fault injection: SIGKILL of the worker at %s", point)
    os.kill(os.getpid(), signal.SIGKILL)


def fail_attempt(step: str, attempt: int) -> None:
    """Raise the configured failure if this attempt of `step` is one of the first n."""
    spec = os.environ.get(STEP_ENV, "")
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != step or attempt > int(parts[2]):
        return
    if parts[1] == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {STEP_ENV}, attempt {attempt})")
    raise RuntimeError(f"injected bug in {step} (by {STEP_ENV}, attempt {attempt})")


def inject_oom(rows: int, what: str = "batch") -> None:
    """Raise the real out-of-memory exception when `rows` exceeds CAIFLOW_FAULT_OOM_ABOVE_BATCH."""
    limit = os.environ.get(OOM_ABOVE_ENV)
    if limit is not None and rows > int(limit):
        import torch

        raise torch.OutOfMemoryError(
            f"CUDA out of memory (injected by {OOM_ABOVE_ENV}={limit}: {what} of {rows})"
        )


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an accelerator or host out-of-memory error, False for anything else (bugs)."""
    import torch

    oom_types = tuple(
        t
        for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
        if t
    )
    if isinstance(exc, oom_types) or isinstance(exc, MemoryError):
        return True
    # CUDA ("CUDA out of memory", "CUDA error: out of memory"), MPS ("MPS backend out of memory"), XPU.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_accelerator_memory() -> None:
    """Drop unreachable tensors and return cached accelerator blocks to the driver."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
