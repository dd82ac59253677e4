"""The pipeline's time, step by step, and what Prefect adds to it.

    python benchmarks/pipeline.py [--config configs/demo.yaml] [--until evaluate] [--set KEY=VALUE ...]

Runs a preset's steps twice from an empty store, in this process:

1. plain: the step functions without Prefect (`tasks.harness.run_step`, what the flow's tasks
   wrap), one after another, in a temporary storage root;
2. Prefect: the `constitutional-ai` flow (`flows/constitutional_ai.py`) on the same config, in a
   second temporary root that shares the first one's model folder (the model is built or
   dequantised once, before either run, and reported on its own line).

It prints each step's seconds both ways, the new tokens and tokens/s of each generation step
(tokens from the step's metrics over the step's whole time, model loading included), the totals,
and Prefect's overhead: (Prefect total - plain total) / Prefect total. Starting Prefect's
temporary server is not part of the overhead; it is timed on its own line. Without
PREFECT_API_URL the benchmark starts that temporary server itself (as a flow run would) with a
fresh PREFECT_HOME; with PREFECT_API_URL set, the running server is used and nothing starts:
that is how a user avoids the start-up (`make ui`, or `prefect server start` and
`export PREFECT_API_URL=http://127.0.0.1:4200/api`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's caiflow, tasks and flows

log = logging.getLogger("benchmarks.pipeline")

ROOT = Path(__file__).resolve().parents[1]


def warm_imports() -> float:
    """Import what the training steps import lazily (TRL, PEFT, caiflow.training), before either run.

    Otherwise the first run, the plain one, pays these imports inside its steps' times, and the
    Prefect run looks faster than it is. Seconds taken.
    """
    start = time.perf_counter()
    import peft  # noqa: F401
    from trl import RewardTrainer, RLOOTrainer, SFTTrainer  # noqa: F401

    import caiflow.training.reward  # noqa: F401
    import caiflow.training.reward_scorer  # noqa: F401
    import caiflow.training.rl  # noqa: F401
    import caiflow.training.sft  # noqa: F401

    return time.perf_counter() - start


def run_plain(config: str, overrides: list[str], storage: Path, until: str) -> dict[str, Any]:
    """Every step through `run_step`, no Prefect; seconds and metrics per step."""
    from caiflow.config import load_config
    from caiflow.pipeline import steps_until
    from caiflow.plan import plan_for
    from tasks.harness import run_step

    start = time.perf_counter()
    cfg = load_config(config, overrides, str(storage))
    resolved = plan_for(cfg)
    steps: dict[str, Any] = {"(plan and model)": {"seconds": time.perf_counter() - start, "metrics": {}}}
    refs: dict[str, Any] = {}
    for step in steps_until(until):
        t = time.perf_counter()
        ref = refs[step.name] = run_step(
            step.name,
            cfg,
            resolved.constitution,
            resolved.model,
            cfg.run.storage,
            resolved.plan.fingerprints[step.name],
            {name: refs[name] for name in step.inputs},
            resolved.plan.parts[step.name],
        )
        steps[step.name] = {"seconds": time.perf_counter() - t, "metrics": ref.metrics}
    return steps


def start_server() -> tuple[float, str, Any]:
    """Seconds to start Prefect's temporary server (0 with PREFECT_API_URL set), where it runs, the server."""
    if os.environ.get("PREFECT_API_URL"):
        return 0.0, f"the running server at {os.environ['PREFECT_API_URL']}", None
    from prefect.server.api.server import SubprocessASGIServer

    start = time.perf_counter()
    server = SubprocessASGIServer()  # the instance a flow run without PREFECT_API_URL starts and reuses
    server.start()
    where = f"a temporary server at {server.api_url}, fresh PREFECT_HOME (database created and migrated)"
    return time.perf_counter() - start, where, server


def run_prefect(config: str, overrides: list[str], storage: Path, until: str) -> tuple[float, dict[str, Any]]:
    """The flow; its total seconds and its per-step summary."""
    from flows.constitutional_ai import constitutional_ai

    start = time.perf_counter()
    result = constitutional_ai(config=config, overrides=overrides, storage=str(storage), until=until)
    return time.perf_counter() - start, result["steps"]


def new_tokens(metrics: dict[str, Any]) -> int | None:
    """A step's new tokens: its engine's count, or the sum over the stages that evaluate had answer."""
    if isinstance(metrics.get("generated_tokens"), int):
        return metrics["generated_tokens"]
    stages = [m.get("generated_tokens") for m in metrics.get("generation", {}).values()]
    return sum(stages) if stages and all(isinstance(t, int) for t in stages) else None


def tokens_per_second(metrics: dict[str, Any], seconds: float) -> str:
    tokens = new_tokens(metrics)
    return (
        f"{tokens:>7d} {tokens / seconds:>7.1f}"
        if isinstance(tokens, int) and seconds > 0
        else f"{'-':>7} {'-':>7}"
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="YAML preset")
    parser.add_argument("--until", default="evaluate", help="last step to run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE override")
    parser.add_argument("--keep", action="store_true", help="keep the temporary storage roots")
    args = parser.parse_args(argv)
    # the figures are its output, so they go to stdout with the steps' progress
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from flows.cli import prefect_defaults, quiet_http_loggers

    quiet_http_loggers()
    prefect_defaults()  # as `caiflow run` sets them: no telemetry, a 180 s start-up allowance, offline
    tmp = Path(tempfile.mkdtemp(prefix="caiflow-bench-"))
    if not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_HOME"] = str(tmp / "prefect-home")  # a fresh, private Prefect database
    server = None
    plain_root, prefect_root = tmp / "plain", tmp / "prefect"
    try:
        # The model (built or dequantised into <storage>/models) once, outside both timings.
        from caiflow.config import load_config
        from caiflow.plan import plan_for

        t = time.perf_counter()
        plan_for(load_config(args.config, args.overrides, str(plain_root)))
        log.info("model ready (built or dequantised into an empty store) in %.1f s", time.perf_counter() - t)
        log.info("TRL, PEFT and caiflow.training imported in %.1f s, before both runs", warm_imports())
        prefect_root.mkdir(parents=True)
        (prefect_root / "models").symlink_to(plain_root / "models", target_is_directory=True)

        plain = run_plain(args.config, args.overrides, plain_root, args.until)
        startup, where, server = start_server()
        prefect_total, prefect = run_prefect(args.config, args.overrides, prefect_root, args.until)
    finally:
        if server is not None:
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=30)  # the flow's last log lines, before their server goes
            server.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    plain_total = sum(s["seconds"] for s in plain.values())
    log.info("")
    log.info("%-20s %9s %9s %9s %7s %7s", "step", "plain s", "prefect s", "diff s", "tokens", "tok/s")
    for name, s in plain.items():
        p = prefect.get(name, {}).get("seconds")
        log.info(
            "%-20s %9.1f %9s %9s %s",
            name,
            s["seconds"],
            f"{p:.1f}" if p is not None else "-",
            f"{p - s['seconds']:+.1f}" if p is not None else "-",
            tokens_per_second(s["metrics"], s["seconds"]),
        )
    overhead = prefect_total - plain_total
    log.info("%-20s %9.1f %9.1f %+9.1f", "total", plain_total, prefect_total, overhead)
    log.info(
        "Prefect overhead, start-up excluded: %.1f s = %.1f%% of the Prefect run (target: under 5%%)",
        overhead,
        100 * overhead / prefect_total,
    )
    log.info("Prefect start-up: %.1f s, %s", startup, where)
    return {
        "plain_s": plain_total,
        "prefect_s": prefect_total,
        "overhead_share": overhead / prefect_total,
        "startup_s": startup,
    }


if __name__ == "__main__":
    main()
