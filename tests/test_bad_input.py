"""Every kind of bad input through the real CLI: exit code 2, one line naming the problem and
the fix, and nothing half-written left looking complete. docs/errors.md lists these cases."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny.yaml"

GOOD_PRINCIPLE = """
  - id: kindness
    name: Kindness
    critique_request: Point out anything unkind in the last response.
    revision_request: Rewrite the response to be kind.
    feedback_question: Which response is kinder?
    inverted:
      critique_request: Point out anything kind in the last response.
      revision_request: Rewrite the response to be unkind.
      feedback_question: Which response is less kind?
"""


def _constitution(tmp, principles: str) -> str:
    path = tmp / "c.yaml"
    path.write_text(f"name: test\nversion: '1'\nprinciples:{principles}\n")
    return str(path)


def _file(tmp, name, data: bytes) -> str:
    path = tmp / name
    path.write_bytes(data)
    return str(path)


def _source(tmp, kind, name, data: bytes, extra: str = "") -> list[str]:
    return ["--set", f"prompts.sources=[{{kind: {kind}, path: {_file(tmp, name, data)}{extra}}}]"]


CSV_WRONG_COLUMN = b"question\nhello there friend\n"
LATIN1_JSONL = '{"prompt": "caf\u00e9 au lait please"}\n'.encode("latin-1")

# (case id, function(tmp) -> extra CLI args, words the one-line error must contain)
CASES = [
    (
        "malformed-yaml",
        lambda t: ["--config", _file(t, "bad.yaml", b"run: [unclosed\n")],
        ["bad.yaml", "line"],
    ),
    ("missing-config", lambda t: ["--config", str(t / "nope.yaml")], ["nope.yaml"]),
    ("unknown-key", lambda t: ["--set", "run.sede=1"], ["run.sede", "Did you mean 'seed'"]),
    ("mistyped-value", lambda t: ["--set", "run.seed=abc"], ["run.seed", "abc"]),
    ("bad-choice", lambda t: ["--set", "rl.algorithm=ppo"], ["rl.algorithm", "rloo", "grpo"]),
    ("no-principles", lambda t: ["--set", f"constitution.path={_constitution(t, ' []')}"], ["principle"]),
    (
        "principle-missing-field",
        lambda t: [
            "--set",
            "constitution.path="
            + _constitution(
                t, GOOD_PRINCIPLE.replace("    feedback_question: Which response is kinder?", "")
            ),
        ],
        ["feedback_question"],
    ),
    (
        "prompt-file-missing",
        lambda t: ["--set", "prompts.sources=[{kind: jsonl, path: /no/such/prompts.jsonl}]"],
        ["prompts.jsonl"],
    ),
    ("prompt-file-empty", lambda t: _source(t, "jsonl", "empty.jsonl", b""), ["empty"]),
    (
        "prompt-wrong-column",
        lambda t: _source(t, "csv", "p.csv", CSV_WRONG_COLUMN, ", text_column: prompt"),
        ["prompt", "question"],
    ),
    ("prompt-not-utf8", lambda t: _source(t, "jsonl", "latin.jsonl", LATIN1_JSONL), ["UTF-8"]),
    (
        "prompt-longer-than-context",
        lambda t: _source(
            t,
            "jsonl",
            "long.jsonl",
            (
                json.dumps({"prompt": "How do I bake bread?"})
                + "\n"
                + json.dumps({"prompt": "word " * 3000})
                + "\n"
            ).encode(),
        ),
        ["long.jsonl", "row 2", "longer than the model's context (2048 tokens)"],
    ),
    (
        "model-path-missing",
        lambda t: ["--set", "model.name=/no/such/model"],
        ["/no/such/model", "does not exist"],
    ),
    (
        "model-id-not-local",
        lambda t: ["--set", "model.name=someorg/not-downloaded"],
        ["someorg/not-downloaded", "nothing is downloaded"],
    ),
    (
        # the judge's principle is checked before any step, even when training uses other principles
        "judge-principle-missing",
        lambda t: [
            "--set",
            "evaluate.harmlessness_principle=kindness",
            "--set",
            "constitution.principles=[privacy]",
        ],
        ["evaluate.harmlessness_principle 'kindness'", "harmlessness", "privacy"],
    ),
    (
        "lookalikes-as-training-prompts",
        lambda t: ["--set", "prompts.sources=[{kind: builtin}, {kind: lookalike}]"],
        ["look-alike", "evaluate.prompts"],
    ),
    (
        "evaluation-prompt-file-missing",
        lambda t: ["--set", "evaluate.prompts=[{kind: jsonl, path: /no/such/eval.jsonl}]"],
        ["eval.jsonl", "does not exist"],
    ),
    (
        "storage-not-writable",
        lambda t: ["--storage", _file(t, "a-file", b"x") + "/sub"],
        ["not writable", "--storage"],
    ),
]


@pytest.mark.parametrize("case, make_args, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_clear_line(case, make_args, words, tmp_path, model_store, tiny_model):
    storage = tmp_path / "storage"
    shutil.copytree(Path(model_store) / "models", storage / "models")
    args = make_args(tmp_path)
    if "--config" not in args:
        args = ["--config", str(TINY), *args]
    if "--storage" not in args:
        args = [*args, "--storage", str(storage)]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("caiflow: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in proc.stderr
    assert not (storage / "artifacts").exists() or not list((storage / "artifacts").rglob("manifest.json"))
