"""run_tasks and compute_in_order: results in order, tasks started roughly in list order."""
import threading
import time

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


def test_a_scheduler_named_in_dasks_config_wins_over_a_client(one_thread_client, monkeypatch):
    """As with dask.compute: dask.config.set(scheduler="sync") runs here even while a client exists."""
    submitted = []
    monkeypatch.setattr(one_thread_client, "compute", lambda *a, **kw: submitted.append(a))
    with dask.config.set(scheduler="sync"):
        assert progress.active_client() is None
        threads = progress.run_tasks([dask.delayed(threading.get_ident, pure=False)() for _ in range(2)], "test")
    assert threads == [threading.get_ident()] * 2 and submitted == []
    assert progress.active_client() is one_thread_client


def test_a_client_or_get_function_named_in_dasks_config_is_the_one_used(one_thread_client):
    """``dask.config.set(scheduler=other_client)`` runs on that client, ``scheduler=dask.get`` locally."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as chosen:
        with dask.config.set(scheduler=chosen):
            assert progress.active_client() is chosen
            assert progress.run_tasks([dask.delayed(note_start, pure=False)(3)], "test") == [9]
        with dask.config.set(scheduler=dask.get):
            assert progress.active_client() is None
    assert progress.active_client() is one_thread_client


class _Terminal:
    """A text stream that says it is a terminal, keeping what is written."""

    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def test_a_log_gets_plain_lines_at_the_interval_and_at_the_end(monkeypatch):
    import io

    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    with dask.config.set({"imgcurator.progress.log-interval": "30s"}):
        bar = progress.progress_bar(4, "input shards", "shard", file=out)
    assert isinstance(bar, progress.LogProgress)
    bar.update(1)
    clock[0] += 10
    bar.update(1)
    assert out.getvalue() == ""  # within the interval: nothing yet
    clock[0] += 25
    bar.update(1)
    clock[0] += 5
    bar.total = 5  # a total learnt later is shown
    bar.update(1)
    bar.close()
    bar.close()  # once
    lines = out.getvalue().splitlines()
    assert lines == ["input shards: 75% 3/4 shards [00:35<00:11, 0.0857 shard/s]",
                     "input shards: 80% 4/5 shards [00:40<00:10, 0.1 shard/s]"]


def test_a_log_gets_a_line_every_interval_even_while_nothing_finishes():
    """A SLURM log that stays silent for an hour cannot tell a long first shard from a hung run."""
    import io

    out = io.StringIO()
    bar = progress.LogProgress(6, "input shards", "shard", interval=0.05, file=out)
    deadline = time.monotonic() + 30
    while len(out.getvalue().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(line.startswith("input shards: 0% 0/6 shards [") for line in lines)
    time.sleep(0.2)
    assert out.getvalue().splitlines() == lines  # nothing after the closing line


def test_a_log_bar_without_a_total_counts_alone():
    import io

    out = io.StringIO()
    bar = progress.LogProgress(None, "output shards", "shard", interval=3600, file=out)
    bar.update(1)
    bar.close()
    assert out.getvalue().startswith("output shards: 1 shard [00:00")


def test_a_terminal_gets_tqdms_bar_and_a_disabled_bar_prints_nothing():
    import io

    from tqdm import tqdm

    term = _Terminal()
    bar = progress.progress_bar(2, "input shards", "shard", file=term)
    assert isinstance(bar, tqdm)
    bar.update(2)
    bar.close()
    assert "2/2" in term.text
    quiet = io.StringIO()
    bar = progress.progress_bar(2, "input shards", "shard", enabled=False, file=quiet)
    bar.update(2)
    bar.close()
    assert quiet.getvalue() == ""
