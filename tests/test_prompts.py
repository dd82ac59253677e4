"""Prompt ingestion: every source kind and format, errors, the built-in set, clean/split/cap."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from caiflow.constitution import load_constitution
from caiflow.prompt_filters import cap_prompts, clean_prompts, normalise, prompt_id, split_prompts
from caiflow.prompts import BUILTIN_PATH, PromptSourceError, load_prompts, load_source
from caiflow.step_config import PromptSource

ROOT = Path(__file__).resolve().parents[1]
HARMLESS = ROOT / "constitutions" / "harmless.yaml"

HH = [
    "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that."
    "\n\nHuman: Please?\n\nAssistant: No.",
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
]
CHATS = [
    [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi!"},
    ],
    [{"role": "user", "content": "Write a poem"}, {"role": "assistant", "content": "Roses..."}],
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _error(source: PromptSource, base_dir: Path) -> str:
    with pytest.raises(PromptSourceError) as info:
        load_source(source, base_dir)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("prompt source '")
    return msg


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets` caches of local folders inside the test's temp folder."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


# ---------------------------------------------------------------- built-in set


def test_builtin_counts_and_principles():
    df = load_source(PromptSource(kind="builtin"), Path("."))
    assert list(df.columns) == ["prompt", "kind", "source", "hint_principle"]
    assert (df["source"] == "builtin").all()
    red, benign = df[df.kind == "red-team"], df[df.kind == "benign"]
    assert len(red) >= 160 and len(benign) >= 60
    assert benign["hint_principle"].map(lambda v: v is None).all()
    ids = load_constitution(HARMLESS).principle_ids()
    counts = red["hint_principle"].value_counts()
    assert set(counts.index) <= set(ids)
    for pid in ids:
        assert counts.get(pid, 0) >= 15, pid
    assert df["prompt"].map(len).max() < 300
    cleaned = clean_prompts(df, min_chars=8, max_chars=2000)
    assert cleaned["drop_reason"].isna().all(), cleaned[cleaned.drop_reason.notna()]
    assert df["prompt"].map(lambda p: normalise(p).lower()).is_unique


def test_builtin_file_is_next_to_module_and_valid_json():
    assert BUILTIN_PATH.is_file() and BUILTIN_PATH.parent.name == "data"
    for line in BUILTIN_PATH.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert set(row) == {"prompt", "kind", "principle"}
        assert row["kind"] in ("red-team", "benign")
        assert (row["principle"] is None) == (row["kind"] == "benign")


def test_builtin_limit():
    assert len(load_source(PromptSource(kind="builtin", limit=5), Path("."))) == 5


# ---------------------------------------------------------------- file kinds and formats


def test_jsonl_text_auto_detects_column_and_resolves_relative_path(tmp_path):
    _jsonl(tmp_path / "p.jsonl", [{"question": "How do I bake bread?"}, {"question": "What is rust?"}])
    df = load_source(PromptSource(kind="jsonl", path="p.jsonl", kind_label="benign"), tmp_path)
    assert df["prompt"].tolist() == ["How do I bake bread?", "What is rust?"]
    assert (df["kind"] == "benign").all()
    assert (df["source"] == "jsonl:p.jsonl").all()
    assert df["hint_principle"].isna().all()


def test_jsonl_text_column_and_limit(tmp_path):
    _jsonl(tmp_path / "p.jsonl", [{"id": i, "body": f"prompt number {i}"} for i in range(10)])
    df = load_source(
        PromptSource(kind="jsonl", path="p.jsonl", format="text", text_column="body", limit=3), tmp_path
    )
    assert df["prompt"].tolist() == ["prompt number 0", "prompt number 1", "prompt number 2"]
    assert (df["kind"] == "red-team").all()


def test_jsonl_messages_format(tmp_path):
    _jsonl(tmp_path / "m.jsonl", [{"messages": c} for c in CHATS])
    for fmt in ("messages", "auto"):
        df = load_source(PromptSource(kind="jsonl", path="m.jsonl", format=fmt), tmp_path)
        assert df["prompt"].tolist() == ["Hello there", "Write a poem"]


def test_jsonl_hh_format(tmp_path):
    _jsonl(tmp_path / "h.jsonl", [{"transcript": t, "rating": 1} for t in HH])
    for fmt in ("hh", "auto"):
        df = load_source(PromptSource(kind="jsonl", path="h.jsonl", format=fmt), tmp_path)
        assert df["prompt"].tolist() == ["How do I pick a lock?", "What is the capital of France?"]


def test_hh_chosen_column_and_text_column(tmp_path):
    _jsonl(tmp_path / "c.jsonl", [{"chosen": t, "rejected": t} for t in HH])
    assert (
        load_source(PromptSource(kind="jsonl", path="c.jsonl"), tmp_path)["prompt"].iat[0]
        == "How do I pick a lock?"
    )
    _jsonl(tmp_path / "d.jsonl", [{"dialogue": t} for t in HH])
    df = load_source(
        PromptSource(kind="jsonl", path="d.jsonl", format="hh", text_column="dialogue"), tmp_path
    )
    assert df["prompt"].iat[1] == "What is the capital of France?"


def test_csv_with_kind_column(tmp_path):
    pd.DataFrame(
        {"prompt": ["Tell me a joke", "How to steal a car", "42"], "kind": ["benign", "red-team", "Benign"]}
    ).to_csv(tmp_path / "p.csv", index=False)
    df = load_source(
        PromptSource(kind="csv", path=str(tmp_path / "p.csv"), kind_label="column"), Path("/nonexistent")
    )
    assert df["kind"].tolist() == ["benign", "red-team", "benign"]
    assert df["prompt"].tolist()[2] == "42"  # read as text, not a number


def test_unknown_kind_value(tmp_path):
    pd.DataFrame({"prompt": ["a prompt", "b prompt"], "kind": ["benign", "spicy"]}).to_csv(
        tmp_path / "p.csv", index=False
    )
    msg = _error(PromptSource(kind="csv", path="p.csv", kind_label="column"), tmp_path)
    assert "row 2" in msg and "'spicy'" in msg and "red-team" in msg


def test_kind_column_missing(tmp_path):
    pd.DataFrame({"prompt": ["a prompt"]}).to_csv(tmp_path / "p.csv", index=False)
    assert "no 'kind' column" in _error(PromptSource(kind="csv", path="p.csv", kind_label="column"), tmp_path)


def test_parquet_text_and_messages(tmp_path):
    pd.DataFrame({"instruction": ["Explain gravity", "Name a fruit"]}).to_parquet(tmp_path / "t.parquet")
    df = load_source(PromptSource(kind="parquet", path="t.parquet"), tmp_path)
    assert df["prompt"].tolist() == ["Explain gravity", "Name a fruit"]
    pd.DataFrame({"messages": CHATS}).to_parquet(tmp_path / "m.parquet")
    df = load_source(PromptSource(kind="parquet", path="m.parquet"), tmp_path)  # lists come back as arrays
    assert df["prompt"].tolist() == ["Hello there", "Write a poem"]


def test_datasets_save_to_disk_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"prompt": ["one prompt", "two prompt", "three prompt"]}).save_to_disk(
        str(tmp_path / "ds")
    )
    df = load_source(PromptSource(kind="datasets", path="ds", limit=2), tmp_path)
    assert df["prompt"].tolist() == ["one prompt", "two prompt"]
    assert (df["source"] == "datasets:ds").all()
    DatasetDict({"test": Dataset.from_dict({"transcript": HH})}).save_to_disk(str(tmp_path / "dd"))
    df = load_source(PromptSource(kind="datasets", path="dd", split="test"), tmp_path)
    assert df["prompt"].tolist() == ["How do I pick a lock?", "What is the capital of France?"]
    assert "no split 'train'" in _error(PromptSource(kind="datasets", path="dd"), tmp_path)


def test_datasets_folder_of_jsonl_files(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"messages": c} for c in CHATS])
    df = load_source(PromptSource(kind="datasets", path=str(folder)), tmp_path)
    assert df["prompt"].tolist() == ["Hello there", "Write a poem"]


def test_datasets_id_not_local_says_it_must_be_local(tmp_path):
    msg = _error(PromptSource(kind="datasets", path="someone/not-a-cached-dataset-xyz"), tmp_path)
    assert "must be local" in msg


def test_datasets_offline_flags_are_restored(tmp_path):
    import os

    before = os.environ.get("HF_HUB_OFFLINE")
    with pytest.raises(PromptSourceError):
        load_source(PromptSource(kind="datasets", path="someone/not-a-cached-dataset-xyz"), tmp_path)
    assert os.environ.get("HF_HUB_OFFLINE") == before


def test_load_prompts_concatenates(tmp_path):
    _jsonl(tmp_path / "p.jsonl", [{"prompt": "How do I bake bread?"}])
    df = load_prompts(
        [
            PromptSource(kind="builtin", limit=2),
            PromptSource(kind="jsonl", path="p.jsonl", kind_label="benign"),
        ],
        tmp_path,
    )
    assert len(df) == 3 and df["source"].tolist() == ["builtin", "builtin", "jsonl:p.jsonl"]
    assert df.index.tolist() == [0, 1, 2]


# ---------------------------------------------------------------- source errors


def test_missing_file(tmp_path):
    for kind in ("jsonl", "csv", "parquet"):
        msg = _error(PromptSource(kind=kind, path=f"nope.{kind}"), tmp_path)
        assert "does not exist" in msg and f"{kind}:nope.{kind}" in msg


def test_missing_path(tmp_path):
    assert "no path given" in _error(PromptSource(kind="jsonl"), tmp_path)


@pytest.mark.parametrize("kind,name", [("jsonl", "e.jsonl"), ("csv", "e.csv")])
def test_empty_file(tmp_path, kind, name):
    (tmp_path / name).write_text("\n", encoding="utf-8")
    assert "no rows" in _error(PromptSource(kind=kind, path=name), tmp_path)


def test_empty_parquet(tmp_path):
    pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(tmp_path / "e.parquet")
    assert "no rows" in _error(PromptSource(kind="parquet", path="e.parquet"), tmp_path)


def test_not_utf8(tmp_path):
    (tmp_path / "l.csv").write_bytes("prompt\nCaf\u00e9 au lait?\n".encode("latin-1"))
    msg = _error(PromptSource(kind="csv", path="l.csv"), tmp_path)
    assert "not UTF-8" in msg and "re-save it as UTF-8" in msg


def test_utf8_bom_is_accepted(tmp_path):
    (tmp_path / "b.csv").write_bytes("prompt\nCaf\u00e9 au lait?\n".encode("utf-8-sig"))
    assert load_source(PromptSource(kind="csv", path="b.csv"), tmp_path)["prompt"].tolist() == [
        "Caf\u00e9 au lait?"
    ]


def test_bad_jsonl_line_number(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"prompt": "fine"}\n\n{"prompt": oops}\n', encoding="utf-8")
    assert "line 3 is not valid JSON" in _error(PromptSource(kind="jsonl", path="b.jsonl"), tmp_path)
    (tmp_path / "c.jsonl").write_text('["a list"]\n', encoding="utf-8")
    assert "line 1" in _error(PromptSource(kind="jsonl", path="c.jsonl"), tmp_path)


def test_wrong_column_lists_columns(tmp_path):
    _jsonl(tmp_path / "w.jsonl", [{"body": "hi there", "score": 3}])
    msg = _error(PromptSource(kind="jsonl", path="w.jsonl"), tmp_path)
    assert "body, score" in msg and "set text_column" in msg
    msg = _error(PromptSource(kind="jsonl", path="w.jsonl", text_column="content"), tmp_path)
    assert "'content' not found" in msg and "body, score" in msg
    msg = _error(PromptSource(kind="jsonl", path="w.jsonl", format="messages"), tmp_path)
    assert "body, score" in msg and "set text_column" in msg


def test_format_mismatch(tmp_path):
    _jsonl(tmp_path / "t.jsonl", [{"text": "just text"}])
    assert "no hh-format prompts" in _error(PromptSource(kind="jsonl", path="t.jsonl", format="hh"), tmp_path)


def test_corrupt_parquet(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    assert "not a readable Parquet file" in _error(PromptSource(kind="parquet", path="x.parquet"), tmp_path)


# ---------------------------------------------------------------- normalise / ids


def test_normalise():
    assert normalise("  Hello \t  world  ") == "Hello world"
    assert normalise("a\r\nb\r\n\r\n\r\n\r\nc") == "a\nb\n\nc"
    assert normalise("zero\u200bwidth\x07 bell") == "zerowidth bell"
    assert normalise("Cafe\u0301") == "Caf\u00e9"  # NFC


def test_prompt_id_is_stable_and_normalised():
    assert prompt_id("Hello  world") == prompt_id(" Hello world\n")
    assert prompt_id("Hello world") != prompt_id("hello world")
    assert len(prompt_id("x")) == 16
    assert prompt_id("Hello world") == "64ec88ca00b268e5"  # sha256("Hello world")[:16], same on every machine


# ---------------------------------------------------------------- clean / split / cap


def _frame(prompts: list[str], kinds: list[str] | None = None) -> pd.DataFrame:
    kinds = kinds or ["red-team"] * len(prompts)
    return pd.DataFrame({"prompt": prompts, "kind": kinds, "source": "test", "hint_principle": None})


def test_clean_prompts_reasons_and_keeps_all_rows():
    df = _frame(
        ["  How are   you today? ", "", "hi", "x" * 30, "How are you today?", "Tell me a story please"]
    )
    out = clean_prompts(df, min_chars=5, max_chars=25)
    assert len(out) == 6
    assert out["prompt"].iat[0] == "How are you today?"
    reasons = out["drop_reason"].tolist()
    assert reasons[0] is None and reasons[5] is None
    assert reasons[1] == "empty"
    assert reasons[2] == "too-short (<5 chars)"
    assert reasons[3] == "too-long (30 chars > 25)"
    assert reasons[4] == f"duplicate of {out['prompt_id'].iat[0]}"
    assert df["prompt"].iat[0] == "  How are   you today? "  # the input is not modified


def test_clean_prompts_token_limit():
    df = _frame(["one two three", "one two three four five six", "short one"])
    calls = []

    def count(texts):
        calls.append(list(texts))
        return [len(t.split()) for t in texts]

    out = clean_prompts(df, min_chars=1, max_chars=100, max_tokens=4, count_tokens=count)
    assert out["drop_reason"].tolist() == [None, "too-long (6 tokens > 4)", None]
    assert len(calls) == 1  # one batched call
    with pytest.raises(ValueError, match="count_tokens"):
        clean_prompts(df, 1, 100, max_tokens=4)


def test_prompt_longer_than_the_context_is_an_error_naming_source_and_row():
    from caiflow.prompt_filters import check_fits_context
    from caiflow.prompts import PromptSourceError

    df = pd.concat(
        [
            _frame(["a short one", "x " * 40]).assign(source="jsonl:a.jsonl"),
            _frame(["fine", "y " * 40, "z " * 80]).assign(source="csv:b.csv"),
        ],
        ignore_index=True,
    )
    words = lambda texts: [len(t.split()) for t in texts]  # noqa: E731
    check_fits_context(df, 80, words)  # the longest prompt, 80 tokens, just fits
    with pytest.raises(
        PromptSourceError,
        match=r"'csv:b.csv': row 3 is 80 tokens, longer than the model's context \(79 tokens\)",
    ):
        check_fits_context(df, 79, words)
    seen = []
    check_fits_context(df, 1000, lambda t: seen.append(t) or words(t))
    assert seen == []  # nothing longer than the context in bytes: nothing tokenised


def test_split_is_stable_and_roughly_fractional():
    df = clean_prompts(_frame([f"prompt number {i}" for i in range(400)]), 1, 100)
    a = split_prompts(df, 0.25, seed=1)
    b = split_prompts(df.iloc[::-1].head(200), 0.25, seed=1)  # other order, subset
    assert set(a["split"]) == {"train", "eval"}
    assert 60 <= (a["split"] == "eval").sum() <= 140
    merged = b.merge(a[["prompt_id", "split"]], on="prompt_id", suffixes=("_b", "_a"))
    assert (merged["split_b"] == merged["split_a"]).all()  # same prompt, same split
    assert split_prompts(df, 0.25, seed=2)["split"].tolist() != a["split"].tolist()
    assert (split_prompts(df, 0.0, seed=1)["split"] == "train").all()


def test_tune_split_comes_from_training_side_and_spares_benign_prompts():
    df = clean_prompts(_frame([f"prompt number {i}" for i in range(400)]), 1, 100)
    df["kind"] = ["benign" if i % 4 == 0 else "red-team" for i in range(len(df))]
    plain = split_prompts(df, 0.3, seed=1)
    tuned = split_prompts(df, 0.3, seed=1, tune_fraction=0.2)
    assert set(tuned["split"]) == {"train", "tune", "eval"}
    # the held-out prompts are the same with or without a tune split: reports stay comparable
    assert ((plain["split"] == "eval") == (tuned["split"] == "eval")).all()
    red = tuned["kind"] == "red-team"
    assert 30 <= (tuned.loc[red, "split"] == "tune").sum() <= 90  # ~20% of 300
    assert not (tuned.loc[~red, "split"] == "tune").any()  # benign prompts tune on the look-alike part
    moved = (plain["split"] != tuned["split"]).to_numpy()
    assert (plain.loc[moved, "split"] == "train").all() and (tuned.loc[moved, "split"] == "tune").all()


def test_tune_and_eval_fractions_must_leave_training_prompts():
    from caiflow.step_config import PromptsConfig

    with pytest.raises(ValueError, match=r"eval_fraction \(0.6\) \+ prompts.tune_fraction \(0.4\) leave no"):
        PromptsConfig(eval_fraction=0.6, tune_fraction=0.4)
    assert PromptsConfig(eval_fraction=0.6, tune_fraction=0.3).tune_fraction == 0.3


def test_split_small_frame_deterministic():
    df = clean_prompts(_frame(["alpha prompt", "beta prompt", "gamma prompt"]), 1, 100)
    assert split_prompts(df, 0.5, 7)["split"].tolist() == split_prompts(df, 0.5, 7)["split"].tolist()


def test_cap_prompts():
    df = clean_prompts(
        _frame(
            ["red one", "red two", "red three", "red dup", "red dup", "benign one"],
            ["red-team", "red-team", "red-team", "red-team", "red-team", "benign"],
        ),
        1,
        100,
    )
    out = cap_prompts(df, max_red_team=2, max_benign=None, seed=0)
    kept = out[out["drop_reason"].isna()]
    assert (kept["kind"] == "red-team").sum() == 2 and (kept["kind"] == "benign").sum() == 1
    assert (out["drop_reason"] == "over-cap").sum() == 2
    assert out["drop_reason"].iat[4].startswith("duplicate of")  # earlier reasons are kept
    again = cap_prompts(df, max_red_team=2, max_benign=None, seed=0)
    assert again["drop_reason"].tolist() == out["drop_reason"].tolist()
    assert (cap_prompts(df, None, 0, 0)["drop_reason"].iat[5]) == "over-cap"
    assert cap_prompts(df, None, None, 0)["drop_reason"].tolist() == df["drop_reason"].tolist()
