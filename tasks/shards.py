"""Where a generation step's shards run: in the step's process, or on Ray as Prefect tasks.

`run_shards` is what a generation step (critique-revision, preferences, baseline, and evaluate once per
answering stage) calls with its `ShardedOutput` and a `factory` (a picklable callable building the
step's row maker):

- `generation.executor.kind: local` (default): `ShardedOutput.run` makes the shards one after
  another in this process, as always.
- `ray`: every pending shard becomes a Prefect task `<step>-shard-NNNNN` (`<step>-<part>-shard-NNNNN`
  for a part of a step's output: `evaluate-sl-shard-00000`), submitted from inside the
  step's task to the flow's own task runner (a thread each: the work itself is on Ray), so the UI
  shows each shard, its state and its retries under the step. The task lends the shard to an actor
  of `caiflow.ray_pool` (which keeps the model loaded across shards), gets the rows back and writes
  the shard file here; the step then writes the manifest last, as in-process. A shard whose Ray
  worker died is retried (`generation.executor.shard_retries`); an error in the step's code is not.

Prefect's `RayTaskRunner` (prefect-ray) is not used: it runs a flow's tasks as stateless Ray tasks,
so the model would be loaded once per shard, and a step task cannot hand its own sub-tasks to another
runner than the flow's. Shards are rows, not model state: which actor made which shard does not
change the data (per-row seeds), so the executor is not part of any fingerprint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from caiflow.faults import KILL_WORKER_ENV
from caiflow.ray_pool import ShardPool, is_lost_worker, shard_pool
from caiflow.sharded import Shard, ShardedOutput
from tasks.common import logger
from tasks.harness import StepContext


def retry_on_lost_worker(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a shard when its Ray worker, actor or node died; never on an error in the step's code."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the failed state's exception
        return is_lost_worker(exc)
    return False


@task(
    name="shard",
    cache_policy=NO_CACHE,  # the shard file is the record of a finished shard, not a Prefect result
    persist_result=False,
    retry_delay_seconds=2,  # Ray restarts a dead actor in about a second
    retry_condition_fn=retry_on_lost_worker,
)
def shard_task(
    pool: ShardPool,
    key: str,
    factory: Callable[[], Any],
    output: ShardedOutput,
    shard: Shard,
    reusable: dict[str, dict],
    storage: str,
) -> int:
    """One shard made on the Ray cluster and written here (the step's data/ or its part's folder); returns
    the rows generated."""
    todo = output.todo(shard, reusable)
    point = f"{output.name}:shard:{shard.index}"
    made = pool.make(key, factory, todo, storage, point, os.environ.get(KILL_WORKER_ENV)) if todo else []
    output.write(shard, output.assemble(shard, made, reusable))
    return len(todo)


def _in_flow() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def run_shards(
    ctx: StepContext,
    output: ShardedOutput,
    factory: Callable[[], Any],
    batch_size: int,
    reusable: dict[str, dict] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, int], Any]:
    """Make every pending shard on the configured executor: (rows generated/reused, the local maker or None).

    The local maker (built only in-process) is returned so the step can report its engine's metrics.
    """
    executor, reusable = ctx.cfg.generation.executor, reusable or {}
    if executor.kind == "local":
        maker = factory()
        return output.run(maker, reusable, on_progress), maker
    pool = shard_pool(executor.address, executor.actors, executor.cpus_per_actor)
    key = f"{output.name}/{ctx.fingerprint}/{batch_size}"  # an actor builds one row maker per key
    storage, done, generated = str(ctx.store.root), output.done_rows, 0
    ctx.log.info(
        "%s: %d shard(s) on the Ray cluster at %s", output.name, len(output.pending), executor.address
    )
    if on_progress is not None:
        on_progress(done)
    try:
        if not _in_flow():  # a step called as a plain function: the same shards, no Prefect tasks
            for shard in output.pending:
                generated += shard_task.fn(pool, key, factory, output, shard, reusable, storage)
                done += len(shard.records)
                if on_progress is not None:
                    on_progress(done)
            return output.counts(generated), None
        from prefect.futures import as_completed

        # Two shards in flight per actor: each actor has its next shard waiting, and a step of
        # thousands of shards does not hold thousands of threads (the flow's runner has no bound).
        waiting, running, window = list(output.pending), {}, 2 * len(pool.actors)
        while waiting or running:
            while waiting and len(running) < window:
                shard = waiting.pop(0)
                task_options = {
                    "name": f"{output.name}-shard-{shard.index:05d}",
                    "retries": executor.shard_retries,
                }
                future = shard_task.with_options(**task_options).submit(
                    pool, key, factory, output, shard, reusable, storage
                )
                running[future] = shard
            future = next(as_completed(list(running)))
            generated += future.result()  # a shard that failed for good fails the step
            done += len(running.pop(future).records)
            if on_progress is not None:
                on_progress(done)
        return output.counts(generated), None
    finally:
        pool.release()
        logger().debug("%s: Ray actors released the model", output.name)
