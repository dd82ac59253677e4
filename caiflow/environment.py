"""What a run ran on: package versions and hardware, recorded in every run record.

A result that changes after an upgrade can then be traced to the upgrade.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

# The packages whose versions can change what a run computes.
PACKAGES = (
    "caiflow",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "prefect",
    "datasets",
    "bitsandbytes",
)


def package_versions() -> dict[str, str | None]:
    """Installed version of each package in PACKAGES (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict[str, Any]:
    """CPU, core count, memory and accelerators of this machine."""
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": cpu_name(),
        "cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "system": platform.platform(),
        # the card a worker gave this run (deployments/workers.py); None: every device visible
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    try:
        import torch

        info["cuda"] = (
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else []
        )
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["cuda"] = []
    return info


def environment() -> dict[str, Any]:
    return {"packages": package_versions(), "hardware": hardware()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return round(pages * size / 2**30, 1)
