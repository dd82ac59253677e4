"""Running the scripts under benchmarks/ from tests: as a user would (a subprocess from the
project's root), or importing one of their functions."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, env_drop: tuple[str, ...] = ()) -> list[str]:
    """`python benchmarks/SCRIPT ARGS...` from the project's root, without the variables in `env_drop`;
    its stdout lines (it must exit 0)."""
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def benchmark_module(name: str) -> ModuleType:
    """A benchmark script as a module (benchmarks/ goes on sys.path, as the scripts expect)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(name)
