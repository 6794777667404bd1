"""Parquet metadata written by this package (or by ``to_parquet`` on its frames), read back lazily."""
from __future__ import annotations

import os
import posixpath
from typing import Sequence

import dask.dataframe as dd
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from dask_imgcurator.io.shards import full_url, listed_version
from dask_imgcurator.io.sources import check_unchanged, versioned_reader

__all__ = ["read_parquet", "arrow_types_mapper"]


def arrow_types_mapper(arrow_type: pa.DataType):
    """pandas dtypes for Arrow types: Arrow-backed strings and lists (embeddings), defaults otherwise."""
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return pd.StringDtype("pyarrow")
    if pa.types.is_fixed_size_list(arrow_type) or pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return pd.ArrowDtype(arrow_type)
    if pa.types.is_integer(arrow_type):
        return pd.api.types.pandas_dtype(str(arrow_type).capitalize().replace("Uint", "UInt"))
    return None


def read_parquet(path: str | os.PathLike | Sequence[str | os.PathLike], columns: Sequence[str] | None = None) -> dd.DataFrame:
    """Read curation metadata (``OUT/metadata``, shard ``NNNNN.parquet`` files, or ``to_parquet`` output).

    One partition per file. Embeddings come back as one Arrow fixed-size-list column; pandas
    cannot rebuild that dtype from the metadata dask's ``to_parquet`` stores, so a plain
    ``dd.read_parquet`` of such files fails, while this reads the Arrow schema instead.

    Parameters
    ----------
    path : str, path-like, or a sequence of them
        A file, a directory (its ``*.parquet`` files, sorted), a glob, or a list; local or fsspec URLs.
        Each file's size and modification time (or ETag) are taken from the listing: they identify the
        frame, and a file that changes before it is read raises ``ShardError`` naming it.
        A curation run's output directory (``OUT``, holding ``metadata/`` and ``shards/``) reads
        ``OUT/metadata``, every input sample once; name ``OUT/shards`` for the kept samples' rows.
    columns : sequence of str, optional
        Read only these columns.

    Returns
    -------
    dask.dataframe.DataFrame

    Examples
    --------
    >>> import dask_imgcurator as ic, pandas as pd
    >>> pd.DataFrame({"key": ["a"], "aesthetic_score": [5.5]}).to_parquet("memory://doc.parquet")
    >>> ic.read_parquet("memory://doc.parquet").compute()["key"].tolist()
    ['a']
    """
    # each file's version (size, mtime or ETag) goes into the graph, and so into the fingerprint of a
    # run that reads it: metadata rewritten at the same paths makes another run, not a resume
    files, versions = zip(*_parquet_files(path))
    fs, first = url_to_fs(files[0])
    with fs.open(first, "rb") as f:
        schema = pq.read_schema(f)
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    meta = _to_pandas(schema.empty_table())
    return dd.from_map(_read_file, list(files), list(versions), columns=None if columns is None else list(columns),
                       meta=meta, label="read-parquet", enforce_metadata=False)


def _parquet_files(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
    """The Parquet files ``path`` names, each with its version, from one listing per item."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files: list[tuple[str, str]] = []
    for p in paths:
        fs, local = url_to_fs(os.fspath(p))
        if any(c in local for c in "*?[") and not fs.exists(local):  # an existing path is taken literally
            found = fs.glob(local, detail=True)
        elif fs.isdir(local):
            if all(fs.isdir(posixpath.join(local, d)) for d in ("metadata", "shards")):
                local = posixpath.join(local, "metadata")  # a run's output: OUT/shards/*.parquet repeat kept rows
            found = {f: info for f, info in fs.find(local, detail=True).items() if f.endswith(".parquet")}
        else:
            found = {local: fs.info(local)} if fs.exists(local) else {}
        if not found:
            raise FileNotFoundError(f"no Parquet files at {p}")
        files += [(full_url(fs, f), listed_version(fs, f, info)) for f, info in sorted(found.items())]
    return files


@versioned_reader
def _read_file(url: str, version: str, columns: list[str] | None) -> pd.DataFrame:
    check_unchanged(url, version)
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return _to_pandas(pq.read_table(f, columns=columns))


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(ignore_metadata=True, types_mapper=arrow_types_mapper)
