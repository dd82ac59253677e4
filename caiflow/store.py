"""The artifact store: where every step's output lives, and how a step knows it is already done.

Layout under the storage root::

    artifacts/<step>/<fingerprint>/
        data/part-00000.parquet ...   Parquet with an explicit schema, written shard by shard
        model/ ...                    weights, adapters, tokenizer (training steps)
        work/ ...                     checkpoints and scratch; never part of the artifact
        manifest.json                 written LAST and atomically: no manifest = not done
    runs/<run-id>.json                which artifact each step of a run used or produced

Every file lands by writing a temporary file in the same folder and renaming it into place,
so a file that exists under its final name is complete. A crash leaves at worst some
finished shards and hidden temporary files behind; a re-run redoes only what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("caiflow.store")

# Bump when the on-disk layout or the manifest format changes; artifacts of another layout
# version are treated as not done (re-run), never misread.
STORE_LAYOUT_VERSION = 1

MANIFEST = "manifest.json"
DATA_DIR = "data"
WORK_DIR = "work"
# Temporary files start with this prefix: hidden, never matched by `part-*.parquet`, never
# listed in a manifest, removed by `ShardWriter.remove_stale` and `Store.finalize`.
TMP_PREFIX = ".tmp-"
# Files larger than this are checksummed from their size plus first and last MiB only
# (marked "sha256_sampled" in the manifest), so finalizing a multi-GB model stays fast.
SAMPLED_HASH_OVER = 64 * 2**20
_SAMPLE_BYTES = 2**20
# Shard metadata keys stored in each part file's Parquet key-value metadata.
_META_INDEX, _META_START, _META_ROWS, _META_SHARD_SIZE = (
    b"caiflow.shard_index", b"caiflow.start", b"caiflow.rows", b"caiflow.shard_size")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")


class StoreError(PermissionError):
    """The storage root cannot be used; the message says what to do."""


class ArtifactCorrupt(RuntimeError):
    """An artifact's files do not match its manifest."""


# --------------------------------------------------------------------------- fingerprints


def _json_default(obj: Any) -> Any:
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
    raise TypeError(f"cannot put a {type(obj).__name__} into a fingerprint or manifest: "
                    f"convert it to plain data (str, number, list, dict) first")


def canonical_json(obj: Any) -> str:
    """One JSON text per value: sorted keys, no whitespace, the same in every process."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default)


def fingerprint(step: str, version: int, **parts: Any) -> str:
    """16 hex chars of sha256 over the step, its version and everything that determines its output."""
    payload = canonical_json({"step": step, "version": version, **parts})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class ArtifactRef:
    """What a task returns: enough to find and describe an artifact, small enough to pickle."""

    step: str
    fingerprint: str
    path: str  # the artifact folder, absolute
    rows: int
    metrics: dict = field(default_factory=dict, hash=False)
    # True when this run found the artifact already finished (by an earlier or a concurrent run).
    reused: bool = field(default=False, compare=False)

    def to_dict(self) -> dict:
        return {"step": self.step, "fingerprint": self.fingerprint, "path": self.path,
                "rows": self.rows, "metrics": dict(self.metrics), "reused": self.reused}

    @classmethod
    def from_dict(cls, d: dict) -> ArtifactRef:
        return cls(step=d["step"], fingerprint=d["fingerprint"], path=str(d["path"]),
                   rows=int(d["rows"]), metrics=dict(d.get("metrics") or {}))


# --------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
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


def _tmp_path(final: Path) -> Path:
    return final.with_name(f"{TMP_PREFIX}{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def _commit(tmp: Path, final: Path) -> None:
    """fsync a finished temporary file and rename it over its final name."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _to_json(obj: Any) -> str:
    """Human-readable JSON for manifests and run records (same value rules as fingerprints)."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, default=_json_default) + "\n"


def _full_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_SAMPLE_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def _sampled_digest(path: Path, size: int) -> str:
    """sha256 over the size, the first MiB and the last MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(str(size).encode())
        h.update(fh.read(_SAMPLE_BYTES))
        fh.seek(max(size - _SAMPLE_BYTES, 0))
        h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _file_digest(path: Path, size: int) -> tuple[str, str]:
    """("sha256" | "sha256_sampled", hex digest): files over SAMPLED_HASH_OVER are sampled."""
    if size > SAMPLED_HASH_OVER:
        return "sha256_sampled", _sampled_digest(path, size)
    return "sha256", _full_digest(path)


def _parquet_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"{kind} {value!r} is not a valid name: use letters, digits, '_', '-', '.' "
                         f"(not starting with '.' or '-')")
    return value


def _part_files(folder: Path) -> list[Path]:
    """data/part-*.parquet in shard order."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PART_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _strip_shard_meta(table: pa.Table) -> pa.Table:
    meta = table.schema.metadata
    if not meta:
        return table
    kept = {k: v for k, v in meta.items() if not k.startswith(b"caiflow.")}
    return table.replace_schema_metadata(kept or None)


def to_arrow(rows: list[dict] | pd.DataFrame, schema: pa.Schema, where: str = "table") -> pa.Table:
    """Rows as a table of exactly `schema`; a missing, extra or mistyped column is a ValueError naming it."""
    names = list(schema.names)
    if isinstance(rows, pd.DataFrame):
        present = [str(c) for c in rows.columns]
        missing = [n for n in names if n not in present]
        extra = [c for c in present if c not in names]
    else:
        rows = list(rows)
        missing, extra = [], []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{where}: row {i} is a {type(row).__name__}, expected a dict of column values")
            missing = [n for n in names if n not in row]
            extra = [k for k in row if k not in schema.names]
            if missing or extra:
                where = f"{where} row {i}"
                break
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; the schema needs {names}")
    if extra:
        # Dropping them silently would throw results away: add them to the schema or drop them explicitly.
        raise ValueError(f"{where}: column(s) {extra} are not in the schema {names}; "
                         f"add them to the schema or remove them before writing")

    columns = []
    for f in schema:
        values = rows[f.name] if isinstance(rows, pd.DataFrame) else [r[f.name] for r in rows]
        try:
            if isinstance(values, pd.Series):
                arr = pa.Array.from_pandas(values, type=f.type)
            else:
                arr = pa.array(values, type=f.type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"{where}: column '{f.name}' does not fit type {f.type}: {exc}") from exc
        if not f.nullable and arr.null_count:
            raise ValueError(f"{where}: column '{f.name}' is not nullable but has {arr.null_count} null value(s)")
        columns.append(arr)
    return pa.Table.from_arrays(columns, schema=schema)


# --------------------------------------------------------------------------- shards


class ShardWriter:
    """Writes one step's rows as data/part-NNNNN.parquet shards of `shard_size` rows, resumably.

    Shard i holds rows [i * shard_size, (i + 1) * shard_size). Each shard carries its index,
    start, row count and shard size in its Parquet metadata, so `is_done` can tell a finished
    shard of this layout from a leftover of another shard size (which is then rewritten).
    """

    def __init__(self, data_dir: Path, schema: pa.Schema, shard_size: int, manifest_path: Path | None = None):
        if int(shard_size) < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.data_dir = Path(data_dir)
        self.schema = schema
        self.shard_size = int(shard_size)
        self._manifest_path = manifest_path
        self._n_rows: int | None = None  # remembered from shard_ranges/pending/remove_stale

    def shard_path(self, index: int) -> Path:
        return self.data_dir / f"part-{index:05d}.parquet"

    def shard_ranges(self, n_rows: int) -> list[tuple[int, int, int]]:
        """(index, start, stop) for every shard; zero rows is one empty shard, so the schema is kept."""
        if n_rows < 0:
            raise ValueError(f"n_rows must be >= 0, got {n_rows}")
        self._n_rows = n_rows
        if n_rows == 0:
            return [(0, 0, 0)]
        return [(i, start, min(start + self.shard_size, n_rows))
                for i, start in enumerate(range(0, n_rows, self.shard_size))]

    def _expected(self, index: int) -> tuple[int, int] | None:
        """(start, rows) of shard `index` when the total row count is known."""
        if self._n_rows is None:
            return None
        start = index * self.shard_size
        if index < 0 or (start >= self._n_rows and not (index == 0 and self._n_rows == 0)):
            return (start, -1)  # beyond the last shard: never done
        return start, min(self.shard_size, self._n_rows - start)

    def is_done(self, index: int) -> bool:
        """The shard file exists, is readable, has this schema and the row count its range needs."""
        path = self.shard_path(index)
        if not path.is_file():
            return False
        try:
            pf = pq.ParquetFile(path)
            rows = pf.metadata.num_rows
            meta = pf.schema_arrow.metadata or {}
            schema = pf.schema_arrow.remove_metadata()
        except Exception:  # noqa: BLE001 - any unreadable footer means "redo this shard"
            return False
        if not schema.equals(self.schema.remove_metadata()):
            return False
        if _META_SHARD_SIZE in meta and int(meta[_META_SHARD_SIZE]) != self.shard_size:
            return False
        if _META_ROWS in meta and int(meta[_META_ROWS]) != rows:
            return False
        expected = self._expected(index)
        if expected is not None:
            start, want = expected
            if rows != want or (_META_START in meta and int(meta[_META_START]) != start):
                return False
        return True

    def pending(self, n_rows: int) -> list[tuple[int, int, int]]:
        return [r for r in self.shard_ranges(n_rows) if not self.is_done(r[0])]

    def write(self, index: int, rows: list[dict] | pd.DataFrame) -> Path:
        """Validate `rows` against the schema and land them as shard `index` (temp file + rename)."""
        expected = self._expected(index)
        n = len(rows)
        if expected is not None and n != expected[1]:
            raise ValueError(f"shard {index} must hold {max(expected[1], 0)} rows for {self._n_rows} rows "
                             f"in shards of {self.shard_size}, got {n}")
        table = to_arrow(rows, self.schema, where=f"shard {index}")
        meta = dict(self.schema.metadata or {})
        meta.update({_META_INDEX: str(index).encode(), _META_START: str(index * self.shard_size).encode(),
                     _META_ROWS: str(n).encode(), _META_SHARD_SIZE: str(self.shard_size).encode()})
        table = table.replace_schema_metadata(meta)
        if self._manifest_path is not None:  # the data is changing: an old manifest no longer describes it
            self._manifest_path.unlink(missing_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        final = self.shard_path(index)
        tmp = _tmp_path(final)
        try:
            pq.write_table(table, tmp)
            _commit(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def remove_stale(self, n_rows: int) -> list[Path]:
        """Delete shards past the current shard count and leftover temporary files; returns what went."""
        if not self.data_dir.is_dir():
            self.shard_ranges(n_rows)
            return []
        count = len(self.shard_ranges(n_rows))
        removed = []
        for p in sorted(self.data_dir.iterdir()):
            m = _PART_RE.match(p.name)
            if p.name.startswith(TMP_PREFIX) or (m and int(m.group(1)) >= count):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed


# --------------------------------------------------------------------------- the store


class Store:
    """Artifacts under `<root>/artifacts/<step>/<fingerprint>/`, run records under `<root>/runs/`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        try:  # artifacts/ and runs/ are created when first written; check the root can take files now
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{TMP_PREFIX}probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"storage root '{root}' is not writable: pass --storage DIR with a folder "
                             f"you can write") from exc

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---- paths

    @property
    def artifacts_root(self) -> Path:
        return self.root / "artifacts"

    @property
    def runs_root(self) -> Path:
        return self.root / "runs"

    def artifact_dir(self, step: str, fp: str) -> Path:
        return self.artifacts_root / _check_name("step", step) / _check_name("fingerprint", fp)

    def work_dir(self, step: str, fp: str) -> Path:
        """Checkpoints and scratch for an artifact in progress (created here, never in the manifest)."""
        path = self.artifact_dir(step, fp) / WORK_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clean_work(self, step: str, fp: str) -> None:
        shutil.rmtree(self.artifact_dir(step, fp) / WORK_DIR, ignore_errors=True)

    # ---- state

    def _read_manifest(self, step: str, fp: str) -> dict | None:
        try:
            manifest = json.loads((self.artifact_dir(step, fp) / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def manifest(self, step: str, fp: str) -> dict | None:
        """The parsed manifest, or None when it is missing or unreadable."""
        return self._read_manifest(step, fp)

    def is_complete(self, step: str, fp: str) -> bool:
        """A manifest for this step and fingerprint exists and every listed file has its recorded size."""
        m = self._read_manifest(step, fp)
        if m is None or m.get("layout_version") != STORE_LAYOUT_VERSION:
            return False
        if m.get("step") != step or m.get("fingerprint") != fp or not isinstance(m.get("files"), dict):
            return False
        base = self.artifact_dir(step, fp)
        for rel, entry in m["files"].items():
            try:
                if (base / rel).stat().st_size != entry["bytes"]:
                    return False
            except (OSError, TypeError, KeyError):
                return False
        return True

    @contextlib.contextmanager
    def lock(self, step: str, fp: str, poll: float = 2.0, on_wait: Any = None) -> Iterator[None]:
        """Hold the artifact's lock: one process computes a fingerprint, the others wait.

        An advisory `flock` on `<root>/locks/<step>-<fingerprint>.lock`: the kernel releases it when
        its holder exits or is killed, so a crashed holder never blocks the next run.
        """
        import fcntl

        folder = self.root / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{_check_name('step', step)}-{_check_name('fingerprint', fp)}.lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)  # blocks until the holder finishes or dies
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def quarantine(self, step: str, fp: str) -> Path | None:
        """Move a finished-looking but corrupt artifact aside (kept for inspection, never trusted)."""
        base = self.artifact_dir(step, fp)
        if not base.exists():
            return None
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        dest = base.with_name(f"{TMP_PREFIX}corrupt-{fp}-{stamp}")
        base.rename(dest)
        return dest

    def load_ref(self, step: str, fp: str) -> ArtifactRef | None:
        if not self.is_complete(step, fp):
            return None
        m = self._read_manifest(step, fp)
        assert m is not None
        return ArtifactRef(step=step, fingerprint=fp, path=str(self.artifact_dir(step, fp)),
                           rows=int(m.get("rows", 0)), metrics=dict(m.get("metrics") or {}))

    def verify(self, step: str, fp: str) -> list[str]:
        """Every way the artifact differs from its manifest (sizes, checksums, row counts); [] if none."""
        path = self.artifact_dir(step, fp) / MANIFEST
        if not path.is_file():
            return [f"{step}/{fp}: no {MANIFEST} (not finalized)"]
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
            files = m["files"]
            assert isinstance(files, dict)
        except Exception as exc:  # noqa: BLE001 - any failure here is the problem being reported
            return [f"{step}/{fp}: {MANIFEST} is unparseable ({type(exc).__name__}: {exc})"]
        problems = []
        if m.get("layout_version") != STORE_LAYOUT_VERSION:
            problems.append(f"layout version {m.get('layout_version')!r}, this code reads {STORE_LAYOUT_VERSION}")
        if m.get("step") != step or m.get("fingerprint") != fp:
            problems.append(f"manifest names {m.get('step')}/{m.get('fingerprint')}, not {step}/{fp}")
        base = path.parent
        for rel, entry in sorted(files.items()):
            f = base / rel
            if not f.is_file():
                problems.append(f"{rel}: missing")
                continue
            size = f.stat().st_size
            if size != entry.get("bytes"):
                problems.append(f"{rel}: {size} bytes, manifest says {entry.get('bytes')}")
                continue
            if "sha256_sampled" in entry:
                kind, digest = "sha256_sampled", _sampled_digest(f, size)
            else:
                kind, digest = "sha256", _full_digest(f)
            if entry.get(kind) != digest:
                problems.append(f"{rel}: checksum mismatch ({kind})")
            if entry.get("rows") is not None:
                try:
                    rows = _parquet_rows(f)
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"{rel}: unreadable Parquet ({exc})")
                    continue
                if rows != entry["rows"]:
                    problems.append(f"{rel}: {rows} rows, manifest says {entry['rows']}")
        return problems

    def check(self, step: str, fp: str) -> None:
        """Raise ArtifactCorrupt listing every problem `verify` finds."""
        problems = self.verify(step, fp)
        if problems:
            raise ArtifactCorrupt(f"artifact {step}/{fp} is damaged: " + "; ".join(problems)
                                  + f" (delete {self.artifact_dir(step, fp)} to rebuild it)")

    def iter_artifacts(self) -> Iterator[tuple[str, str]]:
        """(step, fingerprint) of every artifact folder present, finished or not."""
        if not self.artifacts_root.is_dir():
            return
        for step_dir in sorted(self.artifacts_root.iterdir()):
            if not step_dir.is_dir() or not _NAME_RE.match(step_dir.name):
                continue
            for fp_dir in sorted(step_dir.iterdir()):
                if fp_dir.is_dir() and _NAME_RE.match(fp_dir.name):
                    yield step_dir.name, fp_dir.name

    # ---- data

    def shard_writer(self, step: str, fp: str, schema: pa.Schema, shard_size: int) -> ShardWriter:
        return ShardWriter(self.artifact_dir(step, fp) / DATA_DIR, schema, shard_size,
                           manifest_path=self.artifact_dir(step, fp) / MANIFEST)

    def write_table(self, step: str, fp: str, df: pd.DataFrame, schema: pa.Schema, name: str = DATA_DIR) -> None:
        """A one-shot (unsharded) table as <name>/part-00000.parquet, validated and written atomically."""
        table = to_arrow(df, schema, where=f"{step} table")
        (self.artifact_dir(step, fp) / MANIFEST).unlink(missing_ok=True)
        folder = self.artifact_dir(step, fp) / _check_name("table name", name)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / "part-00000.parquet"
        tmp = _tmp_path(final)
        try:
            pq.write_table(table, tmp)
            _commit(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        for p in _part_files(folder):  # a one-shot table is the only part
            if p != final:
                p.unlink(missing_ok=True)

    def read_table(self, ref_or_dir: ArtifactRef | str | Path, columns: list[str] | None = None,
                   name: str = DATA_DIR) -> pd.DataFrame:
        """The part-*.parquet files of an artifact (a ref, its folder, a data folder or one file), in order."""
        path = Path(ref_or_dir.path) if isinstance(ref_or_dir, ArtifactRef) else Path(ref_or_dir)
        if path.is_file():
            parts = [path]
        elif (path / name).is_dir():
            parts = _part_files(path / name)
        elif path.is_dir():
            parts = _part_files(path)
        else:
            raise FileNotFoundError(f"no artifact at {path}")
        if not parts:
            raise FileNotFoundError(f"no {name}/part-*.parquet files under {path}")
        tables = [_strip_shard_meta(pq.ParquetFile(p).read(columns=columns)) for p in parts]
        return pa.concat_tables(tables).to_pandas()

    # ---- finishing

    def _collect_files(self, base: Path) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(base)
            if rel_dir == Path("."):
                dirnames[:] = [d for d in dirnames if d != WORK_DIR]
            for fn in filenames:
                if fn.startswith(TMP_PREFIX) or (rel_dir == Path(".") and fn == MANIFEST):
                    continue
                out.append((rel_dir / fn).as_posix())
        return sorted(out)

    def finalize(self, step: str, fp: str, *, rows: int, metrics: dict, inputs: dict, params: dict,
                 files: list[str] | None = None) -> ArtifactRef:
        """Checksum the artifact's files and write manifest.json last (temp + fsync + rename)."""
        base = self.artifact_dir(step, fp)
        base.mkdir(parents=True, exist_ok=True)
        data = base / DATA_DIR
        if data.is_dir():
            for p in data.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    p.unlink(missing_ok=True)
        if files is None:
            rels = self._collect_files(base)
        else:
            rels = []
            for rel in files:
                p = (base / rel).resolve()
                if not p.is_relative_to(base.resolve()) or not p.is_file():
                    raise ValueError(f"finalize {step}/{fp}: {rel!r} is not a file inside {base}")
                rels.append(p.relative_to(base.resolve()).as_posix())
        entries: dict[str, dict] = {}
        for rel in sorted(set(rels)):
            p = base / rel
            size = p.stat().st_size
            kind, digest = _file_digest(p, size)
            entries[rel] = {"bytes": size, kind: digest,
                            "rows": _parquet_rows(p) if p.suffix == ".parquet" else None}
        data_rows = sum(e["rows"] for r, e in entries.items() if r.startswith(f"{DATA_DIR}/part-") and e["rows"])
        if any(r.startswith(f"{DATA_DIR}/part-") for r in entries) and data_rows != rows:
            log.warning("%s/%s: finalized with rows=%d but its data files hold %d rows", step, fp, rows, data_rows)
        manifest = {
            "step": step,
            "fingerprint": fp,
            "layout_version": STORE_LAYOUT_VERSION,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "rows": int(rows),
            "metrics": metrics,
            "inputs": inputs,
            "params": params,
            "files": entries,
        }
        text = _to_json(manifest)
        _atomic_write_text(base / MANIFEST, text)
        return ArtifactRef(step=step, fingerprint=fp, path=str(base), rows=int(rows),
                           metrics=json.loads(text)["metrics"])

    def write_run_record(self, run_id: str, record: dict) -> Path:
        """<root>/runs/<run_id>.json: which artifact each step used, plus config and timings."""
        # Run ids may carry timestamps ("2025-01-01T10:00:00"): keep them readable but path-safe.
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", str(run_id)).lstrip(".-")
        if not safe:
            raise ValueError(f"run id {run_id!r} has no usable characters for a file name")
        path = self.runs_root / f"{safe}.json"
        _atomic_write_text(path, _to_json(record))
        return path

