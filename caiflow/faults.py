"""Fault injection for resilience tests: the real failure, at a chosen point, in a real process.

``CAIFLOW_FAULT_KILL=<point>`` sends SIGKILL to the current process (what the kernel's
out-of-memory killer does) the first time execution reaches ``<point>``. Points:

- ``<step>:shard:<n>``      after shard n of a generation step is written
- ``<step>:checkpoint:<n>`` after a training step saved its checkpoint at optimiser step n
- ``after:<step>``          after a step finished, before the next one starts

``CAIFLOW_FAULT_STEP=<step>:<kind>:<n>`` fails the first n attempts of a step before it does any
work, with ``kind`` ``oom`` (the real out-of-memory exception: Prefect retries it) or ``bug``
(a RuntimeError: never retried).

``CAIFLOW_FAULT_OOM_ABOVE_BATCH=N`` (see `caiflow.generation` and `caiflow.training.common`)
raises the real out-of-memory exception type for batches larger than N.
Both switches are for tests; nothing sets them in normal runs.
"""

from __future__ import annotations

import logging
import os
import signal

KILL_ENV = "CAIFLOW_FAULT_KILL"
STEP_ENV = "CAIFLOW_FAULT_STEP"

log = logging.getLogger(__name__)


def kill_point(point: str) -> None:
    """SIGKILL this process if `point` is the configured fault point."""
    if os.environ.get(KILL_ENV) == point:
        log.warning("fault injection: SIGKILL at %s", point)
        logging.shutdown()
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
