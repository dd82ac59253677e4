"""The `caiflow` command line.

    caiflow run --config configs/demo.yaml [--storage DIR] [--set a.b=value ...] [--until STEP]
                [--executor local|ray] [--ray-address HOST:PORT]
    caiflow compare --config configs/demo.yaml [--storage DIR] [--set a.b=value ...] [--executor ...]
    caiflow status --config configs/demo.yaml [--storage DIR] [--set a.b=value ...]
    caiflow memory --config configs/7b-qlora.yaml [--set a.b=value ...] [--gpu-gib 24]
    caiflow verify [--storage DIR]
    caiflow gc [--storage DIR] [--keep-runs N] [--dry-run]

Bad input (config, constitution, prompt source, model) ends with one line naming the problem
and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from caiflow.pipeline import STEPS

log = logging.getLogger("caiflow")


EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def prefect_defaults() -> None:
    """Quiet, local Prefect defaults (a user's own settings win)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    # The temporary server takes ~20 s to start on a busy 2-core machine; Prefect's default is 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def input_errors() -> tuple[type[BaseException], ...]:
    from caiflow.categorize import CategorizeError
    from caiflow.config import ConfigError
    from caiflow.constitution import ConstitutionError
    from caiflow.endpoint_scorer import EndpointError
    from caiflow.memory_check import MemoryPlanError
    from caiflow.models import ModelNotFoundError
    from caiflow.prompts import PromptSourceError
    from caiflow.ray_pool import ExecutorError
    from caiflow.store import StoreError

    return (
        MemoryPlanError,
        ConfigError,
        ConstitutionError,
        PromptSourceError,
        ModelNotFoundError,
        CategorizeError,
        StoreError,
        ExecutorError,
        EndpointError,
    )


def _summary_table(result: dict[str, Any], seconds: float) -> str:
    lines = [f"{'step':<20} {'status':<9} {'seconds':>8} {'rows':>6}  output"]
    for step, s in result["steps"].items():
        status = "cached" if s["cached"] else "computed"
        lines.append(f"{step:<20} {status:<9} {s['seconds']:>8.1f} {s['rows']:>6}  {s['path']}")
    lines.append(f"total {seconds:.1f} s; run record: {result['run_record']}")
    evaluation = result["steps"].get("evaluate")
    if evaluation:
        from caiflow.report import verdict_table

        lines += [
            "",
            verdict_table(evaluation["metrics"]),
            f"report: {Path(evaluation['path']) / 'report.md'}",
        ]
    return "\n".join(lines)


def check_executor(cfg: Any) -> None:
    """A Ray executor's cluster answers (one line naming the fix when it does not)."""
    from caiflow.ray_pool import check_reachable

    if cfg.generation.executor.kind == "ray":
        check_reachable(cfg.generation.executor.address)


def executor_overrides(args: argparse.Namespace) -> list[str]:
    """`--executor` and `--ray-address` as the `--set` overrides they stand for (after the user's own)."""
    out = []
    if getattr(args, "executor", None):
        out.append(f"generation.executor.kind={args.executor}")
    if getattr(args, "ray_address", None):
        out.append(f"generation.executor.address={args.ray_address}")
    return out


def check_inputs(cfg: Any) -> None:
    """Validate the cheap things before starting Prefect: constitution, the judge's principle, storage,
    prompt sources (training and evaluation: readable, with the expected columns, within the context),
    the model, and every endpoint a role uses (answers, serves its model, gives logprobs where the role
    scores). Raises one of `input_errors()`."""
    from caiflow.constitution import load_constitution
    from caiflow.models import context_tokens, load_tokenizer, resolve_model
    from caiflow.plan import judge_question
    from caiflow.prompt_filters import check_fits_context, token_counter
    from caiflow.prompts import load_prompts
    from caiflow.roles import check_endpoints
    from caiflow.store import Store

    load_constitution(cfg.constitution_path(), cfg.constitution.invert, cfg.constitution.principles)
    judge_question(cfg)  # the judge's principle exists in the whole constitution
    Store(cfg.run.storage)
    check_executor(cfg)
    check_endpoints(cfg)
    model = resolve_model(cfg.model.name, cfg.run.storage, cfg.model.revision, cfg.model.tiny.model_dump())
    count, context = (
        token_counter(load_tokenizer(model.path, cfg.model.trust_remote_code)),
        context_tokens(model.path),
    )
    for sources in (cfg.prompts.sources, cfg.evaluate.prompts):
        if sources:
            check_fits_context(load_prompts(sources, Path(cfg.base_dir)), context, count)


def temporary_server_in_background() -> threading.Thread | None:
    """Start Prefect's temporary server (no PREFECT_API_URL set) in a thread, so that its ~4 s start-up
    runs beside the input checks and the pipeline's imports instead of after them; join it before the
    flow runs. None where a server is configured. The server stops at exit, as Prefect's own does.

    The thread is not a daemon: on bad input the process waits for the start to finish and stops the
    server on its way out. A daemon thread still logging "Starting temporary server" while the
    interpreter shut down aborted the process (SIGABRT instead of exit 2)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():  # Prefect's own test for starting one
        return None
    from prefect.server.api.server import SubprocessASGIServer

    def start() -> None:
        try:
            SubprocessASGIServer().start()
        except Exception as exc:  # noqa: BLE001 - the flow's own start tries again and reports it
            log.warning("the temporary Prefect server did not start in the background: %s", exc)

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=False)
    thread.start()
    return thread


def run_flow(args: argparse.Namespace, call: Callable[[], Any]) -> tuple[int, Any]:
    """Check the inputs before Prefect starts, then `call()` the flow: (exit code, its result).

    Bad input is one line on stderr and exit 2, before any step; a failure during the run is
    exit 1 (Prefect has logged the traceback).
    """
    from caiflow.config import load_config

    errors = input_errors()
    server = None
    try:
        args.set = list(args.set or []) + executor_overrides(args)
        cfg = load_config(args.config, args.set, args.storage)
        # Prefect's cache records live beside the artifacts they point at (read when Prefect is imported).
        os.environ.setdefault(
            "PREFECT_LOCAL_STORAGE_PATH", str(Path(cfg.run.storage).resolve() / "prefect-results")
        )
        server = temporary_server_in_background()
        check_inputs(cfg)
    except errors as exc:
        print(f"caiflow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT, None
    from caiflow.endpoint_scorer import EndpointError

    if server is not None:
        server.join()  # the flow's client finds it running (a start under way would be taken as up)
    try:
        return 0, call()
    except EndpointError as exc:  # a server that went away mid-run: the run failed, and resumes
        print(f"caiflow: run failed: {exc}", file=sys.stderr)
        return EXIT_FAILED, None
    except errors as exc:
        print(f"caiflow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT, None
    except Exception as exc:  # noqa: BLE001 - report and exit non-zero; Prefect logged the traceback
        print(f"caiflow: run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED, None


def cmd_run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()

    def call() -> Any:
        from flows.constitutional_ai import constitutional_ai

        return constitutional_ai(
            config=str(args.config), overrides=list(args.set or []), storage=args.storage, until=args.until
        )

    code, result = run_flow(args, call)
    if code == 0:
        print(_summary_table(result, time.monotonic() - t0))
    return code


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every artifact against its manifest; exit 1 when any is corrupt."""
    from caiflow.store import Store, StoreError

    try:
        store = Store(args.storage or "storage")
    except StoreError as exc:
        print(f"caiflow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    counts = {"ok": 0, "corrupt": 0, "incomplete": 0}
    for step, fp in store.iter_artifacts():
        if store.manifest(step, fp) is None:
            status, detail = "incomplete", "no manifest: unfinished or crashed; the next run resumes it"
        else:
            problems = store.verify(step, fp)
            status = "corrupt" if problems else "ok"
            detail = "; ".join(problems) if problems else ""
        counts[status] += 1
        print(f"{status:<10} {step}/{fp}  {detail}".rstrip())
    print(
        f"{counts['ok']} ok, {counts['corrupt']} corrupt, {counts['incomplete']} incomplete "
        f"under {store.root}"
        + ("; a run recomputes corrupt artifacts (moving them aside first)" if counts["corrupt"] else "")
    )
    return 1 if counts["corrupt"] else 0


def cmd_compare(args: argparse.Namespace) -> int:
    """The constitution and its inverted control through evaluate, then one side-by-side report."""
    t0 = time.monotonic()

    def call() -> Any:
        from flows.constitutional_ai import compare

        return compare(config=str(args.config), overrides=list(args.set or []), storage=args.storage)

    code, result = run_flow(args, call)
    if code != 0:
        return code
    from caiflow.compare import compare_table

    for arm, arm_result in result["arms"].items():
        steps = arm_result["steps"]
        computed = [step for step, s in steps.items() if not s["cached"]]
        print(
            f"{arm} arm: computed {', '.join(computed) or 'nothing'}; cached "
            f"{', '.join(step for step in steps if step not in computed) or 'nothing'}"
        )
    print(compare_table(result["compare"]["metrics"]))
    print(f"total {time.monotonic() - t0:.1f} s; report: {Path(result['compare']['path']) / 'report.md'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """For each step: done, or why it would run (what differs from its closest earlier artifact)."""
    from caiflow.config import load_config
    from caiflow.plan import plan_for
    from caiflow.status import pipeline_status
    from caiflow.store import Store

    try:
        cfg = load_config(args.config, args.set or [], args.storage)
        store = Store(cfg.run.storage)
        plan = plan_for(cfg).plan
    except input_errors() as exc:
        print(f"caiflow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows = pipeline_status(store, plan)
    print(f"{'step':<18} {'state':<11} {'fingerprint':<17} why it would run")
    for r in rows:
        print(f"{r.step:<18} {r.state:<11} {r.fingerprint:<17} {r.why}".rstrip())
    todo = [r.step for r in rows if r.state != "done"]
    print(
        f"{len(rows) - len(todo)} of {len(rows)} steps done under {store.root}"
        + (
            f"; `caiflow run` would compute: {', '.join(todo)}"
            if todo
            else "; `caiflow run` would compute nothing"
        )
    )
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    """Per step: the models held at once and the estimated peak accelerator memory (nothing loaded)."""
    from caiflow.config import load_config
    from caiflow.memory import GIB, plan_memory
    from caiflow.memory_check import format_plan, visible_gpu_bytes
    from caiflow.plan import memory_shapes

    try:
        cfg = load_config(args.config, args.set or [], args.storage)
        shapes = memory_shapes(cfg)
        visible = args.gpu_gib * GIB if args.gpu_gib else visible_gpu_bytes()
    except input_errors() as exc:
        print(f"caiflow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    plans = plan_memory(cfg.model_dump(), shapes, STEPS)
    p = shapes.policy
    where = f"{visible / GIB:.1f} GiB visible" if visible else "no GPU visible: the plan is not enforced"
    print(
        format_plan(
            plans,
            visible,
            f"memory plan for {args.config} ({cfg.model.name}: {p.params() / 1e9:.3f}B params, "
            f"{p.layers} layers, hidden {p.hidden}, {cfg.model.dtype}; {where})",
        )
    )
    worst = max(plans, key=lambda m: m.peak)
    print(f"largest step: {worst.step}, ~{worst.peak / GIB:.2f} GiB")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove artifacts no kept run record refers to; never one a running process holds."""
    from caiflow.gc import collect
    from caiflow.store import Store, StoreError

    try:
        store = Store(args.storage or "storage")
        result = collect(store, keep_runs=args.keep_runs, dry_run=args.dry_run)
    except (StoreError, ValueError) as exc:
        print(f"caiflow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    verb = "would remove" if args.dry_run else "removed"
    for step, fp, size in result.removed:
        print(f"{verb:<12} {step}/{fp}  {size / 2**20:.1f} MiB")
    for step, fp in result.in_use:
        print(f"{'in use':<12} {step}/{fp}  a running process holds its lock: left alone")
    for path in result.removed_runs:
        print(f"{verb:<12} run record {path.name}")
    print(
        f"{verb} {len(result.removed)} artifact(s), {result.freed_bytes / 2**20:.1f} MiB; kept {result.kept} "
        f"artifact(s) named by {len(result.kept_runs)} run record(s) under {store.root}"
    )
    return 0


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="where generation shards run (generation.executor.kind): in the step's process (local, the "
        "default) or on a Ray cluster (ray)",
    )
    parser.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="the Ray cluster's head (generation.executor.address), as printed by `ray start --head`",
    )


def add_config_options(
    parser: argparse.ArgumentParser,
    example: str = "configs/demo.yaml",
    set_help: str = "override a config value (repeatable)",
) -> None:
    """--config, --storage and --set: how every command that reads a preset is pointed at one."""
    parser.add_argument("--config", required=True, help=f"YAML preset, e.g. {example}")
    parser.add_argument("--storage", help="artifact root (overrides run.storage)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caiflow", description="Constitutional AI pipeline on Prefect.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline on a config preset")
    add_config_options(
        run, set_help="override a config value, e.g. --set generation.batch_size=8 (repeatable)"
    )
    run.add_argument(
        "--until",
        default="evaluate",
        choices=list(STEPS),
        help="stop after this step (default: evaluate, the whole pipeline)",
    )
    add_executor_options(run)
    run.set_defaults(func=cmd_run)
    cmp = sub.add_parser("compare", help="run the constitution and its inverted control, report side by side")
    add_config_options(cmp)
    add_executor_options(cmp)
    cmp.set_defaults(func=cmd_compare)
    status = sub.add_parser(
        "status", help="which steps the store has for a config, and why the others would run"
    )
    add_config_options(status)
    status.set_defaults(func=cmd_status)
    gc = sub.add_parser("gc", help="remove artifacts that no kept run record refers to")
    gc.add_argument("--storage", help="artifact root (default: storage)")
    gc.add_argument(
        "--keep-runs",
        type=int,
        metavar="N",
        help="keep the N newest run records and what they name; older records go too (default: all)",
    )
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    gc.set_defaults(func=cmd_gc)
    memory = sub.add_parser(
        "memory", help="per step: models held at once and estimated peak GPU memory (nothing loaded)"
    )
    add_config_options(memory, "configs/7b-qlora.yaml")
    memory.add_argument(
        "--gpu-gib", type=float, help="compare against this much GPU memory (default: the visible GPU)"
    )
    memory.set_defaults(func=cmd_memory)
    verify = sub.add_parser(
        "verify", help="check every artifact against its manifest (sizes, checksums, rows)"
    )
    verify.add_argument("--storage", help="artifact root (default: storage)")
    verify.set_defaults(func=cmd_verify)
    return parser


def quiet_http_loggers() -> None:
    """No INFO line per Prefect API call (httpx logs every request)."""
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    prefect_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)-7s | %(name)s - %(message)s")
    quiet_http_loggers()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
