"""Clusters for the CLI and notebooks (library functions never create one)."""
from __future__ import annotations

import os

from distributed import LocalCluster, WorkerPlugin

from dask_imgcurator.backend import gpu_count

__all__ = ["local_cluster", "TorchThreads"]


class TorchThreads(WorkerPlugin):
    """Give each worker's torch a fixed thread count so workers do not oversubscribe cores."""

    name = "imgcurator-torch-threads"

    def __init__(self, threads: int):
        self.threads = threads

    def setup(self, worker) -> None:
        import torch

        torch.set_num_threads(self.threads)


def local_cluster(n_workers: int | None = None, *, dashboard_address: str | None = ":0", **kwargs):
    """A cluster on this machine suited to model inference.

    With GPUs (counted through NVML, without initialising CUDA here) and ``dask_cuda``
    installed: a ``LocalCUDACluster`` with one worker per GPU. Otherwise a ``LocalCluster`` of
    ``n_workers`` processes (default: one per two cores) with one task thread each; register
    :class:`TorchThreads` on the client to split the cores between the workers' torch.

    Returns
    -------
    distributed.SpecCluster
    """
    gpus = gpu_count()
    if gpus:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            pass
        else:
            return LocalCUDACluster(dashboard_address=dashboard_address, **kwargs)
    cores = os.cpu_count() or 1
    n_workers = n_workers or max(1, cores // 2)
    return LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=dashboard_address, **kwargs
    )


def torch_threads_for(n_workers: int) -> int:
    """Cores per worker for torch: workers × threads ≈ cores."""
    return max(1, (os.cpu_count() or 1) // max(1, n_workers))
