"""Column names and dtypes of the per-sample dataframe (see DESIGN.md, data model)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

STRING = pd.StringDtype("pyarrow")

#: Columns produced by ``read_webdataset``.
INDEX_COLUMNS: dict[str, object] = {
    "key": STRING,
    "shard": STRING,
    "image_member": STRING,
    "image_offset": pd.Int64Dtype(),
    "image_nbytes": pd.Int64Dtype(),
    "caption": STRING,
    "json": STRING,
    "members": STRING,  # JSON list of [name, payload offset, size] for every member of the sample
    "error": STRING,
}

#: Columns that describe where a sample's bytes live (rewritten when samples move to a new shard).
LOCATION_COLUMNS = ("shard", "image_offset", "members")


def embedding_dtype(dim: int) -> pd.ArrowDtype:
    """Arrow fixed-size list of float32: one contiguous buffer for a whole column of embeddings."""
    return pd.ArrowDtype(pa.list_(pa.float32(), dim))


def embedding_series(matrix: np.ndarray, index: pd.Index, valid: np.ndarray | None = None) -> pd.Series:
    """Wrap an (N, D) float32 matrix as an embedding column without per-row Python objects.

    Rows where ``valid`` is False become nulls.
    """
    n, dim = matrix.shape
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    arr = pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)
    return pd.Series(pd.arrays.ArrowExtensionArray(arr), index=index)


def embedding_matrix(column: pd.Series) -> np.ndarray:
    """The (N, D) float32 matrix behind an embedding column (zero rows where the value is null)."""
    arr = pa.array(column.array) if not hasattr(column.array, "_pa_array") else column.array._pa_array
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not pa.types.is_fixed_size_list(arr.type):
        arr = arr.cast(pa.list_(pa.float32(), _list_width(arr)))
    dim = arr.type.list_size
    arr = arr.fill_null(pa.scalar([0.0] * dim, type=arr.type)) if arr.null_count else arr
    values = arr.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values[arr.offset * dim : (arr.offset + len(arr)) * dim].reshape(len(arr), dim)


def _list_width(arr: pa.Array) -> int:
    lengths = pa.compute.list_value_length(arr).drop_null()
    widths = set(lengths.to_pylist())
    if len(widths) > 1:
        raise ValueError(f"embedding column mixes widths {sorted(widths)}")
    return widths.pop() if widths else 0


def empty_frame(columns: dict[str, object]) -> pd.DataFrame:
    """A zero-row frame with these columns and dtypes (used as dask ``meta``)."""
    return pd.DataFrame({name: pd.Series([], dtype=dtype) for name, dtype in columns.items()})
