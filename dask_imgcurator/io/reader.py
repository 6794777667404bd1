"""``read_webdataset``: tar shards → a lazy Dask DataFrame, one partition per shard."""
from __future__ import annotations

import json
import os
from typing import Sequence

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

from dask_imgcurator.io.shards import (
    DEFAULT_IMAGE_EXTENSIONS,
    MAX_TEXT_BYTES,
    expand_shards_versions,
    group_samples,
    image_member,
    read_ranges,
    scan_members,
)
from dask_imgcurator.io.sources import check_unchanged, versioned_reader
from dask_imgcurator.schema import INDEX_COLUMNS, empty_frame

__all__ = ["read_webdataset", "read_shard", "shard_error_rows"]


def read_shard(url: str, image_extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS, *,
               version: str | None = None) -> pd.DataFrame:
    """Index one shard into a pandas frame with the columns of :data:`INDEX_COLUMNS`.

    A shard that is not a tar, or is truncated, yields rows for the samples that could be read
    plus one row with an empty key and the shard error; it never raises for bad content.
    With ``version`` (its :func:`~dask_imgcurator.io.shards.shard_version` when the run was
    planned), a shard replaced since raises ``ShardError``: its samples would mix two inputs.
    """
    if version is not None:
        check_unchanged(url, version)
    members, refused, shard_error = scan_members(url)
    samples = group_samples(members, refused, image_extensions)
    cut_member_known = any(reason.startswith("truncated tar") for _, reason in refused)
    if shard_error and not cut_member_known and samples and samples[-1].error is None:
        samples[-1].error = "the shard ends in a broken entry after this sample; it may be missing members"
    rows = []
    text_ranges: list[tuple[int, int]] = []
    text_slots: list[tuple[int, str]] = []
    for i, sample in enumerate(samples):
        image = image_member(sample, image_extensions)
        rows.append(
            {
                "key": sample.key,
                "shard": url,
                "image_member": image.name if image else None,
                "image_offset": image.offset if image else None,
                "image_nbytes": image.size if image else None,
                "caption": None,
                "json": None,
                "members": json.dumps([[m.name, m.offset, m.size] for m in sample.members]),
                "error": sample.error,
            }
        )
        for column, ext in (("caption", "txt"), ("json", "json")):
            m = sample.member(ext)
            if m is not None and m.size <= MAX_TEXT_BYTES:
                text_ranges.append((m.offset, m.size))
                text_slots.append((i, column))
    for (i, column), data in zip(text_slots, read_ranges(url, text_ranges)):
        rows[i][column] = data.decode("utf-8", errors="replace")
    if shard_error:
        rows.append({**dict.fromkeys(INDEX_COLUMNS), "key": "", "shard": url, "members": "[]", "error": shard_error})
    return empty_frame(INDEX_COLUMNS) if not rows else pd.DataFrame(rows).astype(INDEX_COLUMNS)


def shard_error_rows(key, members=None) -> np.ndarray:
    """Which rows stand for a shard that could not be read (whole or in part), not for a sample: an
    empty key and no members (a sample can have an empty key, from members named ``.jpg``, but has
    members). Without ``members`` (a frame that dropped the column) the empty key alone tells."""
    rows = (pd.Series(key, dtype=object) == "").to_numpy(dtype=bool)
    if members is not None:
        listed = pd.Series(members, dtype=object)
        rows = rows & (listed.isna() | (listed == "[]")).to_numpy(dtype=bool)
    return rows


@versioned_reader
def _read_shard_version(url: str, version: str, image_extensions: Sequence[str]) -> pd.DataFrame:
    return read_shard(url, image_extensions, version=version)


def read_webdataset(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image_extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS,
) -> dd.DataFrame:
    """Read WebDataset tar shards as a lazy Dask DataFrame with one partition per shard.

    Only tar headers and the small ``.txt``/``.json`` members are read; image bytes stay in the
    tars and are located by ``shard``, ``image_offset`` and ``image_nbytes``. Each shard's size and
    modification time (or ETag) are taken from the listing when the frame is made: they identify
    the frame (and so a run that writes it), and a shard that changes before it is read raises
    ``ShardError`` naming it.

    Parameters
    ----------
    shards : str, path-like, or a sequence of them
        Paths or fsspec URLs: a file, a directory of ``.tar`` files, a glob, a brace range such
        as ``data/shard-{00000..00099}.tar``, or a list of these.
    image_extensions : sequence of str
        Member extensions that count as the sample's image, in order of preference.

    Returns
    -------
    dask.dataframe.DataFrame
        Columns ``key, shard, image_member, image_offset, image_nbytes, caption, json, members,
        error``; partitions are pandas frames, or cuDF frames when dask's ``dataframe.backend``
        config is ``"cudf"``. Samples that cannot be used (no image, duplicate key, unsafe member
        name, shard truncated) keep a row with ``error`` set.

    Examples
    --------
    >>> import dask_imgcurator as ic
    >>> shards = ic.make_demo_shards("memory://doc-demo", n_shards=2, samples_per_shard=3)
    >>> ddf = ic.read_webdataset("memory://doc-demo/*.tar")
    >>> ddf.npartitions, len(ddf)
    (2, 6)
    """
    # each shard's version (size, mtime or ETag) goes into the graph, and so into a run's
    # fingerprint: inputs replaced at the same paths are another run, not a resume of this one
    urls, versions = zip(*expand_shards_versions(shards))
    exts = tuple(e.lower().lstrip(".") for e in image_extensions)
    ddf = dd.from_map(
        _read_shard_version,
        list(urls),
        list(versions),
        image_extensions=exts,
        meta=empty_frame(INDEX_COLUMNS),
        label="read-webdataset",
        enforce_metadata=False,
    )
    backend = dask.config.get("dataframe.backend", "pandas")
    return ddf if backend == "pandas" else ddf.to_backend(backend)
