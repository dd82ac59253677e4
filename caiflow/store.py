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
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from caiflow.files import (
    TMP_PREFIX,
    atomic_write_text,
    canonical_json,
    commit,
    file_digest,
    full_digest,
    sampled_digest,
    tmp_path,
    to_json,
)
from caiflow.shards import ShardWriter, parquet_rows, part_files, strip_shard_meta, to_arrow
from caiflow.shared_fs import lock_scope_warning

log = logging.getLogger("caiflow.store")

# Bump when the on-disk layout or the manifest format changes; artifacts of another layout
# version are treated as not done (re-run), never misread.
STORE_LAYOUT_VERSION = 1

MANIFEST = "manifest.json"
DATA_DIR = "data"
WORK_DIR = "work"
_LOCKS_CHECKED: set[Path] = set()  # storage roots whose mount was checked (caiflow/shared_fs.py)
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class StoreError(PermissionError):
    """The storage root cannot be used; the message says what to do."""


class ArtifactCorrupt(RuntimeError):
    """An artifact's files do not match its manifest."""


# --------------------------------------------------------------------------- fingerprints


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


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"{kind} {value!r} is not a valid name: use letters, digits, '_', '-', '.' "
            f"(not starting with '.' or '-')"
        )
    return value


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
            raise StoreError(
                f"storage root '{root}' is not writable: pass --storage DIR with a folder you can write"
            ) from exc
        if self.root not in _LOCKS_CHECKED:  # shared storage: do the locks reach other machines?
            _LOCKS_CHECKED.add(self.root)
            warning = lock_scope_warning(self.root)
            if warning:
                log.warning(warning)

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

    def _lock_path(self, step: str, fp: str) -> Path:
        folder = self.root / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{_check_name('step', step)}-{_check_name('fingerprint', fp)}.lock"

    @contextlib.contextmanager
    def lock(self, step: str, fp: str, on_wait: Any = None, wait: bool = True) -> Iterator[bool]:
        """Hold the artifact's lock: one process computes a fingerprint, the others wait.

        An advisory `flock` on `<root>/locks/<step>-<fingerprint>.lock`: the kernel releases it when
        its holder exits or is killed, so a crashed holder never blocks the next run. On NFS, CephFS
        or Lustre (-o flock) it excludes other machines too (caiflow/shared_fs.py says where not). Yields True
        when held; with ``wait=False`` a lock held elsewhere yields False at once (not held).
        """
        import fcntl

        with open(self._lock_path(step, fp), "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)  # blocks until the holder finishes or dies
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def is_locked(self, step: str, fp: str) -> bool:
        """Some process holds this artifact's lock right now (it is being computed)."""
        with self.lock(step, fp, wait=False) as held:
            return not held

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
        return ArtifactRef(
            step=step,
            fingerprint=fp,
            path=str(self.artifact_dir(step, fp)),
            rows=int(m.get("rows", 0)),
            metrics=dict(m.get("metrics") or {}),
        )

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
            problems.append(
                f"layout version {m.get('layout_version')!r}, this code reads {STORE_LAYOUT_VERSION}"
            )
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
                kind, digest = "sha256_sampled", sampled_digest(f, size)
            else:
                kind, digest = "sha256", full_digest(f)
            if entry.get(kind) != digest:
                problems.append(f"{rel}: checksum mismatch ({kind})")
            if entry.get("rows") is not None:
                try:
                    rows = parquet_rows(f)
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
            raise ArtifactCorrupt(
                f"artifact {step}/{fp} is damaged: "
                + "; ".join(problems)
                + f" (delete {self.artifact_dir(step, fp)} to rebuild it)"
            )

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

    def shard_writer(
        self, step: str, fp: str, schema: pa.Schema, shard_size: int, part: str | None = None
    ) -> ShardWriter:
        """Shards of data/; or of work/<part>/, one of several outputs that the step combines into data/
        itself (a resume point, removed with work/ once the manifest is written)."""
        base = self.artifact_dir(step, fp)
        folder = base / DATA_DIR if part is None else self.work_dir(step, fp) / _check_name("part", part)
        return ShardWriter(folder, schema, shard_size, manifest_path=base / MANIFEST)

    def write_table(
        self, step: str, fp: str, df: pd.DataFrame, schema: pa.Schema, name: str = DATA_DIR
    ) -> None:
        """A one-shot (unsharded) table as <name>/part-00000.parquet, validated and written atomically."""
        table = to_arrow(df, schema, where=f"{step} table")
        (self.artifact_dir(step, fp) / MANIFEST).unlink(missing_ok=True)
        folder = self.artifact_dir(step, fp) / _check_name("table name", name)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / "part-00000.parquet"
        tmp = tmp_path(final)
        try:
            pq.write_table(table, tmp)
            commit(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        for p in part_files(folder):  # a one-shot table is the only part
            if p != final:
                p.unlink(missing_ok=True)

    def read_table(
        self, ref_or_dir: ArtifactRef | str | Path, columns: list[str] | None = None, name: str = DATA_DIR
    ) -> pd.DataFrame:
        """The part-*.parquet files of an artifact (a ref, its folder, a data folder or one file),
        in order."""
        path = Path(ref_or_dir.path) if isinstance(ref_or_dir, ArtifactRef) else Path(ref_or_dir)
        if path.is_file():
            parts = [path]
        elif (path / name).is_dir():
            parts = part_files(path / name)
        elif path.is_dir():
            parts = part_files(path)
        else:
            raise FileNotFoundError(f"no artifact at {path}")
        if not parts:
            raise FileNotFoundError(f"no {name}/part-*.parquet files under {path}")
        tables = [strip_shard_meta(pq.ParquetFile(p).read(columns=columns)) for p in parts]
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

    def finalize(
        self,
        step: str,
        fp: str,
        *,
        rows: int,
        metrics: dict,
        inputs: dict,
        params: dict,
        recipe: dict | None = None,
        files: list[str] | None = None,
    ) -> ArtifactRef:
        """Checksum the artifact's files and write manifest.json last (temp + fsync + rename).

        `recipe`: what went into the fingerprint besides `inputs` (see `caiflow.plan.Plan.parts`),
        so `caiflow status` can say which setting differs from a later plan.
        """
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
            kind, digest = file_digest(p, size)
            entries[rel] = {
                "bytes": size,
                kind: digest,
                "rows": parquet_rows(p) if p.suffix == ".parquet" else None,
            }
        data_rows = sum(
            e["rows"] for r, e in entries.items() if r.startswith(f"{DATA_DIR}/part-") and e["rows"]
        )
        if any(r.startswith(f"{DATA_DIR}/part-") for r in entries) and data_rows != rows:
            log.warning(
                "%s/%s: finalized with rows=%d but its data files hold %d rows", step, fp, rows, data_rows
            )
        manifest = {
            "step": step,
            "fingerprint": fp,
            "layout_version": STORE_LAYOUT_VERSION,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "rows": int(rows),
            "metrics": metrics,
            "inputs": inputs,
            "params": params,
            "recipe": recipe,
            "files": entries,
        }
        text = to_json(manifest)
        atomic_write_text(base / MANIFEST, text)
        return ArtifactRef(
            step=step, fingerprint=fp, path=str(base), rows=int(rows), metrics=json.loads(text)["metrics"]
        )

    def write_run_record(self, run_id: str, record: dict) -> Path:
        """<root>/runs/<run_id>.json: which artifact each step used, plus config and timings."""
        # Run ids may carry timestamps ("2025-01-01T10:00:00"): keep them readable but path-safe.
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", str(run_id)).lstrip(".-")
        if not safe:
            raise ValueError(f"run id {run_id!r} has no usable characters for a file name")
        path = self.runs_root / f"{safe}.json"
        atomic_write_text(path, to_json(record))
        return path
