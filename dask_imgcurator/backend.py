"""Dataframe backend dispatch (pandas on CPU, cuDF on GPU) and device discovery without CUDA init."""
from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa
from dask.utils import Dispatch

#: Partition → pyarrow Table (the writer's common currency).
to_arrow = Dispatch("to_arrow")
#: Partition → pandas DataFrame (for code that must see host data, e.g. byte offsets).
to_pandas = Dispatch("to_pandas")


@to_arrow.register(pd.DataFrame)
def _pandas_to_arrow(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(df, preserve_index=False)


@to_pandas.register(pd.DataFrame)
def _pandas_to_pandas(df: pd.DataFrame) -> pd.DataFrame:
    return df


@to_arrow.register_lazy("cudf")
@to_pandas.register_lazy("cudf")
def _register_cudf():
    import cudf

    @to_arrow.register(cudf.DataFrame)
    def _cudf_to_arrow(df):
        return df.to_arrow(preserve_index=False)

    @to_pandas.register(cudf.DataFrame)
    def _cudf_to_pandas(df):
        return df.to_pandas()


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
