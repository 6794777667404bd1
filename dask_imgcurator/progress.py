"""Run a list of dask tasks with an optional progress bar, on the caller's client if there is one."""
from __future__ import annotations

from typing import Any, Sequence

import dask
from dask.callbacks import Callback
from tqdm.auto import tqdm


def active_client():
    """The distributed client in use, or None (never creates one)."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


#: The most graph submissions that ``compute_in_order`` makes.
ORDERED_CHUNKS = 64


def compute_in_order(client, tasks: Sequence[Any]) -> list:
    """Futures of ``tasks`` on ``client``, started roughly in list order.

    dask orders the independent tasks of one graph as it likes (one partition per input shard:
    the last first), which would hold back everything that waits for the first ones, such as
    an output shard. Chunks of the list go in as graphs of falling priority; within a chunk, no
    larger than the cluster's threads unless that takes more than ``ORDERED_CHUNKS``
    submissions, dask's order does no harm.
    """
    threads = sum(client.nthreads().values()) or 1
    size = max(threads, -(-len(tasks) // ORDERED_CHUNKS))
    futures = []
    for chunk, start in enumerate(range(0, len(tasks), size)):
        futures += client.compute(list(tasks[start:start + size]), priority=-chunk)
    return futures


def run_tasks(tasks: Sequence[Any], desc: str, progress: bool = False, unit: str = "task") -> list[Any]:
    """Compute dask delayed objects and return their results in order.

    With a distributed client the tasks run as futures on it, started roughly in list order
    (``compute_in_order``); otherwise on the local scheduler. The first failing task's exception
    is raised after cancelling the rest.
    """
    if not tasks:
        return []
    client = active_client()
    bar = tqdm(total=len(tasks), desc=desc, unit=unit, disable=not progress, leave=True)
    try:
        if client is not None:
            from distributed import as_completed

            futures = compute_in_order(client, tasks)
            try:
                for future in as_completed(futures):
                    future.result()  # raises the task's own exception
                    bar.update(1)
                return client.gather(futures)
            except BaseException:
                client.cancel(futures)
                raise
        with _TqdmCallback(bar, {t.key for t in tasks}):
            return list(dask.compute(*tasks))
    finally:
        bar.close()


class _TqdmCallback(Callback):
    """Advance a tqdm bar when one of the target keys finishes on the local scheduler."""

    def __init__(self, bar: tqdm, keys: set):
        super().__init__()
        self._bar, self._keys = bar, keys

    def _posttask(self, key, result, dsk, state, worker_id):
        if key in self._keys:
            self._bar.update(1)
