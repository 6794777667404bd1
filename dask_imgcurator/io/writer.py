"""Re-shard samples into new WebDataset tars of exact size: parallel, atomic, resumable.

Two phases, both made of dask tasks and both resumable:

1. *stage*: each input partition is computed once and saved as ``part-NNNNN.parquet``
   (metadata only: where member bytes live, scores, embeddings). A part that exists is skipped.
2. *shard*: the driver takes the row counts that the staging tasks return (tasks read them
   from Parquet footers, or the ``kept`` column, only for parts staged by an earlier run) and
   assigns global row ranges of ``samples_per_shard`` to output shards; one task per output
   shard copies the member bytes from the source tars into ``NNNNN.tar`` with ``NNNNN.parquet``
   and ``NNNNN.idx`` beside it. A shard whose files and progress record exist is skipped (found
   with two directory listings, not a request per shard).

On a distributed client the phases overlap (``stage_and_write``): a shard's task starts as soon
as the parts before its last row are staged, while later partitions are still being computed.

Every file appears under its final name by rename only, so a reader never sees a partial file.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from dask.base import tokenize
from fsspec.core import url_to_fs

from dask_imgcurator.backend import to_arrow
from dask_imgcurator.io.parquet import arrow_types_mapper
from dask_imgcurator.io.shards import (
    Member,
    ShardError,
    files_inside,
    files_matching,
    full_url,
    open_shard,
    reading,
    split_key,
    unsafe_member_reason,
    write_dali_index,
)
from dask_imgcurator.io.sources import input_files
from dask_imgcurator.progress import active_client, compute_in_order, progress_bar, run_tasks

__all__ = [
    "to_webdataset",
    "stage_partitions",
    "StagedParts",
    "write_shards",
    "stage_and_write",
    "shard_name",
    "claim_output",
    "finish_output",
    "WriteResult",
    "OutputExistsError",
]

MANIFEST = "manifest.json"
RUN_MARKER = "_run.json"
PROGRESS_DIR = "_progress"
STAGING_DIR = "_staging"
#: Rows per row group in staged parts, so that shard tasks can read just the rows they need.
STAGE_ROW_GROUP = 1024


class OutputExistsError(FileExistsError):
    """The output directory holds the results of a different run."""


@dataclass
class StagedParts:
    """Staged parts in partition order, and what their staging tasks returned.

    ``stats[i]`` is ``{"rows": ..., "kept": ..., "summary": ...}`` for a part this call staged
    (``kept`` counts rows whose ``kept`` column is true, or all rows without one; ``summary`` is
    what the ``summarise`` callable returned, else None) and None for a part that an earlier run
    staged, whose counts are read back from its file when needed.
    """

    paths: list[str]
    skipped: int
    stats: list[dict | None]

    def counts(self, only_kept: bool) -> list[int | None]:
        """Rows (or kept rows) per part, None where this call did not stage the part."""
        return [None if s is None else _rows_to_write(s, only_kept) for s in self.stats]


def _rows_to_write(stats: dict, only_kept: bool) -> int:
    return stats["kept" if only_kept else "rows"]


@dataclass
class WriteResult:
    """What a write produced: counts and the output shards (name, samples, bytes, sha256)."""

    out_dir: str
    samples: int
    shards: list[dict] = field(default_factory=list)
    shards_skipped: int = 0
    parts_skipped: int = 0

    def __str__(self) -> str:
        return (
            f"wrote {self.samples} samples into {len(self.shards)} shards in {self.out_dir}"
            f" ({self.shards_skipped} shards already complete)"
        )


# ----------------------------------------------------------------------------- public API


def to_webdataset(
    ddf: dd.DataFrame,
    out_dir: str,
    samples_per_shard: int = 10_000,
    *,
    rekey: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> WriteResult:
    """Write every row of ``ddf`` as WebDataset shards of exactly ``samples_per_shard`` samples.

    Rows keep their order; each sample carries all its members (image, txt, json, anything else)
    byte-identical. This computes ``ddf`` (once per partition) on the active dask client, or the
    local scheduler when there is none; on a client, output shards are written while later
    partitions are still being computed (see :func:`stage_and_write`).

    Parameters
    ----------
    ddf : dask.dataframe.DataFrame
        Rows as produced by :func:`read_webdataset` (optionally with more columns such as scores),
        usually filtered by a boolean mask.
    out_dir : str
        Local path or fsspec URL. Receives ``NNNNN.tar``, ``NNNNN.parquet`` (that shard's rows),
        ``NNNNN.idx`` (DALI index) and ``manifest.json``.
    samples_per_shard : int
        Samples per output shard; the last shard may be smaller.
    rekey : bool
        Rename samples ``{shard:05d}{index:0Nd}``; the old key is kept in column ``source_key``.
    overwrite : bool
        Replace the output of a different earlier run instead of refusing: only the files such a
        run writes are removed (its staged parts are kept where it computed the same rows), and a
        directory holding anything else, or the files ``ddf`` reads, is still refused.
    progress : bool
        Show progress bars.

    Returns
    -------
    WriteResult

    Raises
    ------
    OutputExistsError
        ``out_dir`` holds a different run and ``overwrite`` is False, or holds files that this
        tool did not write (whatever ``overwrite`` says: only an earlier run's output is replaced).
    ValueError
        ``samples_per_shard`` is below 1 (checked before anything is written), a row has an unsafe
        member name (absolute, ``..``) or no members at all, or two samples of one output shard
        share a key without ``rekey``.

    Examples
    --------
    >>> import dask_imgcurator as ic
    >>> _ = ic.make_demo_shards("memory://doc-in", n_shards=2, samples_per_shard=3)
    >>> ddf = ic.read_webdataset("memory://doc-in/*.tar")
    >>> kept = ddf[ddf.key.str.endswith("1") | ddf.key.str.endswith("2")]
    >>> ic.to_webdataset(kept, "memory://doc-out", samples_per_shard=3).samples
    4
    """
    check_sample_columns(ddf, "to_webdataset")
    params = {"samples_per_shard": samples_per_shard, "rekey": rekey, "computation": tokenize(ddf)}
    fingerprint = tokenize(ddf, samples_per_shard, rekey)
    finished = claim_output(out_dir, fingerprint, params, overwrite=overwrite, inputs=input_files(ddf),
                            parts_dir=STAGING_DIR)
    if finished is not None:  # this exact write already completed
        return WriteResult(out_dir, finished["samples"], finished["shards"], len(finished["shards"]))
    fs, root = url_to_fs(out_dir)
    staging = posixpath.join(root, STAGING_DIR)
    staged, result = stage_and_write(ddf, full_url(fs, staging), out_dir, samples_per_shard, rekey=rekey,
                                     progress=progress)
    result.parts_skipped = staged.skipped
    fs.rm(staging, recursive=True)
    finish_output(out_dir, fingerprint, {**params, "samples": result.samples, "shards": result.shards})
    return result


#: The columns of :func:`read_webdataset` that writing a sample's members takes.
SAMPLE_COLUMNS = ("key", "shard", "members", "image_member")


def check_sample_columns(ddf: dd.DataFrame, caller: str) -> None:
    """Raise ValueError, before anything runs, where ``ddf`` lacks a column that writing shards reads."""
    missing = [c for c in SAMPLE_COLUMNS if c not in ddf.columns]
    if missing:
        raise ValueError(
            f"{caller} needs the columns {missing} of read_webdataset to copy each sample's members; "
            "keep them when selecting columns"
        )


def stage_partitions(
    ddf: dd.DataFrame,
    staging_dir: str,
    *,
    summarise: Callable[[pa.Table], Any] | None = None,
    progress: bool = False,
    only_kept: bool | None = None,
) -> StagedParts:
    """Compute each partition once into ``staging_dir/part-NNNNN.parquet``; skip parts that exist.

    Parameters
    ----------
    ddf : dask.dataframe.DataFrame
        The rows to stage, one part per partition.
    staging_dir : str
        Local path or fsspec URL of the parts.
    summarise : callable, optional
        Applied by each staging task to its part (as a ``pyarrow.Table``); the results come back
        in ``StagedParts.stats``, so that nothing has to read the parts again to count them.
    progress : bool
        Show a progress bar.
    only_kept : bool, optional
        Which rows will be written as samples, checked here (members present, names safe) before
        anything is written: those with ``kept`` true (True), all (False); default: the kept ones
        where the frame has a ``kept`` column, else all.

    Returns
    -------
    StagedParts
        The part URLs in partition order, how many were already there, and the staging tasks' counts.
    """
    staging = _Staging(ddf, staging_dir, summarise, only_kept)
    return staging.finish(run_tasks(staging.tasks, "input shards", progress, unit="shard"))


def write_shards(
    parts: Sequence[str],
    out_dir: str,
    samples_per_shard: int,
    *,
    rekey: bool = False,
    only_kept: bool = False,
    progress: bool = False,
    counts: Sequence[int | None] | None = None,
) -> WriteResult:
    """Copy the samples listed in staged Parquet ``parts`` into exact-size output shards.

    With ``only_kept`` only rows whose boolean ``kept`` column is true are written. Shards that a
    previous attempt completed are skipped; the others are written atomically. ``counts`` gives
    the rows to write per part where known (``StagedParts.counts``); parts without one are counted
    by tasks that read their files.
    """
    plan = _ShardPlan(parts, out_dir, samples_per_shard, rekey=rekey, only_kept=only_kept)
    counts = list(counts) if counts is not None else [None] * len(parts)
    if len(counts) != len(parts):
        raise ValueError(f"{len(counts)} counts for {len(parts)} parts")
    unknown = [i for i, n in enumerate(counts) if n is None]
    tasks = [_count_task(parts[i], only_kept) for i in unknown]
    for i, n in zip(unknown, run_tasks(tasks, "counting rows", progress, unit="part")):
        counts[i] = n
    writes = plan.settle(counts)
    for (j, _), record in zip(writes, run_tasks([t for _, t in writes], "output shards", progress, unit="shard")):
        plan.records[j] = record
    return plan.result()


def stage_and_write(
    ddf: dd.DataFrame,
    staging_dir: str,
    out_dir: str,
    samples_per_shard: int,
    *,
    rekey: bool = False,
    only_kept: bool = False,
    summarise: Callable[[pa.Table], Any] | None = None,
    progress: bool = False,
) -> tuple[StagedParts, WriteResult]:
    """:func:`stage_partitions` then :func:`write_shards`, overlapped on a distributed client.

    On a distributed client each output shard is written as soon as the parts it takes rows
    from are staged and counted, while later partitions are still being computed, instead of
    after the last one; its task goes before the staging tasks still waiting. Without one the
    two phases run one after the other. The files are the same either way.

    Returns
    -------
    (StagedParts, WriteResult)
    """
    _check_samples_per_shard(samples_per_shard)  # before any partition is computed
    client = active_client()
    if client is None:
        staged = stage_partitions(ddf, staging_dir, summarise=summarise, progress=progress, only_kept=only_kept)
        return staged, write_shards(staged.paths, out_dir, samples_per_shard, rekey=rekey, only_kept=only_kept,
                                    progress=progress, counts=staged.counts(only_kept))
    from distributed import as_completed

    staging = _Staging(ddf, staging_dir, summarise, only_kept)
    plan = _ShardPlan(staging.paths, out_dir, samples_per_shard, rekey=rekey, only_kept=only_kept)
    counts: list[int | None] = [None] * len(staging.paths)
    staged_results: dict[int, pd.Series] = {}
    inputs = progress_bar(len(staging.todo), "input shards", "shard", enabled=progress)
    outputs = progress_bar(None, "output shards", "shard", enabled=progress)
    futures: dict = {}
    try:
        todo = set(staging.todo)
        skipped = [i for i in range(len(counts)) if i not in todo]
        for i, f in zip(skipped, client.compute([_count_task(staging.paths[i], only_kept) for i in skipped])):
            futures[f] = ("count", i)
        for i, f in zip(staging.todo, compute_in_order(client, staging.tasks)):
            futures[f] = ("stage", i)
        finished = as_completed(list(futures))
        for future in finished:
            kind, i = futures[future]
            result = future.result()  # raises the task's own exception
            del futures[future]
            if kind == "write":
                plan.records[i] = result
                outputs.update(1)
                continue
            if kind == "stage":
                staged_results[i] = result
                counts[i] = _rows_to_write(result.iloc[0], only_kept)
                inputs.update(1)
            else:
                counts[i] = result
            for j, task in plan.settle(counts):
                write = client.compute(task, priority=1)  # before the partitions still waiting
                futures[write] = ("write", j)
                finished.add(write)
            if plan.settled and outputs.total is None:
                outputs.total = plan.written  # known once every part is counted
                outputs.refresh()
    except BaseException:
        client.cancel(list(futures))
        raise
    finally:
        inputs.close()
        outputs.close()
    return staging.finish([staged_results[i] for i in staging.todo]), plan.result()


class _Staging:
    """The staging of one collection: part paths, the parts still to compute and their tasks."""

    def __init__(self, ddf: dd.DataFrame, staging_dir: str, summarise=None, only_kept: bool | None = None):
        fs, root = url_to_fs(staging_dir)
        fs.makedirs(root, exist_ok=True)
        _remove_temporaries(fs, root)
        self._fs, self._root = fs, root
        paths = [posixpath.join(root, f"part-{i:05d}.parquet") for i in range(ddf.npartitions)]
        fs.invalidate_cache(root)
        present = {posixpath.normpath(p) for p in fs.ls(root, detail=False)}  # one listing, not a request per part
        self.todo = [i for i, p in enumerate(paths) if posixpath.normpath(p) not in present]
        self.paths = [full_url(fs, p) for p in paths]
        self.tasks: list = []
        if self.todo:
            # staged by the task that computes the partition (fused with it): each part is on disk
            # as soon as its shard is done, and no computed partition waits in memory for a writer.
            # Each task gets its own path from a one-row collection; a list of all paths as an
            # argument would travel in every task (139 KB each for 2000 shards, growing with the square).
            targets = dd.from_map(_one_path, [self.paths[i] for i in self.todo], label="stage-path",
                                  meta=pd.Series([], dtype=object), enforce_metadata=False)
            # keys of this call only: a task that writes a file must not be answered with the result
            # an earlier call's task left on the cluster (its file may be gone since, e.g. --overwrite)
            staged = ddf.partitions[self.todo].map_partitions(
                _stage_to, targets, summarise, only_kept, uuid.uuid4().hex, meta=pd.Series([], dtype=object),
                align_dataframes=False, token="stage-part",
            )
            self.tasks = staged.to_delayed()

    def finish(self, results: Sequence[pd.Series]) -> StagedParts:
        """The staged parts, given the staging tasks' results (in the order of ``todo``)."""
        stats: list[dict | None] = [None] * len(self.paths)
        for i, result in zip(self.todo, results):
            stats[i] = result.iloc[0]
        if self.todo:
            _remove_temporaries(self._fs, self._root)  # a task that died mid-write (killed worker) left its temporary
        return StagedParts(self.paths, len(self.paths) - len(self.todo), stats)


class _ShardPlan:
    """The output shards of one write, settled as the parts' row counts become known.

    Shard ``j`` holds rows ``j * samples_per_shard`` onwards of the parts' concatenation. It is
    settled once every part up to its last row is counted and it is full, or once every part is
    counted; a shard that a previous attempt completed is taken from its progress record.
    """

    def __init__(self, parts: Sequence[str], out_dir: str, samples_per_shard: int, *, rekey: bool, only_kept: bool):
        _check_samples_per_shard(samples_per_shard)
        fs, root = url_to_fs(out_dir)
        fs.makedirs(posixpath.join(root, PROGRESS_DIR), exist_ok=True)
        _remove_temporaries(fs, root)
        self._fs, self._root, self._out_dir = fs, root, out_dir
        self._parts, self._rekey, self._only_kept = list(parts), rekey, only_kept
        self._index_width = len(str(samples_per_shard - 1))
        self._completed = _completed_records(fs, root)
        self._planner = _Planner(samples_per_shard)
        self.written = 0  # shard tasks made, beside the ``skipped`` shards taken from records
        self._call = uuid.uuid4().hex  # keys of this call only (see _Staging)
        self.records: dict[int, dict] = {}
        self.skipped = 0

    def settle(self, counts: Sequence[int | None]) -> list[tuple[int, Any]]:
        """Write tasks (shard number, delayed) for the shards that ``counts`` settles, each once.

        ``counts`` holds the rows to write per part, None where not known yet.
        """
        planner = self._planner
        first = len(planner.shards)
        while planner.parts < len(counts) and counts[planner.parts] is not None:
            planner.add(counts[planner.parts])
        if planner.parts == len(counts):
            planner.close()
        write = dask.delayed(_write_shard, pure=True)
        tasks = []
        for j in range(first, len(planner.shards)):
            name = shard_name(j)
            if name in self._completed:
                self.records[j] = self._completed[name]
                self.skipped += 1
                continue
            job = [(self._parts[p], start, stop) for p, start, stop in planner.shards[j]]
            key_prefix = name if self._rekey else None
            key = f"write-shard-{name}-{tokenize(job, self._out_dir, self._rekey, self._call)}"
            tasks.append((j, write(job, full_url(self._fs, self._root), name, key_prefix, self._index_width,
                                   self._only_kept, dask_key_name=key)))
        self.written += len(tasks)
        return tasks

    @property
    def settled(self) -> bool:
        """Every part is counted: every shard has been settled."""
        return self._planner.closed

    def result(self) -> WriteResult:
        """What was written, once every shard is settled and its task has returned."""
        if self.written:
            _remove_temporaries(self._fs, self._root)  # left by attempts that died mid-write and were retried
        shards = [self.records[j] for j in range(len(self._planner.shards))]
        return WriteResult(self._out_dir, sum(r["samples"] for r in shards), shards, self.skipped)


def shard_name(j: int) -> str:
    """Output shard ``j``'s file name without extension: at least five digits (``00042``)."""
    return f"{j:05d}"


# ----------------------------------------------------------------------------- run bookkeeping


def claim_output(
    out_dir: str, fingerprint: str, params: dict, *, overwrite: bool = False, inputs: Iterable[str] = (),
    parts_dir: str | None = None,
) -> dict | None:
    """Make ``out_dir`` ours for the run identified by ``fingerprint``.

    Returns the finished manifest when this same run already completed there, else None after
    leaving a run marker (and, with ``overwrite``, removing an earlier run's files). Refuses as
    :func:`check_output` does. Where ``params["computation"]`` (the token of the rows the run
    computes) is the earlier run's too, its staged parts in the subdirectory ``parts_dir`` are kept
    for this run: a run that differs only in how it writes shards (``samples_per_shard``, ``rekey``)
    does not compute the embeddings again.
    """
    fs, root = url_to_fs(out_dir)
    verdict, previous = _output_verdict(out_dir, fingerprint, params, overwrite, inputs)
    if verdict == "finished":
        return previous
    if verdict == "resume":
        return None
    if verdict == "replace":
        same_rows = parts_dir is not None and params.get("computation") is not None and \
            previous.get("computation") == params["computation"]
        kept = {posixpath.join(posixpath.normpath(root), parts_dir)} if same_rows else set()
        gone = [p for p in fs.ls(root, detail=False) if posixpath.normpath(p) not in kept]
        if gone:
            fs.rm(gone, recursive=True)
    try:
        fs.makedirs(root, exist_ok=True)
        marker = json.dumps({"fingerprint": fingerprint, **params}, indent=1).encode()
        write_atomic(fs, posixpath.join(root, RUN_MARKER), marker)
    except OSError as exc:
        raise PermissionError(f"cannot write to the output directory {out_dir}: {exc}") from exc
    return None


def check_output(
    out_dir: str, fingerprint: str, params: dict, *, overwrite: bool = False, inputs: Iterable[str] = ()
) -> None:
    """Raise what :func:`claim_output` would raise for this run, writing nothing.

    For a check before costly work starts (a cluster, SLURM jobs). An output dir holding another
    run is refused unless ``overwrite``, or unless that run wrote nothing but its marker (it failed
    before its first part, e.g. on a wrong model name), and even with ``overwrite`` where any of
    ``inputs`` (the URLs of the files this run reads, see :func:`~dask_imgcurator.io.sources.input_files`)
    lies inside it; one holding files that this tool did not write is always refused, naming a few
    of them; ``params["samples_per_shard"]``, where given, must be at least 1; a directory that
    cannot be created or written raises PermissionError.
    """
    if _output_verdict(out_dir, fingerprint, params, overwrite, inputs)[0] in ("new", "replace"):
        fs, root = url_to_fs(out_dir)
        probe = posixpath.join(root, f"_write-check.tmp-{uuid.uuid4().hex[:12]}")
        try:
            fs.makedirs(root, exist_ok=True)
            fs.pipe_file(probe, b"")
            fs.rm(probe)
        except Exception as exc:  # OSError, and what read-only filesystems (HTTP) raise instead
            detail = f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else exc
            raise PermissionError(f"cannot write to the output directory {out_dir}: {detail}") from None


def _output_verdict(
    out_dir: str, fingerprint: str, params: dict, overwrite: bool, inputs: Iterable[str] = ()
) -> tuple[str, dict | None]:
    """What claiming ``out_dir`` means: "finished" (this run is complete there), "resume" (this run
    started there), "replace" (an earlier run's files go), or "new"; raises where it is refused.
    With it, the record found there (the manifest of a finished run, else a run marker), or None."""
    if "samples_per_shard" in params:
        _check_samples_per_shard(params["samples_per_shard"])
    fs, root = url_to_fs(out_dir)
    manifest = _read_json(fs, posixpath.join(root, MANIFEST))
    previous = manifest or _read_json(fs, posixpath.join(root, RUN_MARKER))
    if previous is not None and previous.get("fingerprint") == fingerprint:
        return ("finished" if manifest is not None else "resume"), previous
    if not (fs.exists(root) and fs.ls(root)):
        return "new", previous
    entries = _entries(fs, root)
    # without a run record even names like ours (input shards called 00000.tar) are not a run's output
    foreign = [p for p in entries if previous is None or not _OUR_PATHS.fullmatch(_TEMPORARY.sub("", p))]
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"{out_dir} holds files that this tool did not write ({listed}); choose another output "
            "directory (overwrite=True (--overwrite) only replaces the output of an earlier run)"
        )
    # a run that left nothing but its marker and empty folders (it failed before its first part) is no work to keep
    holds_work = any(kind == "file" and p != RUN_MARKER and not _TEMPORARY.search(p) for p, kind in entries.items())
    if not overwrite and (manifest is not None or holds_work):
        raise OutputExistsError(
            f"{out_dir} already holds the output of a different run (other inputs, input shards changed "
            "since, other parameters or model); choose another output directory "
            "or pass overwrite=True (--overwrite) to replace it"
        )
    read_here = files_inside(inputs, out_dir)
    if read_here:
        listed = ", ".join(read_here[:3]) + (f" and {len(read_here) - 3} more" if len(read_here) > 3 else "")
        raise OutputExistsError(
            f"this run reads {listed} from {out_dir}, where an earlier run's output would be replaced "
            "(deleting them before they are read); write to another output directory"
        )
    return "replace", previous or {}


#: Paths (relative to an output dir) of what :func:`to_webdataset` and ``write_curated`` write
#: there: the run's bookkeeping, ``NNNNN.{tar,parquet,idx}`` shards (under ``shards/`` for a
#: curation run), staged parts, the summary and the report.
_OUR_PATHS = re.compile(
    r"(shards/)?(\d{5,}\.(tar|parquet|idx)|manifest\.json|_run\.json|_progress(/\d{5,}\.json)?)"
    r"|(metadata|_staging)(/part-\d{5,}\.parquet)?|shards|summary\.json|report\.html"
)
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{12}$")


def _entries(fs, root: str) -> dict[str, str]:
    """Every path under ``root``, relative and sorted, with its type ("file" or "directory"): one listing."""
    base = posixpath.normpath(root)
    found = {posixpath.relpath(posixpath.normpath(p), base): info.get("type", "file")
             for p, info in fs.find(root, withdirs=True, detail=True).items()}
    found.pop(".", None)
    return dict(sorted(found.items()))


def _check_samples_per_shard(samples_per_shard: int) -> None:
    if not isinstance(samples_per_shard, (int, np.integer)) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a whole number of at least 1, got {samples_per_shard!r}")


def finish_output(out_dir: str, fingerprint: str, manifest: dict) -> None:
    """Record a completed run in ``manifest.json`` and drop the in-progress bookkeeping."""
    fs, root = url_to_fs(out_dir)
    write_atomic(fs, posixpath.join(root, MANIFEST), json.dumps({"fingerprint": fingerprint, **manifest}, indent=1).encode())
    for leftover in (PROGRESS_DIR, RUN_MARKER):
        if fs.exists(posixpath.join(root, leftover)):
            fs.rm(posixpath.join(root, leftover), recursive=True)


def _read_json(fs, path: str) -> dict | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def _completed_records(fs, root: str) -> dict[str, dict]:
    """Progress records, by shard name, of the shards whose record, tar, parquet and idx all exist.

    Two directory listings and one batched read, however many shards: not a request per file.
    """
    progress = posixpath.join(root, PROGRESS_DIR)
    fs.invalidate_cache(root)
    fs.invalidate_cache(progress)
    present = {posixpath.basename(p) for p in fs.ls(root, detail=False)}
    recorded = {posixpath.basename(p)[:-5] for p in fs.ls(progress, detail=False) if p.endswith(".json")}
    done = [n for n in recorded if {f"{n}.tar", f"{n}.parquet", f"{n}.idx"} <= present]
    if not done:
        return {}
    paths = [posixpath.join(progress, f"{n}.json") for n in done]
    blobs = fs.cat(paths)  # concurrent on async filesystems (s3, gcs, http)
    return {posixpath.basename(p)[:-5]: json.loads(data) for p, data in blobs.items()}


def _remove_temporaries(fs, root: str) -> None:
    """Remove ``*.tmp-*`` files in ``root`` and its folders (listed, not globbed: ``root`` may hold ``[?*``)."""
    folders = [root] + [entry["name"] for entry in fs.ls(root, detail=True) if entry.get("type") == "directory"]
    for folder in folders:
        for path in files_matching(fs, folder, "*.tmp-*"):
            fs.rm(path)


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` of ``fs`` under a temporary name, then rename it: readers never see part of it."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


# ----------------------------------------------------------------------------- planning


def _count_rows(part: str, only_kept: bool) -> int:
    fs, path = url_to_fs(part)
    if not only_kept:
        with fs.open(path, "rb") as f:
            return pq.read_metadata(f).num_rows
    with fs.open(path, "rb") as f:
        kept = pq.read_table(f, columns=["kept"]).column("kept")
    return int(pa.compute.sum(kept.fill_null(False)).as_py() or 0)


def _count_task(part: str, only_kept: bool):
    # counted by tasks, one footer (or kept column) each: serial reads from the client would cost
    # one object-store round trip per part
    return dask.delayed(_count_rows, pure=True)(part, only_kept)


class _Planner:
    """Splits the concatenation of parts, added in order, into runs of ``samples_per_shard`` rows.

    Each output shard in ``shards`` is a list of (part number, first row, end row) slices, rows
    counted among the rows that will be written. A shard appears once it is full, or at ``close``.
    """

    def __init__(self, samples_per_shard: int):
        self._size = samples_per_shard
        self._current: list[tuple[int, int, int]] = []
        self._room = samples_per_shard
        self.closed = False
        self.parts = 0
        self.shards: list[list[tuple[int, int, int]]] = []

    def add(self, count: int) -> None:
        """Append the next part's ``count`` rows."""
        p, start = self.parts, 0
        while start < count:
            take = min(self._room, count - start)
            self._current.append((p, start, start + take))
            start += take
            self._room -= take
            if self._room == 0:
                self.shards.append(self._current)
                self._current, self._room = [], self._size
        self.parts += 1

    def close(self) -> None:
        """No more parts: the rows not yet in a shard make the last, smaller one."""
        if self._current and not self.closed:
            self.shards.append(self._current)
            self._current = []
        self.closed = True


def _plan_shards(counts: Sequence[int], samples_per_shard: int) -> list[list[tuple[int, int, int]]]:
    """Every output shard's slices for parts of ``counts`` rows (see ``_Planner``)."""
    planner = _Planner(samples_per_shard)
    for count in counts:
        planner.add(count)
    planner.close()
    return planner.shards


# ----------------------------------------------------------------------------- tasks


def _one_path(path: str) -> pd.Series:
    return pd.Series([path], dtype=object)


def _stage_to(df, target: pd.Series, summarise=None, only_kept: bool | None = None, call: str | None = None) -> pd.Series:
    """``_stage_part`` to the path ``target`` holds; its counts, as a one-row Series.

    ``call`` only makes the task's key unique to one staging call.
    """
    return pd.Series([_stage_part(df, target.iloc[0], summarise, only_kept)], dtype=object)


def _stage_part(df, path: str, summarise=None, only_kept: bool | None = None) -> dict:
    """Validate the rows of one computed partition that will be written (see ``stage_partitions``),
    save it atomically as Parquet, and return its counts."""
    table = to_arrow(df)
    has_kept = "kept" in table.column_names
    kept = table.filter(pa.compute.fill_null(table.column("kept"), False)) if has_kept else table
    to_write = kept if (only_kept if only_kept is not None else has_kept) else table
    for key, shard, members in zip(*(to_write.column(c).to_pylist() for c in ("key", "shard", "members"))):
        _check_members(key, shard, members)
    fs, local = url_to_fs(path)
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=STAGE_ROW_GROUP)
    write_atomic(fs, local, sink.getvalue())
    return {"rows": table.num_rows, "kept": kept.num_rows, "summary": summarise(table) if summarise else None}


def _check_members(key: str, shard: str, members_json: str | None) -> None:
    members = json.loads(members_json) if members_json else []
    if not members:
        what = f"the error row of shard {shard} (the shard could not be read)" if not key else \
            f"sample {key!r} of {shard} (an error row from reading)"
        raise ValueError(f"{what} has no members to write; filter such rows out first, e.g. ddf[ddf.error.isna()]")
    for name, _, _ in members:
        reason = unsafe_member_reason(name)
        if reason:
            raise ValueError(f"refusing to write sample {key!r} of {shard}: {reason}")


def _write_shard(
    slices: Sequence[tuple[str, int, int]],
    root_url: str,
    name: str,
    key_prefix: str | None,
    index_width: int,
    only_kept: bool,
) -> dict:
    """Write one output shard (tar + parquet + idx) from row slices of staged parts."""
    # parts may type a column differently (all-null in one, strings in another): promote to one schema
    tables = [_read_slice(p, a, b, only_kept) for p, a, b in slices]
    rows = pa.concat_tables(tables, promote_options="default").to_pandas(types_mapper=arrow_types_mapper)
    fs, root = url_to_fs(root_url)
    base = posixpath.join(root, name)
    tar_tmp = f"{base}.tar.tmp-{uuid.uuid4().hex[:12]}"
    with fs.open(tar_tmp, "wb") as f:
        sink = _HashingWriter(f)
        layout = _stream_tar(rows, sink, key_prefix, index_width)
    out = _relocate(rows, layout, full_url(fs, f"{base}.tar"), key_prefix is not None)

    table = io.BytesIO()
    pq.write_table(to_arrow(out), table)
    idx = io.StringIO()
    try:
        write_dali_index([members for _, members in layout], idx)
    except ValueError as exc:
        raise ValueError(
            f"{exc}; pass rekey=True (--rekey) to give members plain names, with overwrite=True (--overwrite) "
            "to replace what this attempt wrote"
        ) from None
    record = {
        "shard": f"{name}.tar",
        "samples": len(out),
        "bytes": sink.size,
        "sha256": sink.hexdigest(),
        "first_key": out["key"].iloc[0] if len(out) else None,
        "last_key": out["key"].iloc[-1] if len(out) else None,
    }
    # The record goes first and the tar last: a shard counts as done only when both exist.
    write_atomic(fs, posixpath.join(root, PROGRESS_DIR, f"{name}.json"), json.dumps(record).encode())
    write_atomic(fs, f"{base}.idx", idx.getvalue().encode())
    write_atomic(fs, f"{base}.parquet", table.getvalue())
    fs.mv(tar_tmp, f"{base}.tar")
    return record


class _HashingWriter:
    """A write-only file wrapper that counts and hashes what passes through."""

    def __init__(self, f):
        self._f, self._sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self._sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _read_slice(part: str, start: int, stop: int, only_kept: bool) -> pa.Table:
    """Rows ``start:stop`` of a staged part (counted among kept rows with ``only_kept``).

    Only the row groups holding those rows are read: a part larger than an output shard is
    read piecewise by the shards it feeds, not once whole per shard.
    """
    fs, path = url_to_fs(part)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if only_kept:
            kept = pf.read(columns=["kept"]).column("kept").fill_null(False).to_numpy(zero_copy_only=False)
            rows = np.flatnonzero(kept)[start:stop]
        else:
            rows = np.arange(start, stop)
        if len(rows) == 0:
            return pf.schema_arrow.empty_table()
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        group_start = np.concatenate([[0], np.cumsum(sizes)])
        first = int(np.searchsorted(group_start, rows[0], side="right") - 1)
        last = int(np.searchsorted(group_start, rows[-1], side="right") - 1)
        table = pf.read_row_groups(list(range(first, last + 1)))
    return table.take(pa.array(rows - group_start[first]))


def _stream_tar(rows: pd.DataFrame, sink, key_prefix: str | None, index_width: int) -> list[tuple[str, list[Member]]]:
    """Copy every member of every row into a tar on ``sink``, one sample in memory at a time.

    Header fields are fixed (mtime 0, root owner, mode 644) so a rerun gives identical bytes.
    """
    layout: list[tuple[str, list[Member]]] = []
    sources: dict[str, object] = {}
    seen: dict[str, str] = {}  # key -> its source shard, without rekey
    try:
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for i, (key, shard, members_json) in enumerate(zip(rows["key"], rows["shard"], rows["members"])):
                new_key = f"{key_prefix}{i:0{index_width}d}" if key_prefix is not None else key
                if key_prefix is None:
                    if key in seen:  # readers refuse a tar with two samples of one key
                        raise ValueError(
                            f"two samples with key {key!r} would go into one output shard (from {seen[key]} and "
                            f"{shard}); pass rekey=True (--rekey) to give samples new keys, with overwrite=True "
                            "(--overwrite) to replace what this attempt wrote"
                        )
                    seen[key] = shard
                _check_members(key, shard, members_json)  # whatever path the rows took here
                if shard not in sources:
                    with reading(shard):
                        sources[shard] = open_shard(shard)
                written: list[Member] = []
                for name, offset, size in json.loads(members_json):
                    out_name = f"{new_key}.{split_key(name)[1]}" if key_prefix is not None else name
                    info = tarfile.TarInfo(out_name)
                    info.size, info.mtime, info.mode = size, 0, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, _exact_range(sources[shard], shard, offset, size))
                    padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    written.append(Member(out_name, tar.offset - padded, size))
                layout.append((new_key, written))
    finally:
        for f in sources.values():
            f.close()
    return layout


def _exact_range(f, shard: str, offset: int, size: int) -> io.BytesIO:
    """The ``size`` member bytes at ``offset``, checked against the tar header block just before them.

    The shard may have been replaced since it was indexed (hours earlier on a cluster, or by a resume
    of the same lazy frame): another layout puts another header there, or none, and copying the
    bytes would write another sample's data under this one's name.
    """
    start = max(0, offset - tarfile.BLOCKSIZE)
    with reading(shard):
        f.seek(start)
        data = f.read(offset - start + size)
    if len(data) != offset - start + size:
        raise ShardError(f"{shard}: expected {size} bytes at offset {offset}, got {len(data) - (offset - start)} "
                         "(the shard changed since it was read?)")
    try:
        header = tarfile.TarInfo.frombuf(data[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape") if start < offset else None
    except tarfile.HeaderError:
        header = None
    if header is None or header.size != size or not header.isreg():
        raise ShardError(
            f"{shard}: the tar header before byte {offset} does not describe the {size}-byte member indexed there; "
            "the shard changed since it was read. Run again (a changed input is another run: with "
            "overwrite=True / --overwrite)"
        )
    return io.BytesIO(data[offset - start:])


def _relocate(rows: pd.DataFrame, layout, tar_url: str, rekeyed: bool) -> pd.DataFrame:
    """Point the location columns at the new tar; remember where each sample came from."""
    out = rows.copy()
    out["source_shard"] = rows["shard"]
    if rekeyed:
        out["source_key"] = rows["key"]
        out["key"] = pd.array([k for k, _ in layout], dtype=pd.StringDtype("pyarrow"))
    new_members = [members for _, members in layout]
    image_names = []
    image_offsets = []
    for old_image, old_members, members in zip(rows["image_member"], rows["members"], new_members):
        position = None if pd.isna(old_image) else next(
            (n for n, m in enumerate(json.loads(old_members)) if m[0] == old_image), None
        )
        image_names.append(members[position].name if position is not None else None)
        image_offsets.append(members[position].offset if position is not None else None)
    out["shard"] = pd.array([tar_url] * len(out), dtype=pd.StringDtype("pyarrow"))
    out["image_member"] = pd.array(image_names, dtype=pd.StringDtype("pyarrow"))
    out["image_offset"] = pd.array(image_offsets, dtype=pd.Int64Dtype())
    out["members"] = pd.array(
        [json.dumps([[m.name, m.offset, m.size] for m in ms]) for ms in new_members], dtype=pd.StringDtype("pyarrow")
    )
    return out
