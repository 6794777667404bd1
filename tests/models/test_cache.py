from __future__ import annotations

import threading
import time

import distributed
import pytest

from dask_imgcurator.models import ClipRef, clear_cache, get_cached, load_clip
from dask_imgcurator.models.cache import _ATTR


def _slow_counter(calls: list, value: object):
    def loader():
        calls.append(threading.get_ident())
        time.sleep(0.05)
        return value

    return loader


def test_two_threads_load_once_per_key() -> None:
    calls: list = []
    key = ("test", object())
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(get_cached(key, _slow_counter(calls, "model"))))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["model", "model"] and len(calls) == 1
    assert get_cached(("test", "other"), _slow_counter(calls, "other")) == "other"
    assert len(calls) == 2


def test_failed_load_is_retried() -> None:
    key = ("test", "flaky")

    def broken():
        raise OSError("disk hiccup")

    with pytest.raises(OSError):
        get_cached(key, broken)
    assert get_cached(key, lambda: 42) == 42


def test_load_clip_reuses_the_model(tiny: ClipRef) -> None:
    assert load_clip(tiny) is load_clip(tiny)
    assert load_clip(tiny) is not load_clip(tiny, precision="bf16")


def _load_on_worker(calls: list) -> int:
    get_cached(("test", "on-worker"), lambda: calls.append(1) or "model")
    get_cached(("test", "on-worker"), lambda: calls.append(1) or "model")
    worker = distributed.get_worker()
    return len(calls) + 10 * (("test", "on-worker") in getattr(worker, _ATTR))


def test_values_live_on_the_dask_worker() -> None:
    calls: list = []
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as client:
        assert client.submit(_load_on_worker, calls, pure=False).result() == 11


def _cached_keys(dask_worker) -> int:
    return len(getattr(dask_worker, _ATTR, {}))


def test_client_run_clear_cache_clears_the_workers() -> None:
    with distributed.LocalCluster(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        client.submit(_load_on_worker, [], pure=False).result()
        assert list(client.run(_cached_keys).values()) == [1]
        client.run(clear_cache)
        assert list(client.run(_cached_keys).values()) == [0]
        client.submit(_load_on_worker, [], pure=False).result()
        client.submit(clear_cache, pure=False).result()  # inside a task: that task's worker
        assert list(client.run(_cached_keys).values()) == [0]
