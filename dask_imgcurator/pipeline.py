"""A curation run's output: metadata for every sample, shards of the kept ones, and the accounting.

Layout of ``OUT``::

    OUT/metadata/part-NNNNN.parquet   every input sample (one part per input shard) with its
                                      scores, ``kept`` flag, ``drop_reason`` and ``error``
    OUT/shards/NNNNN.{tar,parquet,idx} the kept samples, re-sharded (see ``stage_and_write``)
    OUT/shards/manifest.json          counts and checksums of the shards
    OUT/summary.json                  samples in = kept + filtered + failed
"""
from __future__ import annotations

import json
import posixpath
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import dask
import dask.dataframe as dd
import pyarrow as pa
import pyarrow.parquet as pq
from dask.base import tokenize
from fsspec.core import url_to_fs

from dask_imgcurator.io.reader import shard_error_rows
from dask_imgcurator.io.shards import full_url
from dask_imgcurator.io.sources import input_files
from dask_imgcurator.io.writer import (
    check_output, check_sample_columns, claim_output, finish_output, stage_and_write, write_atomic,
)
from dask_imgcurator.progress import counted, run_tasks
from dask_imgcurator.schema import STRING

__all__ = ["mark_kept", "write_curated", "check_curated_output", "CurationSummary", "error_kind"]

SUMMARY = "summary.json"

#: Phrases that name the kind of an ``error`` value, most specific first.
ERROR_KINDS = (
    ("truncated tar", "unreadable shard"),
    ("not a tar archive", "unreadable shard"),
    ("corrupt tar", "unreadable shard"),
    ("empty file (0 bytes)", "unreadable shard"),
    ("broken entry after this sample", "unreadable shard"),
    ("no image member", "no image"),
    ("no key:", "no key"),
    ("not valid UTF-8", "unsafe member name"),
    ("duplicate key", "duplicate key"),
    ("two '", "duplicate member"),
    ("contains '..'", "unsafe member name"),
    ("absolute path", "unsafe member name"),
    ("NUL byte", "unsafe member name"),
    ("entries are not supported", "unsupported tar entry"),
    ("pixel limit", "image over pixel limit"),
    ("empty image", "empty image"),
    ("truncated or corrupt", "corrupt image"),
    ("unreadable image header", "corrupt image"),
    ("unrecognised image data", "unrecognised image"),
)


def error_kind(error: str, key: str | None = None) -> str:
    """A short category for an ``error`` value, for the run's accounting.

    The sample's ``key``, where given, is left out of the text first, where the messages quote it or a
    member name it begins (``'KEY'``, ``'KEY.jpg'``): a key may hold one of the phrases ("duplicate key
    'truncated tar'").
    """
    text = error
    if key:
        quoted = repr(key)
        text = re.sub(re.escape(quoted[:-1]) + f"[^{quoted[0]}]*{quoted[0]}", "''", error)
    for phrase, kind in ERROR_KINDS:
        if phrase in text:
            return kind
    return "decode or model error" if error else "unknown"


def mark_kept(ddf: dd.DataFrame, keep: dd.Series | None = None, reasons: dd.Series | None = None) -> dd.DataFrame:
    """Add ``kept`` (bool) and ``drop_reason`` (string) columns.

    A row is kept when it has no ``error`` and ``keep`` (a boolean mask, optional) is true.
    ``drop_reason`` names the filter condition a row failed (from ``reasons``, e.g.
    :func:`~dask_imgcurator.stages.filters.drop_reason`), and is null for kept and failed rows.
    """
    ok = ddf["error"].isna()
    kept = ok if keep is None else ok & keep.fillna(False).astype(bool)
    dropped = ok & ~kept
    if reasons is None:
        reasons = ddf["key"].mask(dropped, "filter")
    return ddf.assign(kept=kept, drop_reason=reasons.where(dropped, None).astype(STRING))


@dataclass
class CurationSummary:
    """The accounting of one run: every input sample is kept, filtered or failed."""

    samples_in: int = 0
    kept: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    written: int = 0
    shards: int = 0
    unreadable_shards: int = 0
    shards_skipped: int = 0
    parts_skipped: int = 0

    @property
    def balanced(self) -> bool:
        """in = kept + filtered + failed, and every kept sample was written."""
        return (
            self.samples_in == self.kept + sum(self.filtered.values()) + sum(self.failed.values())
            and self.kept == self.written
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "balanced": self.balanced}

    def report(self) -> str:
        """Human-readable lines for the end of a CLI run."""
        lines = [
            f"samples in: {self.samples_in} = kept {self.kept} + filtered {sum(self.filtered.values())}"
            f" + failed {sum(self.failed.values())}"
            + ("" if self.balanced else "   <-- DOES NOT ADD UP"),
        ]
        lines += [f"  filtered by {cond!r}: {n}" for cond, n in sorted(self.filtered.items())]
        lines += [f"  failed ({kind}): {n}" for kind, n in sorted(self.failed.items())]
        if self.unreadable_shards:
            lines.append(
                f"unreadable shards: {self.unreadable_shards} (partly or not at all; the metadata rows with an"
                " empty key say why)"
            )
        lines.append(f"written: {counted(self.written, 'sample')} in {counted(self.shards, 'shard')}")
        if self.parts_skipped or self.shards_skipped:
            lines.append(
                f"resumed: {counted(self.parts_skipped, 'metadata part')} and {counted(self.shards_skipped, 'shard')}"
                " were already complete"
            )
        return "\n".join(lines)


def write_curated(
    ddf: dd.DataFrame,
    out_dir: str,
    *,
    samples_per_shard: int = 10_000,
    rekey: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> CurationSummary:
    """Write a marked frame (see :func:`mark_kept`): metadata for all rows, shards of kept rows.

    Computes ``ddf`` once per partition. Resumable: re-running after an interruption skips
    metadata parts and shards that are complete and produces the same files. A run is known by
    its computation, so resume with the same lazy frame: a persisted one is named afresh in each
    session (pass it unpersisted; it is computed once per partition anyway).

    Parameters
    ----------
    ddf : dask.dataframe.DataFrame
        Rows from :func:`read_webdataset`, possibly with scores, plus ``kept``/``drop_reason``.
    out_dir : str
        Output directory or fsspec URL (layout in this module's docstring).
    samples_per_shard, rekey : see :func:`to_webdataset`.
    overwrite : bool
        Replace an output directory that holds a different run (keeping its metadata parts where
        that run computed the same rows: only ``samples_per_shard`` or ``rekey`` differ).
    progress : bool
        Show progress bars.

    Returns
    -------
    CurationSummary
    """
    missing = {"kept", "drop_reason", "error"} - set(ddf.columns)
    if missing:
        raise ValueError(f"write_curated needs columns {sorted(missing)}; add them with mark_kept()")
    check_sample_columns(ddf, "write_curated")
    params = {"samples_per_shard": samples_per_shard, "rekey": rekey, "computation": tokenize(ddf)}
    fingerprint = _fingerprint(ddf, samples_per_shard, rekey)
    finished = claim_output(out_dir, fingerprint, params, overwrite=overwrite, inputs=input_files(ddf),
                            parts_dir="metadata")
    fs, root = url_to_fs(out_dir)
    if finished is not None:
        summary = CurationSummary(**{k: v for k, v in finished["summary"].items() if k != "balanced"})
        summary.parts_skipped, summary.shards_skipped = len(finished["parts"]), summary.shards
        return summary
    staged, shards = stage_and_write(
        ddf, full_url(fs, posixpath.join(root, "metadata")), full_url(fs, posixpath.join(root, "shards")),
        samples_per_shard, rekey=rekey, only_kept=True, summarise=_accounting, progress=progress,
    )
    finish_output(full_url(fs, posixpath.join(root, "shards")), fingerprint, {**params, "samples": shards.samples, "shards": shards.shards})
    parts = staged.paths
    summary = _count(parts, [None if s is None else s["summary"] for s in staged.stats], progress)
    summary.written, summary.shards = shards.samples, len(shards.shards)
    summary.shards_skipped, summary.parts_skipped = shards.shards_skipped, staged.skipped
    write_atomic(fs, posixpath.join(root, SUMMARY), json.dumps(summary.to_dict(), indent=1).encode())
    finish_output(out_dir, fingerprint, {**params, "summary": summary.to_dict(), "parts": parts})
    return summary


def check_curated_output(
    ddf: dd.DataFrame, out_dir: str, *, samples_per_shard: int = 10_000, rekey: bool = False, overwrite: bool = False
) -> None:
    """Raise what :func:`write_curated` would raise about ``out_dir`` for ``ddf``, writing nothing.

    For a check before costly work starts: the CLI calls it before it starts a cluster or submits
    SLURM jobs, so that an output directory holding another run, foreign files, or one that cannot
    be written is a one-line error at once.
    """
    params = {"samples_per_shard": samples_per_shard, "rekey": rekey}
    check_output(out_dir, _fingerprint(ddf, samples_per_shard, rekey), params, overwrite=overwrite,
                 inputs=input_files(ddf))


def _fingerprint(ddf: dd.DataFrame, samples_per_shard: int, rekey: bool) -> str:
    """What identifies a run: its whole computation and the output's parameters."""
    return tokenize(ddf, samples_per_shard, rekey)


def _count(parts: list[str], known: list[tuple | None], progress: bool) -> CurationSummary:
    """Add up the parts' accounting: from their staging tasks (``known``), else read back by tasks."""
    count = dask.delayed(_count_part, pure=True)
    unknown = [i for i, k in enumerate(known) if k is None]
    read = run_tasks([count(parts[i]) for i in unknown], "accounting", progress, unit="part")
    totals = CurationSummary()
    filtered, failed = Counter(), Counter()
    for n_in, n_kept, part_filtered, part_failed, n_unreadable in [k for k in known if k is not None] + read:
        totals.samples_in += n_in
        totals.kept += n_kept
        totals.unreadable_shards += n_unreadable
        filtered.update(part_filtered)
        failed.update(part_failed)
    totals.filtered, totals.failed = dict(filtered), dict(failed)
    return totals


def _count_part(part: str) -> tuple[int, int, dict, dict, int]:
    fs, path = url_to_fs(part)
    with fs.open(path, "rb") as f:
        part = pq.ParquetFile(f)
        columns = [c for c in ("key", "members", "kept", "drop_reason", "error") if c in part.schema_arrow.names]
        return _accounting(part.read(columns=columns))


def _accounting(table: pa.Table) -> tuple[int, int, dict, dict, int]:
    """Samples, kept samples, filtered samples per reason, failed samples per error kind, and
    unreadable shards of one part.

    A shard that could not be read (whole or in part) has one row for its error
    (:func:`~dask_imgcurator.io.reader.shard_error_rows`); that row is the shard's, not a sample: it is
    counted apart from the samples.
    """
    members = table.column("members").to_pylist() if "members" in table.column_names else None
    shard_rows = shard_error_rows(table.column("key").to_pylist(), members)
    samples = table.filter(pa.array(~shard_rows))
    filtered = Counter(r for r in samples.column("drop_reason").to_pylist() if r is not None)
    failed = Counter(error_kind(e, k) for e, k in zip(samples.column("error").to_pylist(), samples.column("key").to_pylist())
                     if e is not None)
    kept = pa.compute.sum(samples.column("kept").fill_null(False)).as_py() or 0
    return samples.num_rows, int(kept), dict(filtered), dict(failed), table.num_rows - samples.num_rows
