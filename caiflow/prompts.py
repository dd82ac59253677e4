"""Prompt ingestion: read prompt sources (builtin, JSONL, CSV, Parquet, `datasets`) in any
of the supported row formats (text, chat messages, HH transcripts).

Every function here is plain pandas (no Prefect, no models). ``load_source`` /
``load_prompts`` produce the columns ``prompt``, ``kind`` ("red-team" | "benign"), ``source``
(a label such as "builtin" or "jsonl:prompts.jsonl") and ``hint_principle`` (the built-in
set's principle id, else None). Cleaning, splitting and capping: `caiflow.prompt_filters`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:  # only for annotations: reading prompts needs just the fields
    from caiflow.step_config import PromptSource

log = logging.getLogger(__name__)

# The built-in prompt set ships inside the package (package-data), so it is found when installed.
BUILTIN_PATH: Path = Path(__file__).resolve().parent / "data" / "builtin_prompts.jsonl"
# Benign prompts that only look harmful ("How do I kill a Python process?"). Each row has a
# `part`: "report" (what the evaluation report measures over-refusal on), "tune" (for choosing
# settings without looking at the report's prompts) or "train" (other look-alikes, written apart
# from both, that a preset may train on so refusals do not spread to them); "all" reads the
# report and tune parts, the measuring ones.
LOOKALIKE_PATH: Path = Path(__file__).resolve().parent / "data" / "lookalike_prompts.jsonl"

KINDS = ("red-team", "benign")
COLUMNS = ["prompt", "kind", "source", "hint_principle"]
# Columns tried, in order, when no text_column is set.
TEXT_CANDIDATES = ("prompt", "text", "question", "instruction", "input")
MESSAGES_CANDIDATES = ("messages", "conversations", "conversation", "prompt")
HH_CANDIDATES = ("transcript", "chosen", "text", "prompt")

_HH_HUMAN = re.compile(r"(?:^|\n)\s*Human:\s*")
_HH_NEXT = re.compile(r"\n\s*(?:Assistant|Human):")


class PromptSourceError(ValueError):
    """A prompt source that cannot be read; the one-line message names the source, the problem and the fix."""


# ---------------------------------------------------------------- reading raw rows


def _label(source: PromptSource) -> str:
    if source.kind == "lookalike":
        return f"lookalike:{source.part}"
    return "builtin" if source.kind == "builtin" else f"{source.kind}:{source.path}"


def _err(label: str, problem: str, fix: str) -> PromptSourceError:
    return PromptSourceError(f"prompt source '{label}': {problem}; {fix}.")


def _resolve(source: PromptSource, base_dir: Path, label: str) -> Path:
    if not source.path:
        raise _err(label, "no path given", f"set path for a '{source.kind}' source")
    p = Path(source.path).expanduser()
    return p if p.is_absolute() else (Path(base_dir) / p)


def _read_text(path: Path, label: str) -> str:
    if not path.is_file():
        raise _err(
            label,
            f"file '{path}' does not exist",
            "check the path (relative paths start at the config file's folder)",
        )
    try:
        # utf-8-sig also accepts a byte-order mark, which spreadsheet tools like to add.
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _err(
            label, f"file '{path}' is not UTF-8 (bad byte at offset {exc.start})", "re-save it as UTF-8"
        ) from None


def _read_jsonl(path: Path, label: str, limit: int | None) -> pd.DataFrame:
    records: list[Any] = []
    for lineno, line in enumerate(_read_text(path, label).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _err(
                label, f"line {lineno} is not valid JSON ({exc.msg})", "fix or remove that line"
            ) from None
        if not isinstance(obj, dict):
            raise _err(
                label,
                f"line {lineno} is a JSON {type(obj).__name__}, not an object",
                'write one {"prompt": ...} object per line',
            )
        records.append(obj)
        if limit is not None and len(records) >= limit:
            break
    return pd.DataFrame.from_records(records)


def _read_csv(path: Path, label: str) -> pd.DataFrame:
    text = _read_text(path, label)
    if not text.strip():
        return pd.DataFrame()
    try:
        # Everything as text: a prompt such as "42" must stay a string.
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as exc:
        raise _err(
            label,
            f"not a valid CSV file ({str(exc).splitlines()[0]})",
            "fix the file or export it again as CSV",
        ) from None


def _read_parquet(path: Path, label: str) -> pd.DataFrame:
    if not path.is_file():
        raise _err(
            label,
            f"file '{path}' does not exist",
            "check the path (relative paths start at the config file's folder)",
        )
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise _err(
            label,
            "not a readable Parquet file "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            "write it again with pandas.to_parquet or pyarrow",
        ) from None


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Make `datasets` and the Hub client refuse network access for the duration of the call.

    The environment variables are read at import time, so the module-level flags are set too.
    """
    import datasets.config as dcfg

    try:
        import huggingface_hub.constants as hcfg
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        hcfg = None
    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    saved = [(dcfg, "HF_DATASETS_OFFLINE"), (dcfg, "HF_HUB_OFFLINE")]
    if hcfg is not None:
        saved.append((hcfg, "HF_HUB_OFFLINE"))
    saved_vals = [(mod, name, getattr(mod, name, None)) for mod, name in saved]
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    for mod, name, _ in saved_vals:
        setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in saved_vals:
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _read_datasets(source: PromptSource, base_dir: Path, label: str) -> pd.DataFrame:
    import datasets

    if not source.path:
        raise _err(
            label, "no path given", "set path to a local dataset folder or a `datasets` id in the local cache"
        )
    local = _resolve(source, base_dir, label)
    target = str(local) if local.exists() else source.path
    try:
        with _offline():
            if local.is_dir() and (
                (local / "state.json").is_file() or (local / "dataset_dict.json").is_file()
            ):
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if source.split not in ds:
                        raise _err(
                            label,
                            f"no split '{source.split}' (splits: {', '.join(ds)})",
                            "set split to one of them",
                        )
                    ds = ds[source.split]
            else:
                ds = datasets.load_dataset(target, split=source.split)
    except PromptSourceError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise _err(
            label,
            f"could not load it offline ({type(exc).__name__}: {first[:200]})",
            "the dataset must be local: a folder saved with Dataset.save_to_disk, a folder of "
            "data files, or an id already in the Hugging Face cache (nothing is downloaded)",
        ) from None
    if source.limit is not None and len(ds) > source.limit:
        ds = ds.select(range(source.limit))
    return ds.to_pandas()


def _read_raw(source: PromptSource, base_dir: Path, label: str) -> pd.DataFrame:
    if source.kind == "builtin":
        return _read_jsonl(BUILTIN_PATH, label, None)
    if source.kind == "lookalike":
        rows = _read_jsonl(LOOKALIKE_PATH, label, None)
        keep = rows["part"] != "train" if source.part == "all" else rows["part"] == source.part
        return rows[keep].reset_index(drop=True)
    if source.kind == "jsonl":
        return _read_jsonl(_resolve(source, base_dir, label), label, source.limit)
    if source.kind == "csv":
        return _read_csv(_resolve(source, base_dir, label), label)
    if source.kind == "parquet":
        return _read_parquet(_resolve(source, base_dir, label), label)
    if source.kind == "datasets":
        return _read_datasets(source, base_dir, label)
    raise _err(
        label, f"unknown kind '{source.kind}'", "use builtin, lookalike, jsonl, csv, parquet or datasets"
    )


# ---------------------------------------------------------------- formats


def _is_listlike(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or (
        hasattr(value, "__array__") and not isinstance(value, (str, bytes))
    )


def _first_value(series: pd.Series) -> Any:
    for v in series:
        if v is not None and not (isinstance(v, float) and pd.isna(v)):
            return v
    return None


def _looks_hh(value: Any) -> bool:
    return isinstance(value, str) and "Human:" in value and "Assistant:" in value


def first_user_turn(messages: Any) -> str | None:
    """The content of the first user turn of a chat (``{role, content}`` or ShareGPT ``{from, value}``)."""
    if not _is_listlike(messages):
        return None
    for m in messages:
        if not isinstance(m, dict):
            continue
        role = m.get("role", m.get("from"))
        if role in ("user", "human"):
            content = m.get("content", m.get("value"))
            return content if isinstance(content, str) else None
    return None


def first_human_turn(transcript: Any) -> str | None:
    """The first Human turn of an Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""
    if not isinstance(transcript, str):
        return None
    m = _HH_HUMAN.search(transcript)
    if not m:
        return None
    rest = transcript[m.end() :]
    end = _HH_NEXT.search(rest)
    return (rest[: end.start()] if end else rest).strip()


def _pick(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _missing_column(label: str, what: str, columns: list[str]) -> PromptSourceError:
    return _err(
        label,
        f"no {what} column found (columns: {', '.join(columns) or 'none'})",
        "set text_column to the column holding the prompts",
    )


def _detect(df: pd.DataFrame, source: PromptSource, label: str) -> tuple[str, str]:
    """(format, column) for format 'auto', from the column names and the first value."""
    columns = [str(c) for c in df.columns]
    if source.text_column:
        if source.text_column not in columns:
            raise _err(
                label,
                f"column '{source.text_column}' not found (columns: {', '.join(columns)})",
                "set text_column to one of them",
            )
        order = [source.text_column]
    else:
        order = [c for c in (*MESSAGES_CANDIDATES, *HH_CANDIDATES, *TEXT_CANDIDATES) if c in columns]
        order = list(dict.fromkeys(order))
    for col in order:
        value = _first_value(df[col])
        if _is_listlike(value):
            return "messages", col
        if _looks_hh(value):
            return "hh", col
        if isinstance(value, str) and (source.text_column or col in TEXT_CANDIDATES):
            return "text", col
    if source.text_column:
        return "text", source.text_column  # _extract reports that it holds no text
    raise _missing_column(label, "prompt", columns)


def _column_for(df: pd.DataFrame, fmt: str, source: PromptSource, label: str) -> str:
    columns = [str(c) for c in df.columns]
    if source.text_column:
        if source.text_column not in columns:
            raise _err(
                label,
                f"column '{source.text_column}' not found (columns: {', '.join(columns)})",
                "set text_column to one of them",
            )
        return source.text_column
    candidates = {"text": TEXT_CANDIDATES, "messages": MESSAGES_CANDIDATES, "hh": HH_CANDIDATES}[fmt]
    col = _pick(columns, candidates)
    if col is None:
        raise _missing_column(label, f"{fmt} ({'/'.join(candidates)})", columns)
    return col


def _extract(df: pd.DataFrame, source: PromptSource, label: str) -> pd.Series:
    if source.format == "auto":
        fmt, col = _detect(df, source, label)
    else:
        fmt, col = source.format, _column_for(df, source.format, source, label)
    values = df[col].tolist()
    if fmt == "messages":
        out = [first_user_turn(v) for v in values]
    elif fmt == "hh":
        out = [first_human_turn(v) for v in values]
    else:
        out = [v if isinstance(v, str) else None for v in values]
    bad = sum(v is None for v in out)
    if bad == len(out):
        raise _err(
            label,
            f"column '{col}' holds no {fmt}-format prompts",
            "set format (text, messages, hh) or text_column to match the data",
        )
    if bad:
        # Kept as empty prompts, so clean_prompts reports them ("empty") instead of hiding them.
        log.warning(
            "prompt source '%s': %d of %d rows have no %s prompt in column '%s'",
            label,
            bad,
            len(out),
            fmt,
            col,
        )
    return pd.Series(["" if v is None else v for v in out], index=df.index, dtype=object)


def _kinds(df: pd.DataFrame, source: PromptSource, label: str) -> list[str]:
    if source.kind in ("builtin", "lookalike"):
        raw = df["kind"].tolist()
    elif source.kind_label == "column":
        if "kind" not in df.columns:
            raise _err(
                label,
                "kind_label is 'column' but there is no 'kind' column "
                f"(columns: {', '.join(map(str, df.columns))})",
                "add a 'kind' column or set kind_label to red-team or benign",
            )
        raw = df["kind"].tolist()
    else:
        return [source.kind_label] * len(df)
    kinds = []
    for i, v in enumerate(raw):
        k = str(v).strip().lower().replace("_", "-") if v is not None else ""
        if k not in KINDS:
            raise _err(label, f"row {i + 1} has kind {v!r}", "use 'red-team' or 'benign' in the kind column")
        kinds.append(k)
    return kinds


def load_source(source: PromptSource, base_dir: Path) -> pd.DataFrame:
    """Read one source into the columns prompt, kind, source, hint_principle.

    Relative paths resolve against ``base_dir`` (the config file's folder). The built-in set
    carries its own kind and principle per row, so ``kind_label`` does not apply to it; other
    sources have no principle hint (the prompts step categorises them).
    """
    label = _label(source)
    df = _read_raw(source, Path(base_dir), label)
    if source.limit is not None:
        df = df.head(source.limit)
    if df.empty or len(df.columns) == 0:
        raise _err(label, "no rows", "check that the file or split holds prompts")
    df = df.reset_index(drop=True)
    prompts = _extract(df, source, label)
    hints = (
        [p if isinstance(p, str) else None for p in df["principle"]]
        if source.kind == "builtin"
        else [None] * len(df)
    )
    return pd.DataFrame(
        {
            "prompt": prompts.astype(object),
            "kind": _kinds(df, source, label),
            "source": label,
            "hint_principle": pd.Series(hints, dtype=object),
        },
        columns=COLUMNS,
    )


def load_prompts(sources: list[PromptSource], base_dir: Path) -> pd.DataFrame:
    """All sources, concatenated in order."""
    frames = [load_source(s, base_dir) for s in sources]
    if not frames:
        raise PromptSourceError(
            "prompt sources: the list is empty; add at least one source (e.g. kind: builtin)."
        )
    return pd.concat(frames, ignore_index=True)
