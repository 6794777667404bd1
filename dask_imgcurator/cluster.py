"""Clusters for the CLI and notebooks. Library functions never create one; they run on the
client that is active (or the local scheduler).

- :func:`local_cluster`: this machine. With GPUs (counted through NVML, so this process never
  initialises CUDA) a ``dask_cuda.LocalCUDACluster`` with one worker per GPU and an RMM pool that
  torch allocates from; otherwise a ``LocalCluster`` of worker processes whose torch threads
  split the cores between them.
- :func:`slurm_cluster`: workers in SLURM jobs through ``dask_jobqueue.SLURMCluster``.
- :func:`make_cluster`: either, by name (``auto``, ``local``, ``cuda``, ``slurm``), as the CLI's
  ``--cluster`` option does.

Settings come from the ``imgcurator`` namespace of dask's config (see
:mod:`dask_imgcurator.config` and ``imgcurator.yaml``); keyword arguments override them.

>>> from dask_imgcurator.cluster import local_cluster
>>> from distributed import Client
>>> with local_cluster(1, gpu=False) as cluster, Client(cluster) as client:   # doctest: +SKIP
...     print(client.dashboard_link)
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import dask.config
from distributed import Client, LocalCluster, WorkerPlugin

from dask_imgcurator import config
from dask_imgcurator.backend import TORCH_THREADS_PLUGIN, gpu_count
from dask_imgcurator.backend import usable_cores as _usable_cores

__all__ = [
    "CLUSTER_KINDS",
    "make_cluster",
    "local_cluster",
    "slurm_cluster",
    "TorchThreads",
    "PinGpu",
    "StopWorkerProfiler",
    "QuietTaskFailures",
    "housekeeping_settings",
    "torch_threads_for",
    "cpu_workers_for",
]

#: Values of ``kind`` for :func:`make_cluster` (and of the CLI's ``--cluster``).
CLUSTER_KINDS = ("auto", "local", "cuda", "slurm")


# ----------------------------------------------------------------------------- worker plugins


class TorchThreads(WorkerPlugin):
    """Set torch's intra-op thread count in each worker so workers do not oversubscribe cores.

    Dask's nanny starts workers with ``OMP_NUM_THREADS=1``; this gives torch ``threads``
    instead. It runs when a worker starts (or when registered on running workers); task threads
    that ran torch before it was registered keep their count until the package's stages apply
    it to them (``backend.apply_torch_threads``).
    """

    name = TORCH_THREADS_PLUGIN
    idempotent = False

    def __init__(self, threads: int):
        if int(threads) < 1:
            raise ValueError(f"torch threads must be at least 1, not {threads}")
        self.threads = int(threads)

    def setup(self, worker) -> None:
        import torch

        torch.set_num_threads(self.threads)
        os.environ["OMP_NUM_THREADS"] = str(self.threads)  # for subprocesses and libraries read later


class StopWorkerProfiler(WorkerPlugin):
    """Stop dask's statistical profiler in each worker (the dashboard's Profile page stays empty).

    The profiler samples every thread's stack every 10 ms, holding the GIL while it does; in
    workers that run a model on all their cores that costs throughput (ViT-B-32 fp32 on 2 cores:
    embed at 0.84 of the model's own speed with it, 0.88 without). Used by the clusters this
    package starts unless ``imgcurator.cluster.worker-profile`` is true; a user's cluster is left alone.

    dask's own switch, ``distributed.worker.profile.enabled``, is read by each worker process from
    its config: nannies overwrite it with the client's config, SLURM jobs never see the client's,
    so a plugin (which also reaches workers added later by ``adapt``) is the one way that works for
    every cluster kind here.
    """

    name = "imgcurator-stop-worker-profiler"

    def setup(self, worker) -> None:
        for name in ("profile", "profile-cycle"):
            callback = worker.periodic_callbacks.pop(name, None)
            if callback is not None:
                callback.stop()


class QuietTaskFailures(WorkerPlugin):
    """Drop each worker's "Compute Failed" log record (the task, its exception and traceback).

    For clients that report a failed task's exception themselves, as the CLI does in one line:
    the worker's copy of it was a screenful of repr'd traceback before that line.
    """

    name = "imgcurator-quiet-task-failures"

    def setup(self, worker) -> None:
        logging.getLogger("distributed.worker").addFilter(_not_compute_failed)


def _not_compute_failed(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Compute Failed")


def _worker_plugins(torch_threads: int) -> list[WorkerPlugin]:
    """The plugins every cluster started here gets."""
    plugins: list[WorkerPlugin] = [TorchThreads(torch_threads)]
    if not config.get("cluster.worker-profile"):
        plugins.append(StopWorkerProfiler())
    return plugins


class PinGpu(WorkerPlugin):
    """Give each worker process one GPU: the ``i``-th visible one, ``i`` from the worker's name.

    For several worker processes sharing the GPUs of one machine or job without dask-cuda
    (``dask worker --nworkers N`` names them ``NAME-0`` .. ``NAME-{N-1}``; a ``LocalCluster``
    names them ``0`` .. ``N-1``). Sets ``CUDA_VISIBLE_DEVICES`` before the worker initialises
    CUDA; a worker that already did keeps its devices (with a warning).
    """

    name = "imgcurator-pin-gpu"
    idempotent = False

    def setup(self, worker) -> None:
        index = worker_index(worker.name)
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if not visible:
            visible = [str(i) for i in range(max(1, gpu_count()))]
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            warnings.warn(f"worker {worker.name}: CUDA already initialised, cannot pin it to one GPU")
            return
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[index % len(visible)]


def worker_index(name: Any) -> int:
    """Position of a worker among its siblings: ``3`` → 3, ``"job-7-1"`` → 1, other names → 0."""
    if isinstance(name, int):
        return name
    match = re.search(r"(\d+)$", str(name))
    return int(match.group(1)) if match else 0


def torch_threads_for(n_workers: int, cores: int | None = None) -> int:
    """Torch threads per worker so that workers × threads ≈ cores (at least 1)."""
    cores = cores or _usable_cores()
    return max(1, cores // max(1, n_workers))


def cpu_workers_for(cores: int | None = None, memory: int | None = None,
                    memory_per_worker: int | str | None = None, at_most: int | None = None) -> int:
    """Worker processes for a CPU cluster: one per core where memory allows, else fewer.

    One single-threaded worker per core encoded 7-13% more images/s than one worker per two
    cores (2-core EPYC, ViT-B-32 fp32, ``benchmarks/README.md``), but each worker holds its
    own model. So the count is the largest divisor of ``cores`` (every worker then gets the
    same number of torch threads) that leaves each worker ``memory_per_worker``.

    Parameters
    ----------
    cores : int, optional
        Cores to divide; default the cores this process may run on.
    memory : int, optional
        Bytes of memory for all workers; default dask's ``distributed.system.MEMORY_LIMIT``
        (the machine's memory, or its cgroup's limit).
    memory_per_worker : int or str, optional
        What one worker needs (``"6GiB"``); default ``imgcurator.local.memory-per-worker``.
    at_most : int, optional
        A further cap, e.g. the number of partitions (still a divisor of the cores).

    Returns
    -------
    int
        At least 1.

    Examples
    --------
    >>> cpu_workers_for(cores=2, memory=24 * 2**30, memory_per_worker="6GiB")
    2
    >>> cpu_workers_for(cores=16, memory=64 * 2**30, memory_per_worker="6GiB")   # 10 would fit: 8 x 2
    8
    >>> cpu_workers_for(cores=4, memory=8 * 2**30, memory_per_worker="6GiB")
    1
    >>> cpu_workers_for(cores=8, memory=64 * 2**30, memory_per_worker="6GiB", at_most=3)   # 3 shards: 2 x 4
    2
    """
    from dask.utils import parse_bytes

    cores = max(1, int(cores or _usable_cores()))
    if memory is None:
        from distributed.system import MEMORY_LIMIT

        memory = MEMORY_LIMIT
    need = config.get("local.memory-per-worker", memory_per_worker)
    need = parse_bytes(need) if isinstance(need, str) else int(need or 0)
    fits = cores if need <= 0 else max(1, int(memory) // need)
    if at_most is not None:
        fits = min(fits, max(1, int(at_most)))
    return max(d for d in range(1, cores + 1) if cores % d == 0 and d <= fits)


def _register_plugins(cluster, plugins: list[WorkerPlugin]) -> None:
    """Register worker plugins on the cluster's scheduler: running and future workers get them."""
    with Client(cluster, set_as_default=False) as client:
        for plugin in plugins:
            client.register_plugin(plugin)


def _closing_on_error(cluster, plugins: list[WorkerPlugin]):
    try:
        _register_plugins(cluster, plugins)
    except BaseException:
        cluster.close()
        raise
    return cluster


# ----------------------------------------------------------------------------- dask's housekeeping


def housekeeping_settings() -> dict[str, Any]:
    """The dask settings that clusters started here get: ``imgcurator.cluster.dask-config``, nulls dropped.

    dask's periodic housekeeping (event-loop tick, system monitor, memory checks, work stealing)
    costs ~100 CPU-ms per second at its default intervals across scheduler, nanny and worker (2-core
    machine, one worker), CPU that a model using every core has to give up; the package's values
    bring it to ~18.

    >>> housekeeping_settings()["distributed.admin.tick.interval"]
    '500ms'
    """
    configured = config.get("cluster.dask-config") or {}
    return {key: value for key, value in config.flatten(configured) if value is not None}


@contextlib.contextmanager
def _housekeeping() -> Iterator[None]:
    """Apply :func:`housekeeping_settings` while a cluster starts: its scheduler and nannies read
    them then, and nannies hand their config to the worker processes they spawn."""
    with dask.config.set(housekeeping_settings()):
        yield


def _housekeeping_exports(settings: dict[str, Any]) -> list[str]:
    """Shell lines that give the dask processes a job script starts these settings (DASK_A__B=value)."""
    return [
        f"export DASK_{key.replace('.', '__').replace('-', '_').upper()}={shlex.quote(str(value))}"
        for key, value in settings.items()
    ]


# ----------------------------------------------------------------------------- local


def make_cluster(kind: str | None = None, **kwargs: Any):
    """A new cluster of the given kind (default: ``imgcurator.cluster.kind``).

    ``auto``: :func:`local_cluster` with GPUs when present; ``local``: CPU workers only;
    ``cuda``: one worker per GPU (needs GPUs and dask-cuda); ``slurm``: :func:`slurm_cluster`.
    Keyword arguments go to that function.
    """
    kind = config.get("cluster.kind", kind)
    if kind not in CLUSTER_KINDS:
        raise ValueError(f"unknown cluster kind {kind!r}; choose one of {', '.join(CLUSTER_KINDS)}")
    if kind == "slurm":
        return slurm_cluster(**kwargs)
    return local_cluster(gpu={"auto": None, "local": False, "cuda": True}[kind], **kwargs)


def local_cluster(
    n_workers: int | None = None,
    *,
    gpu: bool | None = None,
    threads_per_worker: int | None = None,
    torch_threads: int | None = None,
    memory_limit: str | float | int | None = None,
    local_directory: str | None = None,
    dashboard_address: str | None = None,
    max_workers: int | None = None,
    **kwargs: Any,
):
    """A cluster on this machine suited to model inference.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes. Default: one per GPU with GPUs, else one per core where each gets
        ``imgcurator.local.memory-per-worker`` of memory, fewer otherwise (see
        :func:`cpu_workers_for`; ``imgcurator.local.n-workers`` / ``imgcurator.cuda.n-workers``).
    gpu : bool, optional
        ``None`` (default): GPU workers when NVML sees GPUs. ``True``: require them (and
        dask-cuda). ``False``: CPU workers only; GPUs are hidden from them.
    threads_per_worker : int, optional
        Task threads per worker (default 1: torch uses the cores, see ``torch_threads``).
    torch_threads : int, optional
        Torch threads per worker; default the cores divided among workers and their threads.
    memory_limit, local_directory : optional
        Per-worker memory limit and scratch directory.
    dashboard_address : str, optional
        ``":8787"``, ``":0"`` (any free port) ...; default ``imgcurator.cluster.dashboard-address``.
    max_workers : int, optional
        At most this many CPU workers when their number is left to the default, e.g. the number
        of partitions to process: a worker without a partition would only hold a model, so the
        fewer workers get more torch threads each instead. Ignored for GPU workers.
    **kwargs
        Passed to ``LocalCluster`` / ``LocalCUDACluster`` (for the latter, e.g.
        ``rmm_pool_size``, ``rmm_maximum_pool_size``, ``protocol``).

    Returns
    -------
    distributed.SpecCluster
        Use it as a context manager, or close it.
    """
    dashboard_address = config.get("cluster.dashboard-address", dashboard_address)
    gpus = 0 if gpu is False else gpu_count()
    if gpu and not gpus:
        raise ValueError("no GPU is visible (NVML found none, or CUDA_VISIBLE_DEVICES hides them); use --cluster local")
    if gpus:
        try:
            import dask_cuda  # noqa: F401
        except ImportError:
            if gpu:
                raise ValueError(
                    "the cuda cluster needs dask-cuda: pip install dask-cuda (or the project's [gpu] extra)"
                ) from None
            warnings.warn(
                f"{gpus} GPU(s) visible but dask-cuda is not installed: starting one plain worker per GPU"
                " (no RMM pool, no CPU affinity); pip install dask-cuda for LocalCUDACluster",
                stacklevel=2,
            )
            return _cpu_cluster(
                n_workers or gpus, config.get("cuda.threads-per-worker", threads_per_worker), torch_threads,
                memory_limit, local_directory, dashboard_address, pin_gpus=True, **kwargs,
            )
        return _cuda_cluster(
            n_workers, threads_per_worker, torch_threads, memory_limit, local_directory, dashboard_address,
            **kwargs,
        )
    return _cpu_cluster(
        n_workers, threads_per_worker, torch_threads, memory_limit, local_directory, dashboard_address,
        hide_gpus=gpu is False, max_workers=max_workers, **kwargs,
    )


def _cpu_cluster(
    n_workers, threads_per_worker, torch_threads, memory_limit, local_directory, dashboard_address,
    *, pin_gpus: bool = False, hide_gpus: bool = False, max_workers: int | None = None, **kwargs,
):
    """A LocalCluster of worker processes with torch threads set in each."""
    s = config.section(
        "local", n_workers=n_workers, threads_per_worker=threads_per_worker, memory_limit=memory_limit,
        local_directory=local_directory,
    )
    workers = s["n_workers"] or cpu_workers_for(at_most=max_workers)
    threads = int(s["threads_per_worker"] or 1)
    torch_threads = config.get("cluster.torch-threads", torch_threads) or torch_threads_for(workers * threads)
    if hide_gpus:
        env = dict(kwargs.pop("env", None) or {})
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
        kwargs["env"] = env
    if s["local_directory"]:
        kwargs.setdefault("local_directory", s["local_directory"])
    with _housekeeping():
        kwargs.setdefault("processes", True)
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=threads, memory_limit=s["memory_limit"],
            dashboard_address=dashboard_address, **kwargs,
        )
    plugins = _worker_plugins(torch_threads)
    if pin_gpus:
        plugins.append(PinGpu())
    return _closing_on_error(cluster, plugins)


def _cuda_cluster(
    n_workers, threads_per_worker, torch_threads, memory_limit, local_directory, dashboard_address, **kwargs,
):
    """A LocalCUDACluster: one worker per GPU, RMM pool shared with torch."""
    from dask_cuda import LocalCUDACluster

    s = config.section(
        "cuda", n_workers=n_workers, threads_per_worker=threads_per_worker, memory_limit=memory_limit,
        local_directory=local_directory,
    )
    options: dict[str, Any] = {
        "threads_per_worker": int(s["threads_per_worker"] or 1),
        "memory_limit": s["memory_limit"],
        "dashboard_address": dashboard_address,
    }
    for key, value in (("n_workers", s["n_workers"]), ("local_directory", s["local_directory"]),
                       ("protocol", s["protocol"]), ("rmm_pool_size", s["rmm_pool_size"]),
                       ("rmm_maximum_pool_size", s["rmm_maximum_pool_size"])):
        if value is not None:
            options[key] = value
    if s["rmm_external_libs"] and s["rmm_pool_size"] is not None:
        options["rmm_allocator_external_lib_list"] = list(s["rmm_external_libs"])
    options.update(kwargs)
    if options.get("rmm_pool_size") is not None or options.get("rmm_managed_memory") or options.get("rmm_async"):
        try:
            import rmm  # noqa: F401
        except ImportError:
            warnings.warn("RMM (rmm-cu12) is not installed: GPU workers start without an RMM pool", stacklevel=3)
            for key in ("rmm_pool_size", "rmm_maximum_pool_size", "rmm_allocator_external_lib_list"):
                options.pop(key, None)
    workers = options.get("n_workers") or gpu_count()
    torch_threads = config.get("cluster.torch-threads", torch_threads) or torch_threads_for(
        workers * options["threads_per_worker"]
    )
    with _housekeeping():
        cluster = LocalCUDACluster(**options)
    return _closing_on_error(cluster, _worker_plugins(torch_threads))


# ----------------------------------------------------------------------------- SLURM


def slurm_cluster(
    *,
    jobs: int | None = None,
    adapt: bool | None = None,
    minimum_jobs: int | None = None,
    maximum_jobs: int | None = None,
    queue: str | None = None,
    account: str | None = None,
    cores: int | None = None,
    processes: int | None = None,
    threads_per_worker: int | None = None,
    torch_threads: int | None = None,
    memory: str | None = None,
    gpus: int | None = None,
    walltime: str | None = None,
    job_name: str | None = None,
    job_script_prologue: list[str] | None = None,
    job_extra_directives: list[str] | None = None,
    job_directives_skip: list[str] | None = None,
    local_directory: str | None = None,
    log_directory: str | None = None,
    python: str | None = None,
    interface: str | None = None,
    scheduler_options: dict[str, Any] | None = None,
    worker_extra_args: list[str] | None = None,
    death_timeout: float | None = None,
    dashboard_address: str | None = None,
    **jobqueue_kwargs: Any,
):
    """Dask workers in SLURM jobs: ``dask_jobqueue.SLURMCluster`` with this project's defaults.

    Every argument defaults to ``imgcurator.slurm.<name>`` in dask's config (``imgcurator.yaml``;
    environment variables ``DASK_IMGCURATOR__SLURM__<NAME>``). The scheduler runs in this
    process; each job runs ``processes`` worker processes with ``threads_per_worker`` task
    threads and ``torch_threads`` torch threads each.

    Parameters
    ----------
    jobs : int, optional
        Jobs to submit now (``cluster.scale(jobs=N)``); ignored with ``adapt``. 0 submits none.
    adapt, minimum_jobs, maximum_jobs : optional
        Let dask adapt the number of jobs to the work (``cluster.adapt(minimum_jobs=...,
        maximum_jobs=...)``).
    queue, account : str, optional
        Partition (``#SBATCH -p``) and account (``-A``).
    cores, memory : optional
        CPUs (``--cpus-per-task``) and memory (``--mem``) per job.
    processes : int, optional
        Worker processes per job; default one per GPU, 1 without GPUs.
    threads_per_worker, torch_threads : int, optional
        Task threads per worker (default 1) and torch threads per worker (default: the job's
        cores divided among its task threads).
    gpus : int, optional
        GPUs per job: adds ``#SBATCH --gres=gpu:N``; each worker process is pinned to one.
    walltime : str, optional
        ``#SBATCH -t``, e.g. ``"02:00:00"``.
    job_name, job_script_prologue, job_extra_directives, job_directives_skip : optional
        Job name; shell lines run before the workers (``module load ...``, ``source
        venv/bin/activate``); more ``#SBATCH`` options; generated ``#SBATCH`` lines to drop.
    local_directory : str, optional
        Worker scratch on the node (default ``${TMPDIR:-/tmp}``, expanded in the job).
    log_directory, python, interface, death_timeout, worker_extra_args : optional
        As in ``SLURMCluster``.
    scheduler_options : dict, optional
        Options of the scheduler in this process (``{"host": "10.0.0.5"}``,
        ``{"interface": "ib0"}``).
    dashboard_address : str, optional
        Default ``imgcurator.cluster.dashboard-address``.
    **jobqueue_kwargs
        Anything else ``SLURMCluster`` accepts.

    Returns
    -------
    dask_jobqueue.SLURMCluster
        ``cluster.job_script()`` shows the job it submits; close the cluster to cancel the jobs.

    Raises
    ------
    FileNotFoundError
        When ``sbatch`` is not on PATH (not a node of a SLURM cluster).
    ValueError
        When dask-jobqueue is not installed.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ValueError(
            "the slurm cluster needs dask-jobqueue: pip install dask-jobqueue (or the project's [slurm] extra)"
        ) from None
    submit = shlex.split(SLURMCluster.job_cls.submit_command)[0]
    if shutil.which(submit) is None:  # else a traceback from the first job's submission, and a run that waits forever
        raise FileNotFoundError(
            f"the slurm cluster submits its worker jobs with {submit}, which is not on PATH: run on a node of the SLURM "
            "cluster (a login node), or use another cluster (--cluster local, or --scheduler ADDRESS)"
        )
    s = config.section(
        "slurm", queue=queue, account=account, cores=cores, processes=processes,
        threads_per_worker=threads_per_worker, memory=memory, gpus=gpus, walltime=walltime, job_name=job_name,
        job_script_prologue=job_script_prologue, job_extra_directives=job_extra_directives,
        job_directives_skip=job_directives_skip, local_directory=local_directory, log_directory=log_directory,
        python=python, interface=interface, scheduler_options=scheduler_options,
        worker_extra_args=worker_extra_args, death_timeout=death_timeout, jobs=jobs, adapt=adapt,
        minimum_jobs=minimum_jobs, maximum_jobs=maximum_jobs,
    )
    options = slurm_options(s, torch_threads=torch_threads, dashboard_address=dashboard_address)
    plugins = _worker_plugins(options.pop("torch_threads"))
    if options.pop("pin_gpus"):
        plugins.append(PinGpu())
    options.update(jobqueue_kwargs)
    with _housekeeping():  # the scheduler, here; the workers get the same settings from the job script
        cluster = SLURMCluster(**options)
    try:
        _register_plugins(cluster, plugins)
        if s["adapt"]:
            cluster.adapt(minimum_jobs=int(s["minimum_jobs"] or 0), maximum_jobs=int(s["maximum_jobs"]))
        elif s["jobs"]:
            cluster.scale(jobs=int(s["jobs"]))
    except BaseException:
        cluster.close()
        raise
    return cluster


def slurm_options(
    s: dict[str, Any], *, torch_threads: int | None = None, dashboard_address: str | None = None,
) -> dict[str, Any]:
    """``SLURMCluster`` keyword arguments from ``imgcurator.slurm`` settings (see :func:`config.section`).

    Also returns ``torch_threads`` and ``pin_gpus`` for the worker plugins.
    """
    gpus = int(s["gpus"] or 0)
    cores = int(s["cores"])
    processes = int(s["processes"] or max(1, gpus))
    threads = int(s["threads_per_worker"] or 1)
    if gpus < 0 or processes < 1 or threads < 1:
        raise ValueError(f"gpus ({gpus}) must be >= 0, processes ({processes}) and threads per worker ({threads}) >= 1")
    if processes * threads > cores:
        raise ValueError(
            f"{processes} worker processes x {threads} threads need more than the job's {cores} cores; raise cores"
        )
    extra = list(s["job_extra_directives"] or [])
    if gpus and not any(d.lstrip("-").startswith(("gres", "gpus", "G ")) for d in extra):
        extra.append(f"--gres=gpu:{gpus}")
    worker_args = [str(a) for a in (s["worker_extra_args"] or [])]
    if threads != cores // processes and "--nthreads" not in worker_args:
        worker_args += ["--nthreads", str(threads)]  # after jobqueue's own --nthreads: the last one counts
    scheduler_options = dict(s["scheduler_options"] or {})
    scheduler_options.setdefault("dashboard_address", config.get("cluster.dashboard-address", dashboard_address))
    options: dict[str, Any] = {
        "cores": cores,
        "processes": processes,
        "memory": s["memory"],
        "walltime": s["walltime"],
        "job_name": s["job_name"],
        # dask's housekeeping settings first, so that the user's own lines can still change them
        "job_script_prologue": _housekeeping_exports(housekeeping_settings()) + list(s["job_script_prologue"] or []),
        "job_extra_directives": extra,
        "job_directives_skip": list(s["job_directives_skip"] or []),
        "local_directory": s["local_directory"],
        "log_directory": s["log_directory"],
        "worker_extra_args": worker_args,
        "death_timeout": s["death_timeout"],
        "scheduler_options": scheduler_options,
    }
    for key in ("queue", "account", "python", "interface"):
        if s[key] is not None:
            options[key] = s[key]
    options["torch_threads"] = int(
        config.get("cluster.torch-threads", torch_threads) or max(1, cores // (processes * threads))
    )
    options["pin_gpus"] = gpus > 0 and processes > 1
    return options
