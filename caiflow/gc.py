"""`caiflow gc`: remove artifacts that no kept run record refers to (model folders are large).

Run records (`<root>/runs/*.json`) name the artifact of every step of a run. `collect` keeps the
newest `keep_runs` records (all of them by default), deletes the older records, and removes
every artifact none of the kept records names, including unfinished ones and corrupt artifacts
moved aside. An artifact whose lock another process holds (a run computing it now) is never
touched; each removal holds the artifact's lock, so no run can start on it meanwhile.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from caiflow.files import TMP_PREFIX
from caiflow.store import Store


@dataclass
class Collection:
    kept_runs: list[Path] = field(default_factory=list)
    removed_runs: list[Path] = field(default_factory=list)
    removed: list[tuple[str, str, int]] = field(default_factory=list)  # (step, fingerprint or folder, bytes)
    in_use: list[tuple[str, str]] = field(default_factory=list)
    kept: int = 0

    @property
    def freed_bytes(self) -> int:
        return sum(size for _, _, size in self.removed)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_records(store: Store) -> list[Path]:
    """Run records, newest first (by their `finished` time, else the file's modification time)."""
    records = []
    for path in store.runs_root.glob("*.json") if store.runs_root.is_dir() else []:
        try:
            finished = json.loads(path.read_text(encoding="utf-8")).get("finished") or ""
        except (OSError, ValueError):
            finished = ""
        records.append((finished, path.stat().st_mtime, path))
    return [p for _, _, p in sorted(records, reverse=True)]


def referenced(records: list[Path]) -> set[tuple[str, str]]:
    """(step, fingerprint) of every artifact the records name."""
    out = set()
    for path in records:
        try:
            steps = json.loads(path.read_text(encoding="utf-8")).get("steps") or {}
        except (OSError, ValueError):
            continue
        out.update((step, s["fingerprint"]) for step, s in steps.items() if isinstance(s, dict))
    return out


def collect(store: Store, keep_runs: int | None = None, dry_run: bool = False) -> Collection:
    """Remove what the kept run records do not name; with `dry_run` only report it."""
    if keep_runs is not None and keep_runs < 0:
        raise ValueError(
            f"keep_runs is {keep_runs}: pass 0 or more (or leave it out to keep every run record)."
        )
    records = run_records(store)
    result = Collection(kept_runs=records[:keep_runs] if keep_runs is not None else records)
    result.removed_runs = records[len(result.kept_runs) :]
    keep = referenced(result.kept_runs)
    for step, fp in list(store.iter_artifacts()):
        if (step, fp) in keep:
            result.kept += 1
            continue
        with store.lock(step, fp, wait=False) as held:
            if not held:
                result.in_use.append((step, fp))
                continue
            folder = store.artifact_dir(step, fp)
            result.removed.append((step, fp, _size(folder)))
            if not dry_run:
                shutil.rmtree(folder)
                (store.root / "locks" / f"{step}-{fp}.lock").unlink(missing_ok=True)
    for step_dir in sorted(store.artifacts_root.glob("*")) if store.artifacts_root.is_dir() else []:
        for aside in sorted(step_dir.glob(f"{TMP_PREFIX}corrupt-*")):  # corrupt artifacts moved aside
            result.removed.append((step_dir.name, aside.name, _size(aside)))
            if not dry_run:
                shutil.rmtree(aside)
    if not dry_run:
        for path in result.removed_runs:
            path.unlink(missing_ok=True)
    return result
