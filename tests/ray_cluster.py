"""A real local Ray cluster for the tests: `ray start --head --block` on 127.0.0.1, stopped afterwards.

Two CPUs and two *declared* GPUs (Ray hands out GPU ids and sets each actor's CUDA_VISIBLE_DEVICES
whether or not the cards exist; torch still finds no CUDA and runs on the CPU), so the tests see the
one-GPU-per-actor assignment on a CPU-only machine. The head runs in its own session; teardown kills
the processes it started, by process id, and nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    """A free port outside Ray's worker port range (10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 20000:
            return port


def ray_or_fail() -> None:
    """Ray is needed: a skip outside CI, a failure under CI=1 (CI must run these tests)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        message = "the Ray tests need ray (pip install -e '.[ray]', part of '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def start_cluster(cpus: int = 2, gpus: int = 2, timeout: float = 120) -> Iterator[str]:
    """Yield the address of a fresh head node; stop it (every process it started) afterwards."""
    ray_or_fail()
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ray_bin = Path(sys.executable).with_name("ray")
    started = time.monotonic()
    head = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--num-cpus={cpus}",
            f"--num-gpus={gpus}",
            f"--temp-dir={temp}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    address = f"127.0.0.1:{port}"
    try:
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"`ray start --head` exited with {head.returncode}; logs in {temp}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"the Ray head did not answer within {timeout:.0f} s")
            time.sleep(0.2)
        print(f"\nRay head up at {address} in {time.monotonic() - started:.1f} s")
        yield address
    finally:
        import ray

        from caiflow import ray_pool

        ray_pool._POOLS.clear()
        if ray.is_initialized():
            ray.shutdown()
        _kill_tree(head.pid)
        shutil.rmtree(temp, ignore_errors=True)
