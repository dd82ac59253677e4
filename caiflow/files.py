"""File plumbing shared by the store and the model cache: atomic writes, digests, canonical JSON.

A file lands by writing a temporary file in the same folder and renaming it into place, so a
file that exists under its final name is complete. One digest function serves artifact
manifests and model identities alike.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import os
import uuid
from pathlib import Path, PurePath
from typing import Any

# Temporary files start with this prefix: hidden, never matched by `part-*.parquet`, never
# listed in a manifest, removed by `ShardWriter.remove_stale` and `Store.finalize`.
TMP_PREFIX = ".tmp-"
# Files larger than this are checksummed from their size plus first and last MiB only
# (marked "sha256_sampled"), so finalizing a multi-GB model or hashing a weights file stays fast.
SAMPLED_HASH_OVER = 64 * 2**20
_SAMPLE_BYTES = 2**20


def json_default(obj: Any) -> Any:
    """Turn the non-JSON values configs are made of into stable JSON values (never repr())."""
    if hasattr(obj, "model_dump") and not isinstance(obj, type):  # pydantic v2 models
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, PurePath):
        return obj.as_posix()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=canonical_json)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (dt.datetime, dt.date)):
        return obj.isoformat()
    if isinstance(obj, bytes):
        return obj.hex()
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(
        f"cannot put a {type(obj).__name__} into a fingerprint or manifest: "
        f"convert it to plain data (str, number, list, dict) first"
    )


def canonical_json(obj: Any) -> str:
    """One JSON text per value: sorted keys, no whitespace, the same in every process."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=json_default)


def fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: not every OS/filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_path(final: Path) -> Path:
    return final.with_name(f"{TMP_PREFIX}{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def commit(tmp: Path, final: Path) -> None:
    """fsync a finished temporary file and rename it over its final name."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def to_json(obj: Any) -> str:
    """Human-readable JSON for manifests and run records (same value rules as fingerprints)."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, default=json_default) + "\n"


def full_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_SAMPLE_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def sampled_digest(path: Path, size: int) -> str:
    """sha256 over the size, the first MiB and the last MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(str(size).encode())
        h.update(fh.read(_SAMPLE_BYTES))
        fh.seek(max(size - _SAMPLE_BYTES, 0))
        h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def file_digest(path: Path, size: int | None = None) -> tuple[str, str]:
    """("sha256" | "sha256_sampled", hex digest): files over SAMPLED_HASH_OVER are sampled."""
    size = Path(path).stat().st_size if size is None else size
    if size > SAMPLED_HASH_OVER:
        return "sha256_sampled", sampled_digest(path, size)
    return "sha256", full_digest(path)
