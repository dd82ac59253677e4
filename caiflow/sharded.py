"""The sharded generation loop that every generation step shares.

A generation step turns a fixed, ordered list of input records (one per prompt, sorted by
prompt id) into output rows, shard by shard: shard i covers records [i * shard_size,
(i + 1) * shard_size). Each finished shard is a complete Parquet file, so after a crash only
unfinished shards are redone, and per-row seeds make a resumed output identical to an
uninterrupted one.

The loop is split so that shards can run elsewhere: `ShardedOutput.pending` lists the shards
still to make (index + input records, plain data), `ShardedOutput.write` stores one shard's
rows; `ShardedOutput.run` is the in-process executor that does both in order. Rows that an
earlier run already made under the same row context (`reusable_rows`) are taken as they are,
so only new or changed prompts cost generation.

A step with several generated outputs that it combines itself (evaluate: one per answering stage)
makes one `ShardedOutput` per `part`: its shards go to the artifact's work/<part>/ folder, a resume
point until the step has written its own data/ and the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from caiflow.faults import kill_point
from caiflow.store import Store

Rows = list[dict[str, Any]] | pd.DataFrame


@dataclass(frozen=True)
class Shard:
    index: int
    records: list[dict[str, Any]]  # the input records this shard turns into output rows


class ShardedOutput:
    """A generation step's data/ folder (or a part's work/<part>/), written shard by shard (stale shards
    removed first)."""

    def __init__(
        self,
        store: Store,
        step: str,
        fingerprint: str,
        schema: pa.Schema,
        shard_size: int,
        records: Sequence[dict[str, Any]],
        key: str = "prompt_id",
        part: str | None = None,
    ):
        self.step, self.key, self.records = step, key, list(records)
        # what shard tasks and kill points are named after: `<step>` or `<step>-<part>`
        self.name = f"{step}-{part}" if part else step
        self.store = store
        self.writer = store.shard_writer(step, fingerprint, schema, shard_size, part=part)
        self.writer.remove_stale(len(self.records))
        self.pending = [
            Shard(index, self.records[start:stop])
            for index, start, stop in self.writer.pending(len(self.records))
        ]
        self.total_shards = len(self.writer.shard_ranges(len(self.records)))

    @property
    def done_rows(self) -> int:
        """Rows in shards already finished (by an interrupted attempt at this same artifact)."""
        return len(self.records) - sum(len(s.records) for s in self.pending)

    def write(self, shard: Shard, rows: Rows) -> None:
        """Store one finished shard, then pass the kill point tests use to crash after it."""
        self.writer.write(shard.index, rows)
        kill_point(f"{self.name}:shard:{shard.index}")

    def read(self) -> pd.DataFrame:
        """Every shard's rows, in the records' order (once no shard is pending)."""
        return self.store.read_table(self.writer.data_dir)

    def todo(self, shard: Shard, reusable: dict[str, dict]) -> list[dict[str, Any]]:
        """The records of a shard that need generating (the others are in `reusable`)."""
        return [r for r in shard.records if r[self.key] not in reusable]

    def assemble(self, shard: Shard, made: Rows, reusable: dict[str, dict]) -> Rows:
        """A shard's rows in its records' order: those just `made` and the reused ones."""
        if len(made) == len(shard.records):
            return made
        made_rows = made.to_dict(orient="records") if isinstance(made, pd.DataFrame) else list(made)
        by_key = {**reusable, **{r[self.key]: r for r in made_rows}}
        return [by_key[r[self.key]] for r in shard.records]

    def run(
        self,
        make: Callable[[list[dict[str, Any]]], Rows],
        reusable: dict[str, dict] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> dict[str, int]:
        """Make and write every pending shard in order; `make` turns input records into output rows.

        Returns `rows_generated` (made by this call) and `rows_reused` (the rest: rows of earlier
        runs in `reusable`, or shards an interrupted attempt already finished). This is the
        in-process executor; `tasks/shards.py` runs the same shards on a Ray cluster.
        """
        reusable = reusable or {}
        done = self.done_rows
        generated = 0
        if on_progress is not None:
            on_progress(done)
        for shard in self.pending:
            todo = self.todo(shard, reusable)
            self.write(shard, self.assemble(shard, make(todo) if todo else [], reusable))
            generated += len(todo)
            done += len(shard.records)
            if on_progress is not None:
                on_progress(done)
        return self.counts(generated)

    def counts(self, generated: int) -> dict[str, int]:
        return {"rows_generated": generated, "rows_reused": len(self.records) - generated}


def reusable_rows(
    store: Store, step: str, context: str, records: Sequence[dict[str, Any]], match: Sequence[str]
) -> dict[str, dict]:
    """Rows of earlier finished artifacts of `step` made under the same row context, for the same input.

    Per-row seeds make a row's output a function of the row and the context alone, so a row
    generated by an earlier run (say, before 10 prompts were added) is exactly what this run
    would generate. A row counts only when its `match` columns equal the record's.
    """
    wanted = {r["prompt_id"]: r for r in records}
    found: dict[str, dict] = {}
    for artifact_step, fp in store.iter_artifacts():
        manifest = store.manifest(artifact_step, fp) if artifact_step == step else None
        if not manifest or (manifest.get("params") or {}).get("row_context") != context:
            continue
        if not store.is_complete(artifact_step, fp):
            continue
        table = pa.Table.from_pandas(
            store.read_table(store.artifact_dir(artifact_step, fp)), preserve_index=False
        )
        for row in table.to_pylist():  # plain Python values: nulls stay None, lists stay lists
            want = wanted.get(row["prompt_id"])
            if want and all(row[k] == want[k] for k in match):
                found[row["prompt_id"]] = row
    return found
