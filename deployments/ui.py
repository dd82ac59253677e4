"""`make ui`: caiflow on Prefect's own server, locally, in one command.

    python -m deployments.ui [--storage DIR] [--port 4200] [--timezone Europe/Berlin]
                       [--max-reschedules 2] [--gpus N] [--preset configs/tiny.yaml]

It starts, in order, and stops in reverse order on Ctrl-C:

1. `prefect server start` on 127.0.0.1 (SQLite at <storage>/prefect/prefect.db unless
   PREFECT_SERVER_DATABASE_CONNECTION_URL names another database, e.g. PostgreSQL);
2. the `gpu` process work pool, its concurrency limit = the number of GPUs (1 without one),
   and the `gpu` tag concurrency limit (the same number), so two runs never share a GPU;
3. the automation that reschedules a crashed caiflow run (at most --max-reschedules times);
4. the deployments of deployments/prefect.yaml (`prefect deploy --all`);
5. one process worker per GPU on the `gpu` pool (`deployments.workers`: CUDA_VISIBLE_DEVICES set to
   its card, one run at a time), which runs each flow run as a subprocess in the project folder,
   with this environment (storage root, Prefect result storage, offline Hugging Face).

The same pieces start the Prefect server of the test suite (tests/prefect_server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from deployments.server_setup import AUTOMATION, DEPLOYMENTS, POOL, configure, set_default_preset
from deployments.workers import WorkerSetupError, WorkerSpec, count_gpus, worker_specs
from flows.cli import quiet_http_loggers

log = logging.getLogger("caiflow.ui")

PROJECT = Path(__file__).resolve().parents[1]
PREFECT_FILE = "deployments/prefect.yaml"


@dataclass
class Options:
    storage: Path = PROJECT / "storage"  # artifact root; the SQLite database lives under it too
    host: str = "127.0.0.1"
    port: int = 4200
    timezone: str = "UTC"  # of the nightly regeneration schedule
    max_reschedules: int = 2  # crashed-run reschedules per run; 0 turns the automation off
    gpus: int | None = None  # None: count them (1 on a CPU-only machine)
    preset: str | None = None  # make this preset the deployments' default `config`
    env: dict[str, str] = field(default_factory=dict)  # extra environment for server and worker
    worker_query_seconds: float | None = None  # how often the worker polls (Prefect's default: 10 s)
    api: str | None = None  # an existing server's API URL: use it instead of starting one

    @property
    def api_url(self) -> str:
        return self.api.rstrip("/") if self.api else f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")


def environment(opts: Options) -> dict[str, str]:
    """The environment of the server, `prefect deploy` and the worker (and so of every flow run)."""
    storage = opts.storage.resolve()
    env = dict(os.environ)
    env.setdefault(
        "PREFECT_SERVER_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{storage / 'prefect' / 'prefect.db'}"
    )
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's cache records live beside the artifacts they point at, as for `caiflow run`.
    env.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(storage / "prefect-results"))
    env.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.update(
        {
            "PREFECT_API_URL": opts.api_url,
            "CAIFLOW_STORAGE": str(storage),  # the deployments' default storage root
            "CAIFLOW_PROJECT_DIR": str(PROJECT),  # read by the pull step of deployments/prefect.yaml
            "CAIFLOW_TIMEZONE": opts.timezone,  # read by the nightly schedule
        }
    )
    if opts.worker_query_seconds is not None:
        env["PREFECT_WORKER_QUERY_SECONDS"] = str(opts.worker_query_seconds)
    env.update(opts.env)
    return env


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(
    url: str, proc: subprocess.Popen | None, timeout: float, log_file: Path | None = None
) -> None:
    """Wait until `<api>/health` answers; fail early if the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:] if log_file and log_file.exists() else ""
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Prefect server did not answer at {url} within {timeout:.0f} s")


def _with_api(opts: Options, coro_fn, *args) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: opts.api_url}):
        asyncio.run(coro_fn(*args))


async def workers_online(pool: str = POOL) -> set[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        workers = await client.read_workers_for_work_pool(pool)
        return {w.name for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(proc: subprocess.Popen | None, name: str, timeout: float = 20) -> None:
    """Stop a process we started and everything it started (its own process group)."""
    if proc is None or proc.poll() is not None:
        return
    log.info("stopping %s (pid %d)", name, proc.pid)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Stack:
    """Server + pool + limits + automation + deployments + worker; `with Stack(opts):` or start()/stop()."""

    def __init__(self, opts: Options, log_dir: Path | None = None, worker_output: IO | None = None):
        self.opts = opts
        self.log_dir = (log_dir or opts.storage / "prefect" / "logs").resolve()
        self.worker_output = worker_output  # None: a log file in log_dir
        self.env = environment(opts)
        self.server: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        counted = count_gpus()
        self.slots = max(1, opts.gpus if opts.gpus is not None else counted)
        self.worker_specs: list[WorkerSpec] = worker_specs(
            POOL, socket.gethostname(), opts.gpus, counted, self.env
        )
        self._files: list[IO] = []

    def _log(self, name: str) -> IO:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._files.append(f)
        return f

    def _prefect(
        self, *args: str, out: IO | int | None, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        # Its own session: a Ctrl-C reaches only this launcher, which stops the children in order.
        # SIGINT back to its default: Prefect's worker stops itself with SIGINT, which a launcher
        # started in the background (SIGINT ignored, and inherited) would otherwise block.
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", *args],
            cwd=PROJECT,
            env={**self.env, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )

    def start_server(self, timeout: float = 180) -> None:
        o = self.opts
        if not port_free(o.host, o.port):
            raise RuntimeError(
                f"port {o.port} on {o.host} is in use: stop what uses it or pick another (make ui PORT=4300)"
            )
        (o.storage / "prefect").mkdir(parents=True, exist_ok=True)
        self.server = self._prefect(
            "server",
            "start",
            "--host",
            o.host,
            "--port",
            str(o.port),
            "--analytics-off",
            out=self._log("server"),
        )
        wait_healthy(o.api_url, self.server, timeout, self.log_dir / "server.log")

    def configure(self) -> None:
        _with_api(self.opts, configure, self.opts.max_reschedules, self.slots)

    def deploy(self) -> str:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "prefect",
                "--no-prompt",
                "deploy",
                "--all",
                "--prefect-file",
                PREFECT_FILE,
            ],
            cwd=PROJECT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"prefect deploy failed ({done.returncode}):\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
            )
        if self.opts.preset:
            _with_api(self.opts, set_default_preset, self.opts.preset)
        return done.stdout

    def start_workers(self, timeout: float = 120) -> None:
        """One worker per GPU (`deployments.workers`), each its card's only user; wait until all are up."""
        for spec in self.worker_specs:
            out = self.worker_output if self.worker_output is not None else self._log(spec.name)
            self.workers.append(self._prefect(*spec.args, out=out, env=spec.env))
        names = {spec.name for spec in self.worker_specs}
        deadline = time.monotonic() + timeout
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.opts.api_url}):
            while time.monotonic() < deadline:
                for proc in self.workers:
                    if proc.poll() is not None:
                        raise RuntimeError(f"a worker exited with code {proc.returncode}")
                if names <= asyncio.run(workers_online()):
                    return
                time.sleep(1)
        raise TimeoutError(f"the workers did not come online within {timeout:.0f} s")

    def start(self) -> Stack:
        try:
            t0 = time.monotonic()
            if self.opts.api:
                wait_healthy(self.opts.api_url, None, timeout=10)
            else:
                self.start_server()
            log.info("Prefect server up at %s in %.0f s", self.opts.ui_url, time.monotonic() - t0)
            self.configure()
            log.info(
                "work pool '%s' (process, %d at a time), tag limit '%s' = %d, automation '%s'",
                POOL,
                self.slots,
                POOL,
                self.slots,
                AUTOMATION if self.opts.max_reschedules else "off",
            )
            self.deploy()
            log.info("deployments applied from %s", PREFECT_FILE)
            self.start_workers()
            log.info(
                "worker(s) online on pool '%s': %s",
                POOL,
                ", ".join(f"{w.name} (CUDA_VISIBLE_DEVICES={w.device})" for w in self.worker_specs),
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in self.workers:
            _stop(proc, "worker")
        _stop(self.server, "server")
        for f in self._files:
            f.close()
        self._files.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def banner(stack: Stack) -> str:
    o = stack.opts
    db = stack.env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    db = db if db.startswith("sqlite") else db.split("@")[-1]  # never print a password
    db = f"that of the server at {o.api_url}" if o.api else db
    lines = [
        "",
        f"caiflow on Prefect: open {o.ui_url}",
        f"  deployments   {', '.join(d.split('/')[1] for d in DEPLOYMENTS)}   ({o.ui_url}/deployments)",
        f"  work pool     {POOL} (process; {stack.slots} run(s) at a time; worker output below)",
        f"  workers       {', '.join(f'{w.name} (GPU {w.device})' for w in stack.worker_specs)}",
        f"  quick run     {o.preset or 'configs/demo.yaml'} (the deployments' default preset)",
        f"  nightly       regenerate at 02:00 {o.timezone}",
        f"  crashed runs  rescheduled up to {o.max_reschedules} time(s)"
        if o.max_reschedules
        else "  crashed runs  left Crashed (automation off)",
        f"  storage       {o.storage.resolve()}",
        f"  database      {db}",
        f"  logs          {stack.log_dir}",
        "Ctrl-C stops the worker." if o.api else "Ctrl-C stops the worker and the server.",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deployments.ui", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--storage",
        default=os.environ.get("CAIFLOW_STORAGE") or str(PROJECT / "storage"),
        help="artifact root; the SQLite database goes to <storage>/prefect/ (default: storage/)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address the server listens on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=4200, help="server and UI port (default: 4200)")
    p.add_argument(
        "--timezone",
        default=os.environ.get("CAIFLOW_TIMEZONE") or "UTC",
        help="timezone of the 02:00 nightly regeneration, an IANA name (default: UTC)",
    )
    p.add_argument(
        "--max-reschedules",
        type=int,
        default=2,
        help="times a crashed run is rescheduled; 0 turns the automation off (default: 2)",
    )
    p.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="runs and model steps at once (default: the number of GPUs, 1 without one)",
    )
    p.add_argument(
        "--api-url",
        default=None,
        help="use this running Prefect server (e.g. http://host:4200/api) instead of starting one",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="default `config` of the deployments, e.g. configs/tiny.yaml for quick tries "
        "(default: the flows' own, configs/demo.yaml)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)-7s | %(name)s - %(message)s")
    quiet_http_loggers()
    args = build_parser().parse_args(argv)
    from zoneinfo import ZoneInfo

    try:
        ZoneInfo(args.timezone)
    except Exception:  # noqa: BLE001 - ZoneInfoNotFoundError or a malformed name
        print(
            f"caiflow ui: error: unknown timezone '{args.timezone}': use an IANA name such as UTC or "
            "Europe/Berlin",
            file=sys.stderr,
        )
        return 2
    opts = Options(
        storage=Path(args.storage),
        host=args.host,
        port=args.port,
        timezone=args.timezone,
        max_reschedules=args.max_reschedules,
        gpus=args.gpus,
        preset=args.preset,
        api=args.api_url,
    )
    try:
        stack = Stack(opts, worker_output=sys.stdout.buffer)
    except WorkerSetupError as exc:
        print(f"caiflow ui: error: {exc}", file=sys.stderr)
        return 2
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started with SIGINT ignored (a background job)
    try:
        stack.start()
        print(banner(stack), flush=True)
        while True:
            for proc, name in [(stack.server, "server")] + [(w, "worker") for w in stack.workers]:
                if proc is not None and proc.poll() is not None:
                    log.error(
                        "the %s exited with code %s; stopping (logs in %s)",
                        name,
                        proc.returncode,
                        stack.log_dir,
                    )
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"caiflow ui: error: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
