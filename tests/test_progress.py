"""run_tasks and compute_in_order: results in order, tasks started roughly in list order."""
import threading

import dask
import pytest

from dask_imgcurator import progress

STARTED = []
_LOCK = threading.Lock()


def note_start(i):
    with _LOCK:
        STARTED.append(i)
    return i * i


@pytest.fixture
def one_thread_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def test_independent_tasks_start_in_list_order_on_a_cluster(one_thread_client, monkeypatch):
    """One graph of independent tasks runs the last first; an output shard waits for the first ones."""
    monkeypatch.setattr(progress, "ORDERED_CHUNKS", 64)
    tasks = [dask.delayed(note_start, pure=False)(i) for i in range(8)]
    STARTED.clear()
    assert progress.run_tasks(tasks, "test") == [i * i for i in range(8)]
    assert STARTED == list(range(8))


def test_a_long_list_takes_at_most_ordered_chunks_submissions(one_thread_client, monkeypatch):
    monkeypatch.setattr(progress, "ORDERED_CHUNKS", 3)
    submitted = []
    real = one_thread_client.compute
    monkeypatch.setattr(one_thread_client, "compute", lambda tasks, **kw: submitted.append(len(tasks)) or real(tasks, **kw))
    futures = progress.compute_in_order(one_thread_client, [dask.delayed(note_start, pure=False)(i) for i in range(10)])
    assert submitted == [4, 4, 2]
    assert one_thread_client.gather(futures) == [i * i for i in range(10)]


def test_without_a_cluster_the_local_scheduler_runs_them():
    assert progress.run_tasks([dask.delayed(note_start, pure=False)(i) for i in range(3)], "test") == [0, 1, 4]
