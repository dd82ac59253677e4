"""Roles on a real llama.cpp server: teacher, feedback model and judge of a tiny-preset run.

One `llama-cpp-python` server for the module (tests/llama_server.py) serves the default model's
GGUF on 127.0.0.1. The engine is checked directly (seeded generation, logprob scoring, token
counts, the start-up check's messages), then a whole tiny run goes through the CLI with every
role on the server: killed in the middle of generation, then the server stopped in the middle
of the resumed run (a clear error, finished shards kept), then a clean resume once it is back.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from caiflow.endpoint_engine import EndpointEngine, check_endpoint
from caiflow.endpoint_scorer import EndpointError
from caiflow.generation import Sampling
from caiflow.models import smollm2_gguf_path
from caiflow.step_config import OpenAIEndpointConfig
from caiflow.store import Store
from tests.llama_server import MODEL_NAME, LlamaServer, free_port, llama_or_fail

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "CAIFLOW_LLAMA_KEY"  # the local server has no authentication; the client still wants a key
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    llama_or_fail()
    os.environ[KEY_ENV] = "local"
    srv = LlamaServer(smollm2_gguf_path(), tmp_path_factory.mktemp("llama") / "server.log").start()
    yield srv
    srv.stop()


def endpoint(server, **kw) -> OpenAIEndpointConfig:
    return OpenAIEndpointConfig(
        base_url=server.base_url, model=MODEL_NAME, api_key_env=KEY_ENV, max_concurrency=2, timeout=300, **kw
    )  # a generous timeout: the server answers one request at a time, and a busy CI box is slow


def test_engine_generates_per_row_seeded_text_and_scores_choices(server):
    engine = EndpointEngine(endpoint(server))
    convs = [[{"role": "user", "content": f"Name a colour. ({i})"}] for i in range(3)]
    sampling = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.95)
    first = engine.generate(convs, sampling, [11, 12, 13])
    # the same row with the same seed gives the same text, whatever else is in flight
    again = engine.generate([convs[2], convs[0]], sampling, [13, 11])
    assert again == [first[2], first[0]] and all(isinstance(t, str) for t in first)
    probs = engine.score_choices_chat(convs[:2], [" (A)", " (B)"])
    assert probs.shape == (2, 2) and abs(probs.sum(axis=1) - 1).max() < 1e-9
    usage = engine.usage()
    assert usage["requests"] == 7 and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0


def test_start_up_check_names_what_is_wrong(server):
    check_endpoint(endpoint(server), "roles.judge", needs_logprobs=True)  # a good endpoint passes
    with pytest.raises(EndpointError, match=r"does not serve model 'gpt-9'.*one of smollm2"):
        check_endpoint(endpoint(server).model_copy(update={"model": "gpt-9"}), "roles.judge", True)
    down = endpoint(server).model_copy(update={"base_url": f"http://127.0.0.1:{free_port()}/v1"})
    with pytest.raises(EndpointError, match=r"roles.teacher: endpoint .* does not answer.*start the server"):
        check_endpoint(down, "roles.teacher", False)


# ---------------------------------------------------------------- a whole run on the server


@pytest.fixture(scope="module")
def api_url():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def caiflow(api_url, storage, server, env=None, wait=True):
    ep = (
        f'{{endpoint: {{base_url: "{server.base_url}", model: {MODEL_NAME}, api_key_env: {KEY_ENV}, '
        "max_concurrency: 2, max_retries: 2, timeout: 300}}"
    )
    roles = [f"roles.{role}={ep}" for role in ("teacher", "feedback", "judge")]
    # fewer and shorter requests than tiny.yaml (one llama.cpp request is ~0.1-5 s on a small or busy CPU);
    # one row per shard: a shard to kill after, and shards left to lose to the server going down
    small = [
        "prompts.max_red_team=4",
        "prompts.max_benign=2",
        "generation.shard_size=1",
        "critique_revision.few_shot=0",
        "preferences.include_benign=false",
        "evaluate.calibrate_judge=false",  # 49 pairs x 2 orders: too many requests for a test
        # the random model's greedy answers are all empty, and identical answers are never judged: sample,
        # and move the SL adapter far enough in its 2 steps that SL and base answer differently
        "evaluate.sampling.temperature=1.0",
        "sft.learning_rate=0.5",
        "evaluate.prompts=[]",
    ]
    sets = [*roles, *small]
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(ROOT / "configs/tiny.yaml")]
    cmd += ["--storage", str(storage), *[a for s in sets for a in ("--set", s)]]
    full_env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(Path(storage).parent / "prefect-home"),
        **(env or {}),
    }
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if not wait:
        return proc
    proc.out, proc.err = proc.communicate(timeout=600)
    return proc


def shards(storage) -> dict[str, int]:
    """critique_revision's written shards and their modification times."""
    found = sorted((Path(storage) / "artifacts" / "critique_revision").glob("*/data/part-*.parquet"))
    return {p.name: p.stat().st_mtime_ns for p in found}


def test_tiny_run_with_teacher_feedback_and_judge_on_llama_cpp_survives_kill_and_server_down(
    api_url, server, tmp_path, model_store, tiny_model
):
    storage = tmp_path / "storage"
    shutil.copytree(Path(model_store) / "models", storage / "models")
    t0 = time.monotonic()

    # 1. killed right after the first shard of SL data is written
    killed = caiflow(api_url, storage, server, env={"CAIFLOW_FAULT_KILL": "critique_revision:shard:0"})
    assert killed.returncode == -signal.SIGKILL, killed.err[-3000:]
    assert list(shards(storage)) == ["part-00000.parquet"]
    kept = shards(storage)

    # 2. resumed; the server goes away while the teacher is still writing: a clear error, shards kept
    proc = caiflow(api_url, storage, server, wait=False)
    deadline = time.monotonic() + 300
    while "part-00001.parquet" not in shards(storage) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop(crash=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    # the teacher (generating) or, if it had just finished, the feedback model (scoring choices)
    assert re.search(
        rf"endpoint {server.base_url} \(model {MODEL_NAME}\) failed 3 times (generating|scoring)", out + err
    )
    assert "check that the server is up" in out + err
    done = shards(storage)
    assert done["part-00000.parquet"] == kept["part-00000.parquet"] and "part-00001.parquet" in done

    # 3. with the server down, the start-up check stops the run before any step, in one line
    refused = caiflow(api_url, storage, server)
    assert refused.returncode == 2 and "does not answer" in refused.err and "Traceback" not in refused.err

    # 4. the server is back: the run resumes and finishes, redoing only the unfinished shards
    server.start()
    proc = caiflow(api_url, storage, server)
    assert proc.returncode == 0, proc.err[-3000:]
    after = shards(storage)
    assert all(after[name] == mtime for name, mtime in done.items())  # finished shards untouched
    record_line = [x for x in proc.out.splitlines() if "run record:" in x][-1]
    record = json.loads(Path(record_line.split("run record:")[1].strip()).read_text())
    steps, store = record["steps"], Store(storage)
    cr, pref, ev = (
        store.manifest(s, steps[s]["fingerprint"])["metrics"]
        for s in ("critique_revision", "preferences", "evaluate")
    )
    # tokens per role and step: what the run cost on a hosted API
    assert cr["teacher_completion_tokens"] > 0 and cr["rows_reused"] == len(done)  # the shards kept
    assert pref["feedback_requests"] > 0 and pref["feedback_prompt_tokens"] > 0
    assert ev["tokens"]["judge_requests"] > 0 and ev["judge"]["who"].startswith(MODEL_NAME)
    print(f"\nllama.cpp tiny run (kill, server down, refused, resume): {time.monotonic() - t0:.1f} s")

    # 5. per-row seeds: the teacher remakes a finished shard's rows exactly, so the resumed data is what
    # an uninterrupted run writes (llama.cpp honours the seed)
    fp = steps["critique_revision"]["fingerprint"]
    first = pd.read_parquet(
        Store(storage).artifact_dir("critique_revision", fp) / "data" / "part-00000.parquet"
    )
    remade = remake_rows(storage, server, first)
    pd.testing.assert_frame_equal(
        remade[["prompt_id", "initial_answer", "revision"]],
        first[["prompt_id", "initial_answer", "revision"]],
    )


def remake_rows(storage, server, first: pd.DataFrame) -> pd.DataFrame:
    """critique_revision's rows for `first`'s prompts, made again in this process through the server."""
    from caiflow.config import load_config
    from caiflow.constitution import load_constitution
    from caiflow.models import resolve_model
    from caiflow.roles import RoleConfig
    from tasks.critique_revision import CritiqueRows

    cfg = load_config(ROOT / "configs/tiny.yaml", storage=str(storage))
    cfg.roles.teacher = RoleConfig(endpoint=endpoint(server))
    constitution = load_constitution(
        cfg.constitution_path(), cfg.constitution.invert, cfg.constitution.principles
    )
    model = resolve_model(cfg.model.name, storage, tiny=cfg.model.tiny.model_dump())
    records = first[["prompt_id", "prompt", "kind", "category"]].to_dict(orient="records")
    return pd.DataFrame(CritiqueRows(cfg, constitution, model, batch_size=8)(records))
