"""Progress bars that suit where they are shown, and running a list of dask tasks with one."""
from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any, Sequence

import dask
from dask.callbacks import Callback
from tqdm import tqdm as terminal_tqdm
from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as notebook_or_terminal_tqdm

from dask_imgcurator import config


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 ("1 shard", "2 shards").

    >>> counted(1, "shard"), counted(2, "metadata part")
    ('1 shard', '2 metadata parts')
    """
    return f"{n} {_plural(noun, n)}"


def _plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
                 file: IO[str] | None = None):
    """A progress bar for ``desc``: tqdm's in a terminal or notebook, plain log lines elsewhere.

    Where standard error is neither a terminal nor a notebook (a SLURM job's log, ``2> file``,
    CI), a redrawn bar would fill the file with carriage returns and cursor moves; there the
    bar prints one plain line at most every ``imgcurator.progress.log-interval`` and one when
    it closes (see :class:`LogProgress`).

    Parameters
    ----------
    total : int, optional
        Units of work; None while unknown (it may be set later through ``.total``).
    desc, unit : str
        What the bar counts, as tqdm takes them.
    enabled : bool
        False gives a bar that shows nothing.
    file : text stream, optional
        Where to write; default standard error.
    """
    out = sys.stderr if file is None else file
    in_notebook = notebook_or_terminal_tqdm is not terminal_tqdm
    if not enabled or in_notebook or _is_terminal(out):
        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=True, file=file)
    return LogProgress(total, desc, unit, file=out)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LogProgress:
    """A progress bar for logs: one plain line (tqdm's text, no bar) every ``interval`` and at close.

    Nothing is printed before the first interval has passed, so a phase that ends quickly
    leaves a single line: what it did and how fast. After that a line comes every interval
    even while nothing finishes (a long first shard, a SLURM job waiting for its workers), so
    that a log that stops growing means a stopped run.

    >>> import io
    >>> out = io.StringIO()
    >>> bar = LogProgress(3, "input shards", "shard", interval=3600, file=out)
    >>> bar.update(2); bar.update(1); bar.close()
    >>> out.getvalue().startswith("input shards: 100% 3/3 shards [")
    True
    """

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", *,
                 interval: float | None = None, file: IO[str] | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.interval = _seconds(config.get("progress.log-interval", interval))
        self._file = file
        self._start = self._shown = time.monotonic()
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if 0 < self.interval < float("inf"):
            threading.Thread(target=self._heartbeat, name=f"progress-{desc}", daemon=True).start()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; print a line when the interval has passed."""
        self.n += n
        self._show_if_due()

    def refresh(self) -> None:
        """Nothing to redraw in a log (the next line shows any change)."""

    def close(self) -> None:
        """Print the closing line, once."""
        self._stop.set()
        with self._lock:
            if not self._closed:
                self._closed = True
                self._show()

    def __str__(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = self.n / elapsed if elapsed > 0 else None
        done = f"{100 * self.n / self.total:.0f}% " if self.total else ""
        timing = terminal_tqdm.format_interval(elapsed)
        if self.total is not None and rate and self.n < self.total:
            timing += f"<{terminal_tqdm.format_interval((self.total - self.n) / rate)}"
        speed = f", {rate:.3g} {self.unit}/s" if rate else ""
        of = f"/{self.total}" if self.total is not None else ""
        counted = self.total if self.total is not None else self.n  # "1/6 shards", "1 shard"
        return f"{self.desc}: {done}{self.n}{of} {_plural(self.unit, counted)} [{timing}{speed}]"

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval / 4):
            self._show_if_due()

    def _show_if_due(self) -> None:
        with self._lock:  # a line at a time, none after the closing one
            if not self._closed and time.monotonic() - self._shown >= self.interval:
                self._show()

    def _show(self) -> None:
        self._shown = time.monotonic()
        out = sys.stderr if self._file is None else self._file
        print(self, file=out, flush=True)


def _seconds(value: Any) -> float:
    """A duration from the config (``"30s"``, ``"2 minutes"``, a number of seconds)."""
    from dask.utils import parse_timedelta

    return float(parse_timedelta(value, default="s"))


def active_client():
    """The distributed client in use, or None (never creates one).

    None too where dask's config names another scheduler (``dask.config.set(scheduler="sync")``,
    ``"threads"``, a get function such as ``dask.get``), as for ``dask.compute``: a client made earlier
    does not override it; and the client the config names (``scheduler=client``), rather than the default.
    """
    scheduler = dask.config.get("scheduler", None)
    if isinstance(scheduler, str) and scheduler not in ("dask.distributed", "distributed"):
        return None
    try:
        from distributed import Client, get_client
    except ImportError:
        return None
    if isinstance(scheduler, Client):  # dask.config.set(scheduler=client): that one, not the default
        return scheduler
    if scheduler is not None and not isinstance(scheduler, str):  # a get function, such as dask.get
        return None
    try:
        return get_client()
    except ValueError:
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
    bar = progress_bar(len(tasks), desc, unit, enabled=progress)
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

    def __init__(self, bar, keys: set):
        super().__init__()
        self._bar, self._keys = bar, keys

    def _posttask(self, key, result, dsk, state, worker_id):
        if key in self._keys:
            self._bar.update(1)
