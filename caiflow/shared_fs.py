"""Whether the store's per-fingerprint locks reach other machines, read from the storage root's mount.

The store locks an artifact with `flock` on `<root>/locks/<step>-<fingerprint>.lock` (caiflow/store.py).
On a local disk that excludes every process of the machine. On shared storage it depends on the
filesystem and its mount options:

- NFS (v3 with lockd, v4): Linux sends `flock` to the server as a whole-file byte-range lock, so it
  excludes processes on every client. A holder killed on a live machine releases it at once; a
  holder whose machine dies holds it until the server's lease runs out (NFSv4: 90 s by default).
  With `nolock`, `local_lock=flock` or `local_lock=all` the lock stays on one machine: two machines
  may compute the same fingerprint at once.
- Lustre: shared only when mounted with `-o flock` (`localflock`: one machine; `noflock`: fails).
- CephFS, GPFS/Spectrum Scale, BeeGFS: `flock` is cluster-wide.
- FUSE mounts of object stores or SSH (s3fs, gcsfuse, sshfs, ...): no shared locks.

Where the lock is local only, two machines can compute the same artifact at once. Every file still
lands by an atomic rename and per-row seeds make both copies identical, so the cost is duplicated
work (at worst a failed attempt: one run's work folder cleaned under the other's feet), not wrong
data; the store logs a warning naming the mount option to change (`lock_scope_warning`).
"""

from __future__ import annotations

from pathlib import Path

MOUNTS = "/proc/self/mounts"


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_of(path: Path, mounts: str) -> tuple[str, str, set[str]] | None:
    """(mount point, filesystem type, options) of the mount holding `path`, from a /proc/mounts text."""
    best: tuple[str, str, set[str]] | None = None
    target = str(path)
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        point, fstype, options = _unescape(parts[1]), parts[2], set(parts[3].split(","))
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype, options)
    return best


def lock_scope_warning(path: Path, mounts: str | None = None) -> str | None:
    """A one-line warning when `flock` on `path` excludes only this machine's processes; None otherwise."""
    if mounts is None:
        try:
            mounts = Path(MOUNTS).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None  # not Linux: nothing to read, nothing claimed
    found = mount_of(Path(path).resolve(), mounts)
    if found is None:
        return None
    point, fstype, options = found
    where = f"storage root {path} is on {fstype} at {point}"
    if fstype in ("nfs", "nfs4"):
        local = {"nolock", "local_lock=flock", "local_lock=all"} & options
        if local:
            return (
                f"{where} mounted with {','.join(sorted(local))}: its artifact locks are local to this "
                "machine; remount without it (local_lock=none) before several machines share this store"
            )
        return None
    if fstype == "lustre" and "flock" not in options:
        return (
            f"{where} without -o flock: its artifact locks are not shared between machines; mount it "
            "with -o flock before several machines share this store"
        )
    if fstype.startswith("fuse.") and fstype not in ("fuse.ceph-fuse", "fuse.glusterfs"):
        return (
            f"{where}: such mounts do not share file locks, so use one machine per store, or put the "
            "store on NFS, CephFS or Lustre (-o flock)"
        )
    return None
