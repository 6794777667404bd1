"""The files a collection reads: what ``read_webdataset`` and ``read_parquet`` put in its graph.

Both read through ``dd.from_map`` with a function marked by :func:`versioned_reader`, whose first
two arguments per partition are a file's URL and its version (see
:func:`~dask_imgcurator.io.shards.shard_version`). Writers look them up in the collection's
expression, so that an output directory is never cleared of the very files a run reads.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import dask.dataframe as dd
from fsspec.core import url_to_fs

from dask_imgcurator.io.shards import ShardError, reading, shard_version

F = TypeVar("F", bound=Callable)

_MARK = "_imgcurator_reads_versioned_files"


def versioned_reader(func: F) -> F:
    """Mark ``func`` as a ``from_map`` reader of ``(url, version, ...)``, found by :func:`input_files`."""
    setattr(func, _MARK, True)
    return func


def input_files(ddf: dd.DataFrame) -> dict[str, str]:
    """``{url: version}`` of the files ``ddf`` reads through this package's readers.

    Empty where the collection does not show them (a persisted frame, a frame made by other
    readers, or a dask whose expressions differ).
    """
    try:
        from dask.dataframe.dask_expr.io.io import FromMap

        expressions = list(ddf.expr.walk())
    except (ImportError, AttributeError):
        return {}
    found: dict[str, str] = {}
    for expr in expressions:
        if isinstance(expr, FromMap) and getattr(expr.operand("func"), _MARK, False):
            urls, versions = expr.operand("iterables")[:2]
            found.update(zip(urls, versions))
    return found


def check_unchanged(url: str, version: str) -> None:
    """Raise ``ShardError`` when the file ``url`` no longer has ``version`` (it was replaced since)."""
    fs, path = url_to_fs(url)
    with reading(url):
        now = shard_version(fs.info(path))
    if now != version:
        raise ShardError(
            f"{url} changed while this run was going (planned with {version}, now {now}); its samples "
            "would mix two inputs. Run the command again (the output of the changed inputs is another "
            "run: pass --overwrite / overwrite=True to replace this one)"
        )
