"""Parquet metadata written by this package (or by ``to_parquet`` on its frames), read back lazily."""
from __future__ import annotations

import dask.dataframe as dd
import pandas as pd
import pyarrow as pa

__all__ = ["read_parquet", "arrow_types_mapper"]


def arrow_types_mapper(arrow_type: pa.DataType):
    """pandas dtypes for Arrow types: Arrow-backed strings and lists (embeddings), defaults otherwise."""
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return pd.StringDtype("pyarrow")
    if pa.types.is_fixed_size_list(arrow_type) or pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return pd.ArrowDtype(arrow_type)
    return None


def read_parquet(path: str, **kwargs) -> dd.DataFrame:
    """Read curation metadata (e.g. ``OUT/metadata`` or a shard's ``NNNNN.parquet``) as a dask DataFrame.

    Unlike a plain ``dd.read_parquet``, embeddings come back as one Arrow fixed-size-list column
    (pandas cannot rebuild that dtype from its own Parquet metadata).

    Parameters
    ----------
    path : str
        File, directory or glob; local or fsspec URL.
    **kwargs
        Passed to :func:`dask.dataframe.read_parquet`.

    Examples
    --------
    >>> import dask_imgcurator as ic, pandas as pd
    >>> pd.DataFrame({"key": ["a"], "aesthetic_score": [5.5]}).to_parquet("memory://doc.parquet")
    >>> ic.read_parquet("memory://doc.parquet").compute()["key"].tolist()
    ['a']
    """
    options = {"ignore_metadata": True, "types_mapper": arrow_types_mapper, **kwargs.pop("arrow_to_pandas", {})}
    return dd.read_parquet(path, arrow_to_pandas=options, **kwargs)
