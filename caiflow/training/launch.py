"""Multi-GPU training: SFT and the reward model under ``accelerate launch`` (data parallel).

With ``launch.num_processes`` > 1 the step does not train in its own process. It writes a job
file into its work folder (the step's settings, its rows as Parquet, the paths) and runs::

    accelerate launch --multi_gpu --num_processes N [--config_file launch.accelerate_config] \
        -m caiflow.training.launch <work>/launch-job.json

Every process runs the same training function (`train_sft`, `train_reward_model`); the Trainer
shards each batch across the processes and averages the gradients, so an optimiser step still
sees ``batch_size`` sequences (per-device batch x processes x accumulation; see
`process_count`). Rank 0 alone writes the outputs and ``launch-metrics.json``, which the step
reads back; every rank writes ``launch-rank-<i>.json`` (its rank, the world size, its optimiser
steps), so a run can show that all of them trained. An accelerate config file picks DeepSpeed
ZeRO or FSDP (``configs/accelerate/``); without one it is plain DDP (gloo on CPU, nccl on GPU).
There is no out-of-memory back-off across processes: an out-of-memory error in one of them ends
the launch and the step (lower the per-device batch; a rerun resumes from the last checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

JOB_FILE = "launch-job.json"
METRICS_FILE = "launch-metrics.json"


def process_count() -> int:
    """Processes training together (WORLD_SIZE under a launcher; 1 in a plain process)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_batches(batch: int, per_device: int, processes: int, section: str) -> None:
    if batch % (per_device * processes):
        raise ValueError(
            f"{section}.batch_size ({batch}) must be a multiple of {section}.per_device_batch_size "
            f"({per_device}) x launch.num_processes ({processes}): set {section}.batch_size to "
            f"{per_device * processes * max(1, batch // (per_device * processes))}."
        )


def launch_command(job: Path, num_processes: int, accelerate_config: Path | None) -> list[str]:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which(
        "accelerate"
    )
    head = [accelerate, "launch"] if accelerate else [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = head + ["--num_processes", str(num_processes), "--num_machines", "1"]
    if accelerate_config is not None:
        cmd += ["--config_file", str(accelerate_config)]
    else:
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + ["-m", "caiflow.training.launch", str(job)]


def run_launched(
    kind: str,
    section: dict[str, Any],
    records: pd.DataFrame,
    kwargs: dict[str, Any],
    work_dir: Path,
    num_processes: int,
    accelerate_config: Path | None = None,
) -> dict:
    """Train `kind` ('sft' or 'reward_model') in `num_processes` processes; rank 0's metrics."""
    if accelerate_config is not None and not Path(accelerate_config).is_file():
        raise FileNotFoundError(
            f"launch.accelerate_config '{accelerate_config}' does not exist: point it at a file "
            "such as configs/accelerate/zero2.yaml, or set it to null for plain data parallel."
        )
    check_batches(section["batch_size"], section["per_device_batch_size"], num_processes, kind)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    records.to_parquet(work_dir / "launch-records.parquet")
    job = work_dir / JOB_FILE
    job.write_text(
        json.dumps(
            {
                "kind": kind,
                "section": section,
                "kwargs": {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()},
            }
        ),
        encoding="utf-8",
    )
    (work_dir / METRICS_FILE).unlink(missing_ok=True)
    cmd = launch_command(job, num_processes, accelerate_config)
    log.info("%s: launching %d processes: %s", kind, num_processes, " ".join(cmd))
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{kind}: `accelerate launch` with {num_processes} processes exited with {done.returncode} "
            "(the processes' logs are above): fix that error, or set launch.num_processes to 1."
        )
    metrics = json.loads((work_dir / METRICS_FILE).read_text())
    metrics["ranks"] = [
        json.loads((work_dir / f"launch-rank-{i}.json").read_text()) for i in range(num_processes)
    ]
    return metrics


def train_step(
    kind: str, section: Any, records: pd.DataFrame, kwargs: dict[str, Any], launch: Any, base_dir: Path
) -> dict:
    """Train in this process (``launch.num_processes`` 1), or launched over several processes."""
    if launch.num_processes == 1:
        if kind == "sft":
            from caiflow.training.sft import train_sft

            return train_sft(section, records=records, **kwargs)
        from caiflow.training.reward import train_reward_model

        return train_reward_model(section, prefs=records, **kwargs)
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < launch.num_processes:
        raise ValueError(
            f"launch.num_processes is {launch.num_processes} but {torch.cuda.device_count()} GPU(s) are "
            f"visible: set launch.num_processes to {torch.cuda.device_count()} or fewer."
        )
    config = launch.accelerate_config
    config_path = (
        None if config is None else (Path(config) if Path(config).is_absolute() else Path(base_dir) / config)
    )
    return run_launched(
        kind, section.model_dump(), records, kwargs, kwargs["work_dir"], launch.num_processes, config_path
    )


def main(argv: list[str] | None = None) -> int:
    """One process of a launched job (run by `accelerate launch`, not by hand)."""
    from caiflow.training.config import RewardModelConfig, SFTConfig

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s | rank " + os.environ.get("RANK", "0") + " | %(message)s"
    )
    job_file = Path((argv or sys.argv[1:])[0])
    job = json.loads(job_file.read_text())
    work_dir = job_file.parent
    records = pd.read_parquet(work_dir / "launch-records.parquet")
    kwargs = dict(job["kwargs"])
    if job["kind"] == "sft":
        from caiflow.training.sft import train_sft

        metrics = train_sft(SFTConfig.model_validate(job["section"]), records=records, **kwargs)
    elif job["kind"] == "reward_model":
        from caiflow.training.reward import train_reward_model

        metrics = train_reward_model(
            RewardModelConfig.model_validate(job["section"]), prefs=records, **kwargs
        )
    else:
        raise ValueError(f"unknown launch job kind {job['kind']!r}: use 'sft' or 'reward_model'.")
    rank = int(os.environ.get("RANK", "0"))
    (work_dir / f"launch-rank-{rank}.json").write_text(
        json.dumps({"rank": rank, "world_size": process_count(), "steps": metrics.get("steps")}),
        encoding="utf-8",
    )
    if is_main_process():
        (work_dir / METRICS_FILE).write_text(json.dumps(metrics, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
