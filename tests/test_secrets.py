"""An API key from the environment reaches the endpoint and nothing else: no log, artifact,
manifest, run record, Prefect parameter or Prefect database row."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chat_server import ChatServer

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-caiflow-SECRET-7f3a9c1e5b"
pytestmark = pytest.mark.slow


def test_api_key_is_sent_to_the_endpoint_and_written_nowhere(tmp_path, model_store, tiny_model):
    storage = tmp_path / "storage"
    shutil.copytree(Path(model_store) / "models", storage / "models")
    home = tmp_path / "prefect-home"
    env = {
        **os.environ,
        "CAIFLOW_TEST_SECRET": KEY,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)  # its own temporary server, whose database lands in PREFECT_HOME
    with ChatServer({"address": "privacy", "hurt": "non-violence"}) as server:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "run",
                "--config",
                str(ROOT / "configs/tiny.yaml"),
                "--storage",
                str(storage),
                "--until",
                "prompts",
                "--set",
                "prompts.categorize.backend=endpoint",
                "--set",
                f"roles.teacher.endpoint.base_url={server.base_url}",
                "--set",
                "roles.teacher.endpoint.api_key_env=CAIFLOW_TEST_SECRET",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server.auth_headers and all(h == f"Bearer {KEY}" for h in server.auth_headers)

    assert KEY not in proc.stdout and KEY not in proc.stderr
    searched = 0
    for root in (storage, home):
        for path in root.rglob("*"):
            if path.is_file() and not path.name.endswith(".safetensors"):
                assert KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"
                searched += 1
    assert searched > 5  # artifacts, manifest, run record, Prefect results and database were there
    assert any(p.suffix == ".db" for p in home.rglob("*"))
