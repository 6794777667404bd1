"""Load each model once per Dask worker (or once per process outside Dask)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from dask_imgcurator.backend import current_worker

T = TypeVar("T")

_ATTR = "_imgcurator_models"
_GUARD = threading.Lock()
_PROCESS_SLOTS: dict[Hashable, _Slot] = {}


class _Slot:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded = False
        self.value: Any = None


def _slots(worker: Any = None) -> dict[Hashable, _Slot]:
    worker = current_worker() if worker is None else worker
    if worker is None:
        return _PROCESS_SLOTS
    with _GUARD:
        if not hasattr(worker, _ATTR):
            setattr(worker, _ATTR, {})
        return getattr(worker, _ATTR)


def get_cached(key: Hashable, loader: Callable[[], T]) -> T:
    """Return the value cached under ``key``, calling ``loader()`` the first time.

    Values live on the current ``distributed`` worker (an attribute of the worker object)
    when called inside a task, else in a process-wide dict. Concurrent callers with the
    same key wait for one load; different keys load in parallel. A loader that raises
    caches nothing, so the next call retries.

    Parameters
    ----------
    key : hashable
        Everything that determines the value, e.g. ``("clip", ref, "cuda:0", "bf16")``.
    loader : callable
        Builds the value; runs at most once per key and worker while it succeeds.
    """
    slots = _slots()
    with _GUARD:
        slot = slots.setdefault(key, _Slot())
    with slot.lock:
        if not slot.loaded:
            slot.value = loader()
            slot.loaded = True
        return slot.value


def clear_cache(dask_worker: Any = None) -> None:
    """Drop every cached value of a worker (or of this process), e.g. to free GPU memory.

    Parameters
    ----------
    dask_worker : distributed.Worker, optional
        The worker whose models to drop. ``client.run(clear_cache)`` passes each worker
        here, so it clears every worker of a cluster. By default: the worker running the
        calling task, or this process's cache outside one.

    Examples
    --------
    >>> clear_cache()  # this process (or the current task's worker)

    With a ``distributed.Client``, ``client.run(clear_cache)`` clears all workers.
    """
    slots = _slots(dask_worker)
    with _GUARD:
        slots.clear()
