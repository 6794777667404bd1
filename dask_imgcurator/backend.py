"""Dataframe backend dispatch (pandas on CPU, cuDF on GPU) and device discovery without CUDA init."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import pandas as pd
import pyarrow as pa
from dask.utils import Dispatch

#: Partition → pyarrow Table (the writer's common currency).
to_arrow = Dispatch("to_arrow")
#: Partition → pandas DataFrame (for code that must see host data, e.g. byte offsets).
to_pandas = Dispatch("to_pandas")
#: ``from_pandas_like(like, pdf)``: pandas result → the backend of the input partition ``like``.
from_pandas_like = Dispatch("from_pandas_like")


@to_arrow.register(pd.DataFrame)
def _pandas_to_arrow(df: pd.DataFrame) -> pa.Table:
    return _readable_list_metadata(pa.Table.from_pandas(df, preserve_index=False))


def _readable_list_metadata(table: pa.Table) -> pa.Table:
    """Record Arrow list columns as ``object`` in the pandas metadata.

    pandas cannot rebuild ``fixed_size_list<...>[D][pyarrow]`` from its own metadata string, so
    a plain ``pd.read_parquet`` of the file would fail; with ``object`` it reads the embeddings
    as arrays per row (``dtype_backend="pyarrow"`` still gives the Arrow column).
    """
    raw = (table.schema.metadata or {}).get(b"pandas")
    if raw is None:
        return table
    meta = json.loads(raw)
    for column in meta.get("columns", []):
        numpy_type = str(column.get("numpy_type", ""))
        if "list<" in numpy_type:
            column["numpy_type"] = "object"
    return table.replace_schema_metadata({**table.schema.metadata, b"pandas": json.dumps(meta).encode()})


@to_pandas.register(pd.DataFrame)
def _pandas_to_pandas(df: pd.DataFrame) -> pd.DataFrame:
    return df


@from_pandas_like.register(pd.DataFrame)
def _pandas_like(like: pd.DataFrame, pdf: pd.DataFrame) -> pd.DataFrame:
    return pdf


@to_arrow.register_lazy("cudf")
@to_pandas.register_lazy("cudf")
@from_pandas_like.register_lazy("cudf")
def _register_cudf():
    import cudf

    @to_arrow.register(cudf.DataFrame)
    def _cudf_to_arrow(df):
        return df.to_arrow(preserve_index=False)

    @to_pandas.register(cudf.DataFrame)
    def _cudf_to_pandas(df):
        return df.to_pandas()

    @from_pandas_like.register(cudf.DataFrame)
    def _cudf_like(like, pdf):
        return cudf.from_pandas(pdf)


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask: dask-cuda and SLURM pin workers to a subset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def gpu_count() -> int:
    """Number of visible NVIDIA GPUs, read through NVML so the calling process does not init CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU
        return 0
    if visible is not None:
        return min(count, len([v for v in visible.split(",") if v.strip()]))
    return count


def worker_device() -> str:
    """``"cuda"`` when this process may use a GPU, else ``"cpu"`` (called on workers only)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def current_worker() -> Any:
    """The ``distributed`` worker running the calling task, or None outside one."""
    if "distributed" not in sys.modules:  # never imported: cannot be inside a worker
        return None
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


#: Name of the worker plugin (``cluster.TorchThreads``) that says how many threads torch gets.
TORCH_THREADS_PLUGIN = "imgcurator-torch-threads"


def apply_torch_threads() -> None:
    """Give torch in the calling task thread the thread count a registered ``TorchThreads`` asks for.

    A thread keeps the count it had when it first ran torch (``OMP_NUM_THREADS=1`` in a nanny's
    workers), so a plugin registered after the worker's task threads ran torch does not reach
    them; stages that run torch call this first.
    """
    worker = current_worker()
    plugin = worker.plugins.get(TORCH_THREADS_PLUGIN) if worker is not None else None
    if plugin is not None:
        import torch

        if torch.get_num_threads() != plugin.threads:
            torch.set_num_threads(plugin.threads)
