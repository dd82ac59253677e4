"""Parquet shards: a step's rows as data/part-NNNNN.parquet files of an explicit schema.

`to_arrow` turns rows into a table of exactly a schema (a missing, extra or mistyped column is
an error naming it); `ShardWriter` writes them shard by shard, resumably.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from caiflow.files import TMP_PREFIX, commit, tmp_path

# Shard metadata keys stored in each part file's Parquet key-value metadata.
_META_INDEX, _META_START, _META_ROWS, _META_SHARD_SIZE = (
    b"caiflow.shard_index",
    b"caiflow.start",
    b"caiflow.rows",
    b"caiflow.shard_size",
)
PART_RE = re.compile(r"^part-(\d+)\.parquet$")


def parquet_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def part_files(folder: Path) -> list[Path]:
    """data/part-*.parquet in shard order."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PART_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def strip_shard_meta(table: pa.Table) -> pa.Table:
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
                raise ValueError(
                    f"{where}: row {i} is a {type(row).__name__}, expected a dict of column values"
                )
            missing = [n for n in names if n not in row]
            extra = [k for k in row if k not in schema.names]
            if missing or extra:
                where = f"{where} row {i}"
                break
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; the schema needs {names}")
    if extra:
        # Dropping them silently would throw results away: add them to the schema or drop them explicitly.
        raise ValueError(
            f"{where}: column(s) {extra} are not in the schema {names}; "
            f"add them to the schema or remove them before writing"
        )

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
            raise ValueError(
                f"{where}: column '{f.name}' is not nullable but has {arr.null_count} null value(s)"
            )
        columns.append(arr)
    return pa.Table.from_arrays(columns, schema=schema)


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
        return [
            (i, start, min(start + self.shard_size, n_rows))
            for i, start in enumerate(range(0, n_rows, self.shard_size))
        ]

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
            raise ValueError(
                f"shard {index} must hold {max(expected[1], 0)} rows for {self._n_rows} rows "
                f"in shards of {self.shard_size}, got {n}"
            )
        table = to_arrow(rows, self.schema, where=f"shard {index}")
        meta = dict(self.schema.metadata or {})
        meta.update(
            {
                _META_INDEX: str(index).encode(),
                _META_START: str(index * self.shard_size).encode(),
                _META_ROWS: str(n).encode(),
                _META_SHARD_SIZE: str(self.shard_size).encode(),
            }
        )
        table = table.replace_schema_metadata(meta)
        if self._manifest_path is not None:  # the data is changing: an old manifest no longer describes it
            self._manifest_path.unlink(missing_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        final = self.shard_path(index)
        tmp = tmp_path(final)
        try:
            pq.write_table(table, tmp)
            commit(tmp, final)
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
            m = PART_RE.match(p.name)
            if p.name.startswith(TMP_PREFIX) or (m and int(m.group(1)) >= count):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed
