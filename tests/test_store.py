"""The artifact store: manifest last, shard resume, integrity checks, fingerprints."""

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from caiflow.config import build_config
from caiflow.plan import make_plan
from caiflow.store import MANIFEST, ArtifactCorrupt, Store, StoreError, fingerprint

SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string())])


def rows(start, stop):
    return [{"id": i, "text": f"row {i}"} for i in range(start, stop)]


def test_fingerprint_is_stable_and_sensitive():
    a = fingerprint("s", 1, config={"x": 1, "y": [1, 2]}, seed=3)
    assert a == fingerprint("s", 1, seed=3, config={"y": [1, 2], "x": 1})  # key order does not matter
    assert len(a) == 16
    assert a != fingerprint("s", 2, config={"x": 1, "y": [1, 2]}, seed=3)  # step version
    assert a != fingerprint("s", 1, config={"x": 2, "y": [1, 2]}, seed=3)
    assert a != fingerprint("t", 1, config={"x": 1, "y": [1, 2]}, seed=3)


def test_plan_ignores_devices_and_paths_but_not_settings(tmp_path):
    # every config field, class by class: tests/test_fingerprints.py
    base = build_config({}, base_dir=tmp_path)
    plan = make_plan(base, "c" * 16, "model@1")
    same = build_config(
        {
            "sft": {"per_device_batch_size": 2},
            "model": {"device": "cpu"},
            "run": {"storage": str(tmp_path / "elsewhere")},
        },
        base_dir=tmp_path,
    )
    assert make_plan(same, "c" * 16, "model@1").fingerprints == plan.fingerprints
    other_seed = build_config({"run": {"seed": 7}}, base_dir=tmp_path)
    assert (
        make_plan(other_seed, "c" * 16, "model@1").fingerprints["critique_revision"]
        != plan.fingerprints["critique_revision"]
    )
    other_model = make_plan(base, "c" * 16, "model@2").fingerprints
    assert all(other_model[s] != plan.fingerprints[s] for s in plan.fingerprints)
    sampling = build_config({"critique_revision": {"rounds": 2}}, base_dir=tmp_path)
    fps = make_plan(sampling, "c" * 16, "model@1").fingerprints
    assert fps["prompts"] == plan.fingerprints["prompts"]
    assert fps["critique_revision"] != plan.fingerprints["critique_revision"]


def test_manifest_is_written_last_and_lists_checksums(tmp_path):
    store = Store(tmp_path)
    writer = store.shard_writer("step", "fp1", SCHEMA, shard_size=4)
    ranges = writer.shard_ranges(10)
    assert [(s, e) for _, s, e in ranges] == [(0, 4), (4, 8), (8, 10)]
    for index, start, stop in ranges:
        writer.write(index, rows(start, stop))
        assert not store.is_complete("step", "fp1")  # shards alone never look done
        assert not (store.artifact_dir("step", "fp1") / MANIFEST).exists()
    ref = store.finalize("step", "fp1", rows=10, metrics={"n": 10}, inputs={}, params={})
    assert store.is_complete("step", "fp1")
    manifest = json.loads((store.artifact_dir("step", "fp1") / MANIFEST).read_text())
    parts = {k: v for k, v in manifest["files"].items() if k.startswith("data/part-")}
    assert len(parts) == 3 and sum(v["rows"] for v in parts.values()) == 10
    assert all(len(v["sha256"]) == 64 for v in parts.values())
    table = store.read_table(ref)
    assert list(table["id"]) == list(range(10))
    assert store.load_ref("step", "fp1").rows == 10
    assert store.verify("step", "fp1") == []


def test_shard_resume_redoes_only_missing_shards(tmp_path):
    store = Store(tmp_path)
    writer = store.shard_writer("step", "fp", SCHEMA, shard_size=4)
    writer.shard_ranges(10)
    writer.write(0, rows(0, 4))
    writer.write(1, rows(4, 8))
    first = writer.shard_path(0).stat().st_mtime_ns
    # a crash mid-write leaves a temporary file, never a part file under its final name
    (writer.data_dir / ".tmp-part-00002.parquet.123").write_bytes(b"half")
    again = store.shard_writer("step", "fp", SCHEMA, shard_size=4)
    assert [i for i, _, _ in again.pending(10)] == [2]
    again.remove_stale(10)
    assert not list(writer.data_dir.glob(".tmp-*"))
    again.write(2, rows(8, 10))
    assert again.pending(10) == []
    assert writer.shard_path(0).stat().st_mtime_ns == first
    store.finalize("step", "fp", rows=10, metrics={}, inputs={}, params={})
    assert list(store.read_table(store.load_ref("step", "fp"))["id"]) == list(range(10))


def test_shard_with_wrong_row_count_or_schema_is_redone(tmp_path):
    store = Store(tmp_path)
    writer = store.shard_writer("step", "fp", SCHEMA, shard_size=4)
    writer.shard_ranges(8)
    writer.write(0, rows(0, 4))
    other = store.shard_writer("step", "fp", pa.schema([("id", pa.int64())]), shard_size=4)
    assert [i for i, _, _ in other.pending(8)] == [0, 1]  # schema changed: nothing reused
    resized = store.shard_writer("step", "fp", SCHEMA, shard_size=3)
    assert 0 in [i for i, _, _ in resized.pending(8)]  # another shard layout: rewritten


def test_rows_are_validated_against_the_schema(tmp_path):
    writer = Store(tmp_path).shard_writer("step", "fp", SCHEMA, shard_size=4)
    writer.shard_ranges(1)
    with pytest.raises(Exception) as info:
        writer.write(0, [{"id": "not a number", "text": "x"}])
    assert "id" in str(info.value)
    assert not writer.shard_path(0).exists()


def test_verify_reports_corruption_and_incomplete_artifacts(tmp_path):
    store = Store(tmp_path)
    store.write_table("step", "fp", pd.DataFrame(rows(0, 5)), SCHEMA)
    store.finalize("step", "fp", rows=5, metrics={}, inputs={}, params={})
    part = store.artifact_dir("step", "fp") / "data" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    part.write_bytes(bytes(data))
    problems = store.verify("step", "fp")
    assert problems and any("part-00000" in p for p in problems)
    with pytest.raises(ArtifactCorrupt):
        store.check("step", "fp")
    part.unlink()
    assert not store.is_complete("step", "fp")  # a missing file is never trusted


def test_run_record_and_unwritable_root(tmp_path):
    store = Store(tmp_path)
    path = store.write_run_record("2026-01-01T10:00:00", {"steps": {"a": "b"}})
    assert path.parent == tmp_path / "runs" and json.loads(path.read_text())["steps"] == {"a": "b"}
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions do not bind, use a file as root
            blocker = tmp_path / "a-file"
            blocker.write_text("x")
            target = blocker / "sub"
        else:
            target = locked / "sub"
        with pytest.raises(StoreError) as info:
            Store(target)
        assert "not writable" in str(info.value) and "--storage" in str(info.value)
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- shared storage: locks across machines

MOUNTS = {
    "ext4 local disk": ("/dev/sda1 / ext4 rw,relatime 0 0", None),
    "NFSv4, shared locks": ("srv:/export /data nfs4 rw,vers=4.2,local_lock=none 0 0", None),
    "NFSv3 nolock": ("srv:/export /data nfs rw,vers=3,nolock 0 0", "mounted with nolock"),
    "NFSv4 local flock": ("srv:/export /data nfs4 rw,local_lock=flock 0 0", "local_lock=flock"),
    "Lustre -o flock": ("mgs@tcp:/fs /data lustre rw,flock 0 0", None),
    "Lustre localflock": ("mgs@tcp:/fs /data lustre rw,localflock 0 0", "without -o flock"),
    "sshfs": ("me@host:/x /data fuse.sshfs rw 0 0", "do not share file locks"),
    "CephFS": ("10.0.0.1:/ /data ceph rw,name=admin 0 0", None),
}


@pytest.mark.parametrize("case", sorted(MOUNTS))
def test_lock_scope_of_shared_filesystems(case):
    from caiflow.shared_fs import lock_scope_warning

    line, expected = MOUNTS[case]
    mounts = "/dev/sda1 / ext4 rw 0 0\n" + line  # the longest mount point holding the path wins
    warning = lock_scope_warning(Path("/data/caiflow"), mounts)
    if expected is None:
        assert warning is None, warning
    else:
        assert expected in warning and "\n" not in warning


def test_store_on_a_mount_with_local_locks_says_so(tmp_path, monkeypatch, caplog):
    from caiflow import shared_fs

    fake = tmp_path / "mounts"
    point = str(tmp_path).replace(" ", "\\040")
    fake.write_text(f"/dev/sda1 / ext4 rw 0 0\nsrv:/export {point} nfs rw,vers=3,nolock 0 0\n")
    monkeypatch.setattr(shared_fs, "MOUNTS", str(fake))
    with caplog.at_level("WARNING", logger="caiflow.store"):
        Store(tmp_path / "store")
    assert any("remount without it" in r.getMessage() for r in caplog.records)
