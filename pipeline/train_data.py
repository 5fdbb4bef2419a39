"""What each Ray Train worker reads: its equal share of a task's rows, in batches of similar
length, straight from Arrow — a tokenized table in the object store, or the cache's Parquet shards.

Why not Ray Data's `streaming_split` here: in Ray 2.60 its coordinator's scheduling loop
never blocks while no read task is running (`process_completed_tasks` only calls `ray.wait`
when tasks are active), so whenever the trainer is slower than the reader — the whole run — it
spins a full core. On our 2-core machines that halved training speed. Reading our own shards
is also where length bucketing is easy: SST-2 batches pad to ~3x their real tokens when rows
are drawn at random, ~1.1x when a batch holds rows of similar length.

Shuffling: every epoch a fresh permutation (tables) or shard order (caches); rows are then
taken a window at a time (table: 64 batches' rows; cache: 4 shards), sorted by length with
random tie-breaks, cut into batches, and the window's batches shuffled. A window's leftover rows
carry into the next, so a worker yields exactly ceil(rows / batch_size) batches.
"""
from __future__ import annotations

import math
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from pipeline.batching import length_sorted_batches, list_lengths

TABLE_WINDOW_BATCHES = 64
CACHE_WINDOW_SHARDS = 4


@dataclass(frozen=True)
class TableSource:
    """A tokenized Arrow table, put in the object store once by the driver."""
    ref: Any  # ray.ObjectRef of the pa.Table
    rows: int


@dataclass(frozen=True)
class CacheSource:
    """A cache's shards (the planned shard sets), read by each worker from cache.root."""
    root: str
    key: str
    plan: tuple  # ((set_id, manifest, quantities), ...): plain data, shipped to workers
    shard_rows: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.shard_rows)

    def sets(self) -> list:
        """The planned shard sets as `reader.plan_sets` gives them: [(ShardSet, quantities)]."""
        from pipeline.cache.store import ShardSet

        return [(ShardSet(sid, manifest), list(qs)) for sid, manifest, qs in self.plan]


def table_source(table: pa.Table) -> TableSource:
    import ray

    return TableSource(ray.put(table), len(table))


def cache_source(root: str, key: str, quantities: list[str]) -> CacheSource:
    from pipeline.cache.reader import plan_sets

    plan = plan_sets(root, key, quantities)
    shards = plan[0][0].manifest["shards"]
    return CacheSource(root, key, tuple((st.set_id, st.manifest, tuple(qs)) for st, qs in plan),
                       tuple(int(s["rows"]) for s in shards))


def rows_per_worker(rows: int, world: int) -> int:
    """Every worker trains on the same number of rows (DDP steps must match); the remainder
    of rows % world is left out of that epoch (a different remainder each epoch)."""
    return rows // world


def num_batches(rows: int, world: int, batch_size: int) -> int:
    return math.ceil(rows_per_worker(rows, world) / batch_size)


def worker_batches(source: TableSource | CacheSource, rank: int, world: int, batch_size: int,
                   seed: int) -> Iterator[pa.Table]:
    """This worker's batches for one epoch (seed = run seed + epoch): exactly
    num_batches(source.rows, world, batch_size) Arrow tables."""
    if isinstance(source, TableSource):
        import ray

        return table_batches(ray.get(source.ref), rank, world, batch_size, seed)
    rng = np.random.default_rng(seed)
    return _bucketed(_cache_windows(source, rank, rows_per_worker(source.rows, world), rng), batch_size, rng)


def table_batches(table: pa.Table, rank: int, world: int, batch_size: int, seed: int) -> Iterator[pa.Table]:
    """worker_batches for an in-memory table (also what benchmarks' plain loops iterate)."""
    rng = np.random.default_rng(seed)
    return _bucketed(_table_windows(table, rank, world, batch_size, rng), batch_size, rng)


def _table_windows(table: pa.Table, rank: int, world: int, batch_size: int, rng):
    n = rows_per_worker(len(table), world)
    mine = rng.permutation(len(table))[: n * world][rank::world]
    step = batch_size * TABLE_WINDOW_BATCHES
    for i in range(0, len(mine), step):
        yield table.take(mine[i:i + step])


def _cache_windows(source: CacheSource, rank: int, n: int, rng):
    """Rows [rank*n, (rank+1)*n) of the shards concatenated in this epoch's random order: each
    worker reads only its own shards, a window of CACHE_WINDOW_SHARDS at a time; a thread reads
    the next window's shards while the current one trains (two windows in memory at most)."""
    order = rng.permutation(len(source.shard_rows))
    pieces, start = [], 0  # (shard, first row, end row) of this worker's range
    lo, hi = rank * n, (rank + 1) * n
    for s in order:
        end = start + source.shard_rows[s]
        if end > lo and start < hi:
            pieces.append((int(s), max(lo, start) - start, min(hi, end) - start))
        start = end
    windows = [pieces[i:i + CACHE_WINDOW_SHARDS] for i in range(0, len(pieces), CACHE_WINDOW_SHARDS)]
    if not windows:
        return
    with ThreadPoolExecutor(1) as pool:  # reads the next window's pieces while this one trains
        reading = [pool.submit(_read_piece, source, *p) for p in windows[0]]
        for following in [*windows[1:], []]:
            current, reading = reading, [pool.submit(_read_piece, source, *p) for p in following]
            yield pa.concat_tables([f.result() for f in current])


def _read_piece(source: CacheSource, shard: int, first: int, end: int) -> pa.Table:
    from pipeline.cache.reader import load_shard

    table = load_shard(source.root, source.key, source.sets(), shard)
    return table.slice(first, end - first)


def _bucketed(windows: Iterator[pa.Table], batch_size: int, rng) -> Iterator[pa.Table]:
    carry = None
    for window in windows:
        if carry is not None:
            window = pa.concat_tables([carry, window])
        window = window.combine_chunks()  # one copy per window; `take` on chunks would copy per batch
        lengths = list_lengths(window.column("input_ids"))
        order = np.lexsort((rng.random(len(window)), lengths))
        full = len(order) // batch_size * batch_size
        batches = [order[i:i + batch_size] for i in range(0, full, batch_size)]
        for j in rng.permutation(len(batches)):
            yield window.take(batches[j])
        carry = window.take(order[full:]) if full < len(order) else None
    if carry is not None:
        yield carry


def eval_batches(source: TableSource, batch_size: int = 128) -> Iterator[pa.Table]:
    """Every row once, in batches of similar length (metrics do not depend on row order)."""
    import ray

    table = ray.get(source.ref)
    for rows in length_sorted_batches(list_lengths(table.column("input_ids")), batch_size):
        yield table.take(rows)


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """`items`, produced up to `depth` ahead by a background thread, in the same order: the
    next batches are read and collated (Arrow/numpy work that mostly releases the GIL) while
    the current one trains. The thread starts at once, not at the first `next`: an iterator
    made ahead of time (the next epoch's, during this one's evaluation) is already reading.
    An error in the producer is raised here; stopping early (a `break`, closing the iterator,
    or dropping one never iterated) stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    break
                q.put(item)
            else:
                q.put(_END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(_Raised(e))
        finally:
            if hasattr(items, "close"):
                items.close()

    thread = threading.Thread(target=produce, name="raykd-prefetch", daemon=True)
    thread.start()

    def stop_thread() -> None:
        stop.set()
        if threading.current_thread() is thread:  # a finalizer run by the garbage collector there
            return
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass

    def consume() -> Iterator:
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Raised):
                    raise item.error
                yield item
        finally:
            stop_thread()

    consumer = consume()
    weakref.finalize(consumer, stop_thread)  # a generator never started skips its `finally`
    return consumer
