"""A curation run as one self-contained HTML page: accounting, score plots, thumbnails, failures.

:func:`write_report` reads ``OUT/summary.json`` and ``OUT/metadata/part-*.parquet`` (see
:mod:`dask_imgcurator.pipeline`) and writes ``OUT/report.html``. Figures are PNGs and thumbnails
JPEGs, embedded as base64 ``data:`` URLs, so the file can be mailed or archived on its own. Every
piece of text that comes from the data (keys, captions, errors, filter conditions, paths) is
HTML-escaped.

The building blocks are public so notebooks can show the same views: :func:`threshold_sweep`,
:func:`read_thumbnails` and :func:`thumbnail_figure`.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import operator
import os
import textwrap
import posixpath
import uuid
from typing import Callable, Sequence

import dask
import numpy as np
import pandas as pd
from fsspec.core import url_to_fs
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from dask_imgcurator.decode.base import DEFAULT_MAX_PIXELS
from dask_imgcurator.decode.probe import open_image
from dask_imgcurator.io.parquet import read_parquet
from dask_imgcurator.io.shards import files_matching, full_url, read_ranges
from dask_imgcurator.pipeline import SUMMARY, error_kind
from dask_imgcurator.progress import counted

__all__ = ["write_report", "threshold_sweep", "read_thumbnails", "thumbnail_figure", "score_columns"]

REPORT = "report.html"
#: Which way a sweep keeps samples, for score columns with a known meaning (higher is better / safer).
SWEEP_DIRECTIONS = {"aesthetic_score": ">=", "nsfw_score": "<"}
#: Columns read for every row (scores are added); the rest is fetched only for rows shown on the page.
_ROW_COLUMNS = ("error", "kept", "drop_reason")
_DETAIL_COLUMNS = ("key", "shard", "image_offset", "image_nbytes", "caption", "width", "height")
#: Images larger than this are not read for a thumbnail.
_MAX_THUMBNAIL_SOURCE_BYTES = 64 << 20
_OPS = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
_KEPT_COLOUR, _DROPPED_COLOUR, _LINE_COLOUR = "#2f7d4f", "#c0504d", "#333333"


# ----------------------------------------------------------------------------- public helpers


def score_columns(columns: Sequence[str]) -> list[str]:
    """The score columns (``*_score``) among ``columns``, ``aesthetic_score`` and ``nsfw_score`` first.

    Examples
    --------
    >>> score_columns(["key", "nsfw_score", "brightness_score", "aesthetic_score"])
    ['aesthetic_score', 'nsfw_score', 'brightness_score']
    """
    found = [str(c) for c in columns if str(c).endswith("_score")]
    known = [c for c in SWEEP_DIRECTIONS if c in found]
    return known + [c for c in found if c not in known]


def threshold_sweep(
    scores: pd.Series | np.ndarray | Sequence[float],
    thresholds: Sequence[float] | None = None,
    *,
    keep: str = ">=",
    steps: int = 10,
) -> pd.DataFrame:
    """How many samples survive a filter ``score <keep> threshold`` at each threshold.

    Parameters
    ----------
    scores : pandas.Series or array-like of float
        One score per sample; missing values (NaN, failed samples) never survive. Floating scores
        are compared in their own dtype, as :func:`~dask_imgcurator.parse_filter` compares them
        (float32 scores against the threshold rounded to float32); others as float64.
    thresholds : sequence of float, optional
        Thresholds to try. Default: about ``steps`` round numbers spanning the scores' range.
    keep : {">=", ">", "<=", "<"}
        The comparison a sample must pass to survive: ``">="`` for scores where higher is better
        (aesthetic), ``"<"`` where lower is better (NSFW probability).
    steps : int
        Roughly how many default thresholds to make.

    Returns
    -------
    pandas.DataFrame
        Columns ``threshold``, ``surviving`` (samples passing) and ``fraction`` (of the samples
        that have a score), one row per threshold in ascending order. Empty when no sample has
        a score.

    Examples
    --------
    >>> threshold_sweep([1.0, 2.0, 3.0, float("nan")], [1.5, 2.5], keep=">=")
       threshold  surviving  fraction
    0        1.5          2  0.666667
    1        2.5          1  0.333333
    """
    if keep not in _OPS:
        raise ValueError(f"keep must be one of {sorted(_OPS)}, not {keep!r}")
    series = pd.to_numeric(pd.Series(scores), errors="coerce")
    if series.dtype.kind != "f":
        series = series.astype("float64")
    series = series[np.isfinite(series.to_numpy(dtype=np.float64, na_value=np.nan))]
    values = series.to_numpy(dtype=np.float64)
    if thresholds is None:
        thresholds = _nice_thresholds(values, steps)
    ts = np.unique(np.asarray(thresholds, dtype=np.float64))
    if values.size == 0:
        return pd.DataFrame({"threshold": ts[:0], "surviving": np.zeros(0, np.int64), "fraction": ts[:0]})
    # Compare as --filter does, the scores in their own dtype against a Python float: float32
    # scores meet the threshold rounded to float32, so at a filter's threshold the sweep counts
    # exactly the samples that filter kept.
    surviving = np.array([int(_OPS[keep](series, float(t)).sum()) for t in ts], dtype=np.int64)
    return pd.DataFrame({"threshold": ts, "surviving": surviving, "fraction": surviving / values.size})


def read_thumbnails(df: pd.DataFrame, size: int = 160) -> list[Image.Image | None]:
    """Read and shrink the images of some rows, from their shards (by byte offset).

    Parameters
    ----------
    df : pandas.DataFrame
        Rows with ``shard``, ``image_offset`` and ``image_nbytes`` (as written by
        :func:`~dask_imgcurator.read_webdataset` and kept in the Parquet metadata). Keep it to
        the handful of rows you want to look at: each image is read and decoded here.
    size : int
        Longest side of the thumbnails in pixels.

    Returns
    -------
    list of PIL.Image.Image or None
        RGB thumbnails in the order of ``df``; None where a row has no image or its shard or
        image cannot be read (moved shards, truncated files, images over the pixel limit).

    Examples
    --------
    >>> import dask_imgcurator as ic
    >>> ic.make_demo_shards("memory://thumbs-doc", n_shards=1, samples_per_shard=2)  # doctest: +ELLIPSIS
    [...]
    >>> rows = ic.read_webdataset("memory://thumbs-doc").compute()
    >>> [max(im.size) for im in read_thumbnails(rows, size=48)]
    [48, 48]
    """
    blobs = _image_bytes(df)
    return [None if blob is None else _thumbnail(blob, size) for blob in blobs]


def thumbnail_figure(
    df: pd.DataFrame,
    *,
    title: str | None = None,
    label: Callable[[pd.Series], str] | Sequence[str] | None = None,
    columns: int = 6,
    size: int = 160,
) -> Figure:
    """A grid of thumbnails of ``df``'s rows with a short label under each.

    Parameters
    ----------
    df : pandas.DataFrame
        Rows as for :func:`read_thumbnails`, in the order to show them.
    title : str, optional
        Figure title.
    label : callable or sequence of str, optional
        A function of the row giving its label, or the columns to print (numbers with 6
        significant digits). Default: ``key`` and the score columns.
    columns : int
        Thumbnails per row of the grid.
    size : int
        Thumbnail size in pixels.

    Returns
    -------
    matplotlib.figure.Figure
        Rendered with the Agg canvas; show it with ``display(fig)`` in a notebook or save it
        with ``fig.savefig(...)``.
    """
    images = read_thumbnails(df, size=size) if len(df) else []
    if label is None:
        label = ["key", *score_columns(df.columns)]
    if callable(label):
        text_of = label
    else:
        names = [c for c in label if c in df.columns]
        text_of = lambda row: "\n".join(_fmt_value(c, row[c]) for c in names)  # noqa: E731
    columns = max(1, min(columns, len(images) or 1))
    rows = max(1, math.ceil(len(images) / columns))
    fig = Figure(figsize=(1.9 * columns, 2.3 * rows + (0.4 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    if not images:
        axes[0].text(0.5, 0.5, "no samples", ha="center", va="center", transform=axes[0].transAxes)
    for ax, img, (_, row) in zip(axes, images, df.iterrows()):
        if img is None:
            ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", transform=ax.transAxes, color="grey")
        else:
            ax.imshow(np.asarray(img))
        ax.set_title("\n".join(textwrap.fill(line, 30) for line in str(text_of(row)).splitlines()), fontsize=7)
    return fig


def write_report(out_dir: str, path: str | None = None, *, thumbnails: int = 12, max_failures: int = 1000) -> str:
    """Write one self-contained HTML page describing a curation run.

    The page holds the accounting (samples in = kept + filtered + failed, by condition and by
    kind of failure), a histogram of every ``*_score`` column (kept and filtered samples
    stacked, filter thresholds marked), a threshold sweep for ``aesthetic_score`` and
    ``nsfw_score`` (table and plot: samples surviving at each threshold), thumbnails of kept
    and of filtered samples, and a table of failed samples with their errors. Figures are
    embedded as base64 PNG, so the file needs nothing else to display.

    Parameters
    ----------
    out_dir : str
        Output directory of a run (``imgcurator curate``, ``reshard`` or
        :func:`~dask_imgcurator.write_curated`): local path or fsspec URL.
    path : str, optional
        Where to write the page (local path or fsspec URL). Default ``OUT_DIR/report.html``; a
        directory (an existing one, or a path ending with ``/``) gets its own ``report.html``.
    thumbnails : int
        How many kept and how many filtered samples to show (each); 0 shows none. Images are
        read from the source shards named in the metadata, or from the run's output shards
        for kept samples whose source is gone.
    max_failures : int
        Most rows in the table of failed samples (the counts above it are always complete).

    Returns
    -------
    str
        The path of the HTML file.

    Raises
    ------
    FileNotFoundError
        ``out_dir`` holds no ``summary.json`` or no metadata parts (not a finished run).

    Examples
    --------
    >>> import tempfile, dask_imgcurator as ic
    >>> from dask_imgcurator.report import write_report
    >>> work = tempfile.mkdtemp()
    >>> _ = ic.make_demo_shards(f"{work}/in", n_shards=1, samples_per_shard=4)
    >>> _ = ic.write_curated(ic.mark_kept(ic.read_webdataset(f"{work}/in")), f"{work}/out")
    >>> write_report(f"{work}/out").endswith("report.html")
    True
    """
    if thumbnails < 0 or max_failures < 0:
        raise ValueError("thumbnails and max_failures must be >= 0")
    fs, root = url_to_fs(out_dir)
    target = _report_path(path) if path is not None else full_url(fs, posixpath.join(root, REPORT))
    summary_path = posixpath.join(root, SUMMARY)
    if not fs.exists(summary_path):
        raise FileNotFoundError(
            f"{out_dir}: no {SUMMARY} here; give the output directory of a finished `imgcurator curate` run"
        )
    with fs.open(summary_path, "r") as f:
        summary = json.load(f)
    parts = [full_url(fs, p) for p in files_matching(fs, posixpath.join(root, "metadata"), "part-*.parquet")]
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no metadata/part-*.parquet files; the run did not finish")
    rows, available = _load_rows(parts)
    scores = score_columns(available)
    thresholds = _filter_thresholds(summary.get("filtered", {}))

    kept = rows[rows["kept"]]
    filtered = rows[~rows["kept"] & rows["error"].isna()]
    failed = rows[rows["error"].notna()]
    primary = scores[0] if scores else None
    kept_shown = _top(kept, primary, thumbnails)
    dropped_shown = _round_robin(filtered, "drop_reason", primary, thumbnails)
    failed_shown = failed.head(max_failures)
    details = _fetch_details(parts, pd.concat([kept_shown, dropped_shown, failed_shown]), available)

    page = _Page(out_dir)
    page.summary(summary, rows_in_metadata=len(rows))
    page.histograms(rows, scores, thresholds)
    page.sweeps(rows, [c for c in scores if c in SWEEP_DIRECTIONS], thresholds)
    detail_of = lambda shown: details.loc[list(zip(shown["_part"], shown["_row"]))]  # noqa: E731
    kept_detail = detail_of(kept_shown)
    kept_images = _thumbnails_with_fallback(kept_detail, fs, root) if thumbnails else []
    page.thumbnails(
        "kept", f"Kept samples ({len(kept)})", kept_detail, kept_images, scores, thumbnails,
        note=f"highest {primary} first" if primary else "",
        empty="No sample was kept.",
    )
    dropped_detail = detail_of(dropped_shown)
    page.thumbnails(
        "dropped", f"Filtered samples ({len(filtered)})", dropped_detail,
        read_thumbnails(dropped_detail) if thumbnails else [], scores, thumbnails,
        note="each filter condition in turn", empty="No sample was filtered out.",
    )
    page.failures(detail_of(failed_shown), len(failed))

    _write_atomic(target, page.html())
    return target


def _report_path(path: str | os.PathLike) -> str:
    """``path``, or ``path/report.html`` where it names a directory."""
    path = os.fspath(path)
    target_fs, target = url_to_fs(path)
    if path.endswith("/") or target_fs.isdir(target):
        return full_url(target_fs, posixpath.join(target.rstrip("/"), REPORT))
    return path


# ----------------------------------------------------------------------------- reading the run


def _load_rows(parts: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Scores and status of every row, tagged with its part and row number (nothing else is read)."""
    available = list(read_parquet(parts[0]).columns)
    wanted = [c for c in available if c in _ROW_COLUMNS or c.endswith("_score")]
    frames = dask.compute(*read_parquet(parts, columns=wanted).to_delayed(), scheduler="threads")
    rows = pd.concat(
        [f.assign(_part=np.int32(i), _row=np.arange(len(f), dtype=np.int64)) for i, f in enumerate(frames)],
        ignore_index=True,
    )
    if "error" not in rows:
        rows["error"] = pd.Series(pd.NA, index=rows.index, dtype="string")
    if "kept" not in rows:
        rows["kept"] = rows["error"].isna()
    rows["kept"] = rows["kept"].fillna(False).astype(bool)
    if "drop_reason" not in rows:
        rows["drop_reason"] = pd.Series(pd.NA, index=rows.index, dtype="string")
    return rows, available


def _fetch_details(parts: list[str], shown: pd.DataFrame, available: list[str]) -> pd.DataFrame:
    """The descriptive columns of the rows shown on the page, read only from the parts they are in."""
    columns = [c for c in _DETAIL_COLUMNS if c in available]
    frames = []
    for part, group in shown.drop_duplicates(["_part", "_row"]).groupby("_part", sort=True):
        detail = read_parquet(parts[int(part)], columns=columns).compute(scheduler="sync").reset_index(drop=True)
        picked = detail.iloc[group["_row"].to_numpy()].reset_index(drop=True)
        frames.append(pd.concat([group.reset_index(drop=True), picked], axis=1))
    if not frames:
        out = shown.iloc[:0].copy()
        for c in columns:
            out[c] = pd.Series(dtype=object)
    else:
        out = pd.concat(frames, ignore_index=True)
    return out.set_index(["_part", "_row"], drop=False)


def _top(df: pd.DataFrame, column: str | None, n: int) -> pd.DataFrame:
    if column is None:
        return df.head(n)
    return df.sort_values(column, ascending=False, na_position="last", kind="stable").head(n)


def _round_robin(df: pd.DataFrame, by: str, column: str | None, n: int) -> pd.DataFrame:
    """Up to ``n`` rows taking each value of ``by`` in turn (best ``column`` first within each)."""
    ordered = _top(df, column, len(df))
    rank = ordered.groupby(by, dropna=False, sort=False).cumcount()
    return ordered.assign(_rank=rank).sort_values(["_rank"], kind="stable").head(n).drop(columns="_rank")


def _filter_thresholds(conditions) -> dict[str, list[tuple[str, float]]]:
    """``{column: [(op, value), ...]}`` for conditions of the form ``column OP number``."""
    from dask_imgcurator.stages.filters import Column, Compare, FilterSyntaxError, Number, parse_filter

    found: dict[str, list[tuple[str, float]]] = {}
    for text in conditions:
        try:
            node = parse_filter(str(text)).node
        except (FilterSyntaxError, TypeError):
            continue
        if not (isinstance(node, Compare) and len(node.ops) == 1 and node.ops[0] in _OPS):
            continue
        (left, right), op = node.operands, node.ops[0]
        if isinstance(left, Number) and isinstance(right, Column):  # "5 <= aesthetic_score"
            left, right, op = right, left, {">=": "<=", ">": "<", "<=": ">=", "<": ">"}[op]
        if isinstance(left, Column) and isinstance(right, Number) and not isinstance(right.value, bool):
            found.setdefault(left.name, []).append((op, float(right.value)))
    return found


# ----------------------------------------------------------------------------- images


def _image_bytes(df: pd.DataFrame) -> list[bytes | None]:
    """Each row's encoded image, read by offset (one open per shard); None where unreadable."""
    out: list[bytes | None] = [None] * len(df)
    if not len(df) or not {"shard", "image_offset", "image_nbytes"} <= set(df.columns):
        return out
    wanted: dict[str, list[tuple[int, int, int]]] = {}
    for i, (shard, offset, nbytes) in enumerate(zip(df["shard"], df["image_offset"], df["image_nbytes"])):
        if pd.isna(shard) or pd.isna(offset) or pd.isna(nbytes) or not 0 < int(nbytes) <= _MAX_THUMBNAIL_SOURCE_BYTES:
            continue
        wanted.setdefault(str(shard), []).append((i, int(offset), int(nbytes)))
    for shard, items in wanted.items():
        try:
            blobs = read_ranges(shard, [(offset, nbytes) for _, offset, nbytes in items])
        except Exception:  # a moved, deleted or truncated shard costs its thumbnails only
            continue
        for (i, _, _), blob in zip(items, blobs):
            out[i] = blob
    return out


def _thumbnail(blob: bytes, size: int) -> Image.Image | None:
    """Decode untrusted bytes to an RGB thumbnail (pixel limit checked from the header first)."""
    try:
        img, info = open_image(blob, DEFAULT_MAX_PIXELS)
        if info.format == "JPEG":
            img.draft("RGB", (size, size))
        if info.is_animated:
            img.seek(0)
        img.load()
        if img.mode.startswith("I") or img.mode == "F":
            arr = np.asarray(img, dtype=np.float64)
            top = 255.0 if info.bit_depth <= 8 else float((1 << min(info.bit_depth, 16)) - 1)
            img = Image.fromarray(np.round(np.clip(arr, 0, top) * 255.0 / top).astype(np.uint8))
        if info.has_alpha:
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        img = img.convert("RGB")
        img.thumbnail((size, size))
        return img
    except Exception:  # untrusted bytes: any failure means "no thumbnail", never a failed report
        return None


def _thumbnails_with_fallback(detail: pd.DataFrame, fs, root: str) -> list[Image.Image | None]:
    """Thumbnails of kept rows; those whose source shard is gone are read from the output shards."""
    images = read_thumbnails(detail)
    missing = [i for i, img in enumerate(images) if img is None]
    if not missing or not {"key", "shard"} <= set(detail.columns):
        return images
    # a sample is its source shard and key: with --rekey, keys repeat across source shards
    wanted = pd.MultiIndex.from_arrays([detail["shard"].iloc[missing].to_numpy(), detail["key"].iloc[missing].to_numpy()])
    try:
        located = _output_locations(fs, root, wanted)
    except Exception:  # the output shards' metadata is only a fallback
        return images
    again = located.reindex(wanted)
    for i, img in zip(missing, read_thumbnails(again.reset_index(drop=True))):
        images[i] = img
    return images


def _output_locations(fs, root: str, wanted: pd.MultiIndex) -> pd.DataFrame:
    """Where the samples ``wanted`` (source shard, source key) live in ``OUT/shards``: ``shard``,
    ``image_offset``, ``image_nbytes``, indexed like ``wanted``."""
    shard_dir = posixpath.join(root, "shards")
    keys = set(wanted.get_level_values(1))
    frames = []
    for path in files_matching(fs, shard_dir, "*.parquet"):
        names = read_parquet(full_url(fs, path)).columns
        key_col = "source_key" if "source_key" in names else "key"
        columns = [key_col, "source_shard", "image_offset", "image_nbytes"]
        df = read_parquet(full_url(fs, path), columns=columns).compute(scheduler="sync")
        df = df[df[key_col].isin(keys)]
        df = df[pd.MultiIndex.from_arrays([df["source_shard"].to_numpy(), df[key_col].to_numpy()]).isin(wanted)]
        if len(df):
            tar = full_url(fs, path[: -len(".parquet")] + ".tar")  # the tar beside it, wherever OUT now is
            frames.append(pd.DataFrame({"source_shard": df["source_shard"].to_numpy(), "key": df[key_col].to_numpy(),
                                        "shard": tar, "image_offset": df["image_offset"].to_numpy(),
                                        "image_nbytes": df["image_nbytes"].to_numpy()}))
    if not frames:
        return pd.DataFrame(columns=["shard", "image_offset", "image_nbytes"],
                            index=pd.MultiIndex.from_arrays([[], []], names=["source_shard", "key"]))
    return pd.concat(frames).drop_duplicates(["source_shard", "key"]).set_index(["source_shard", "key"])


def _jpeg_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_data_url(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- figures


def _nice_thresholds(values: np.ndarray, steps: int) -> np.ndarray:
    if values.size == 0:
        return np.zeros(0)
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return np.array([lo])
    ticks = MaxNLocator(nbins=max(1, steps), steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
    ticks = np.array([float(f"{t:.12g}") for t in ticks])  # 5.0760000000000005 -> 5.076, as a filter reads
    ticks = ticks[(ticks >= lo) & (ticks <= hi)]
    return np.unique(np.concatenate([[lo], ticks, [hi]])) if ticks.size < 2 else ticks


def _histogram_figure(rows: pd.DataFrame, scores: list[str], thresholds: dict) -> Figure:
    fig = Figure(figsize=(4.6 * len(scores), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(scores), squeeze=False)).ravel()
    scored = rows[rows["error"].isna()]
    for ax, col in zip(axes, scores):
        values = pd.to_numeric(scored[col], errors="coerce").astype("float64")
        finite = np.isfinite(values.to_numpy())
        kept = values[finite & scored["kept"].to_numpy()].to_numpy()
        dropped = values[finite & ~scored["kept"].to_numpy()].to_numpy()
        if finite.sum() == 0:
            ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
        else:
            bins = np.histogram_bin_edges(values[finite].to_numpy(), bins=min(40, max(5, int(finite.sum() ** 0.5) * 2)))
            ax.hist([kept, dropped], bins=bins, stacked=True, color=[_KEPT_COLOUR, _DROPPED_COLOUR],
                    label=[f"kept ({kept.size})", f"filtered ({dropped.size})"])
            for op, value in thresholds.get(col, []):
                ax.axvline(value, color=_LINE_COLOUR, linestyle="--", linewidth=1.2, label=f"filter: {op} {value:g}")
            ax.legend(fontsize=8)
        ax.set_title(col)
        ax.set_xlabel("score")
        ax.set_ylabel("samples")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.locator_params(axis="x", nbins=6)
    return fig


def _sweep_figure(sweeps: dict[str, tuple[str, pd.DataFrame]], thresholds: dict) -> Figure:
    fig = Figure(figsize=(4.6 * len(sweeps), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(sweeps), squeeze=False)).ravel()
    for ax, (col, (op, table)) in zip(axes, sweeps.items()):
        ax.plot(table["threshold"], table["surviving"], marker="o", color=_KEPT_COLOUR)
        for f_op, value in thresholds.get(col, []):
            ax.axvline(value, color=_LINE_COLOUR, linestyle="--", linewidth=1.2, label=f"filter: {f_op} {value:g}")
        if thresholds.get(col):
            ax.legend(fontsize=8)
        ax.set_title(f"samples with {col} {op} t")
        ax.set_xlabel("threshold t")
        ax.set_ylabel("surviving samples")
        ax.set_ylim(bottom=0)
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.locator_params(axis="x", nbins=6)
    return fig


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1200px;
       color: #222; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em;
       border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.path { color: #666; font-family: monospace; word-break: break-all; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.sub th { font-weight: normal; padding-left: 28px; color: #444; }
tr.bad td { background: #fde2e1; font-weight: bold; }
img.figure { max-width: 100%; display: block; margin: 8px 0; }
.sweeps { display: flex; gap: 24px; flex-wrap: wrap; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure.thumb { margin: 0; width: 170px; font-size: 0.75em; }
figure.thumb img { width: 160px; height: 160px; object-fit: contain; background: #f4f4f4; display: block; }
figure.thumb .missing { width: 160px; height: 160px; background: #eee; color: #888; display: flex;
       align-items: center; justify-content: center; }
figcaption { margin-top: 3px; overflow-wrap: anywhere; }
figcaption .key { font-family: monospace; font-weight: bold; }
figcaption .reason { color: #a33; }
td.error { font-family: monospace; white-space: pre-wrap; overflow-wrap: anywhere; max-width: 640px; }
.note { color: #666; font-size: 0.9em; }
"""


def _text(value) -> str:
    """A cell as text; missing values (None, NA, NaN) are empty."""
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def _e(value) -> str:
    """Escape any value for HTML text or attributes (data is untrusted)."""
    return html.escape(_text(value))


def _fmt_value(column: str, value) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return f"{column}: -" if column != "key" else "-"
    if isinstance(value, (float, np.floating)):
        return f"{column}: {float(value):.6g}"
    return str(value) if column == "key" else f"{column}: {value}"


def _shorten(value, limit: int = 140) -> str:
    text = _text(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _keeps_high(op: str) -> bool:
    return op in (">", ">=")


class _Page:
    """Collects the sections of the report; every data value goes through :func:`_e`."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def summary(self, summary: dict, rows_in_metadata: int) -> None:
        filtered = summary.get("filtered", {}) or {}
        failed = summary.get("failed", {}) or {}
        n_in = int(summary.get("samples_in", rows_in_metadata))
        pct = lambda n: f" ({100 * n / n_in:.1f}%)" if n_in else ""  # noqa: E731
        rows = [("samples_in", "samples in", n_in, "")]
        rows.append(("kept", "kept", int(summary.get("kept", 0)), pct(int(summary.get("kept", 0)))))
        n_filtered = sum(int(v) for v in filtered.values())
        rows.append(("filtered", "filtered", n_filtered, pct(n_filtered)))
        self.add('<section id="summary"><h2>Summary</h2><table id="summary-table">')
        for key, name, n, extra in rows:
            self.add(f'<tr data-count="{key}"><th>{name}</th><td class="num">{n}{_e(extra)}</td></tr>')
            if key == "filtered":
                for cond, count in sorted(filtered.items()):
                    self.add(f'<tr class="sub" data-filter="{_e(cond)}"><th>by {_e(cond)}</th>'
                             f'<td class="num">{int(count)}</td></tr>')
        n_failed = sum(int(v) for v in failed.values())
        self.add(f'<tr data-count="failed"><th>failed</th><td class="num">{n_failed}{_e(pct(n_failed))}</td></tr>')
        for kind, count in sorted(failed.items()):
            self.add(f'<tr class="sub" data-failure="{_e(kind)}"><th>{_e(kind)}</th>'
                     f'<td class="num">{int(count)}</td></tr>')
        written = (f'{counted(int(summary.get("written", 0)), "sample")}'
                   f' in {counted(int(summary.get("shards", 0)), "shard")}')
        self.add(f'<tr data-count="written"><th>written</th><td class="num">{written}</td></tr>')
        unreadable = int(summary.get("unreadable_shards", 0))
        if unreadable:
            self.add(f'<tr data-count="unreadable_shards"><th>unreadable shards</th><td class="num">{unreadable}'
                     ' (error rows with an empty key)</td></tr>')
        rows_expected = n_in + unreadable  # one row per sample, plus one per unreadable shard
        balanced = bool(summary.get("balanced", False)) and rows_in_metadata == rows_expected
        self.add(f'<tr data-count="balanced"{"" if balanced else " class=bad"}><th>in = kept + filtered + failed</th>'
                 f'<td>{"yes" if balanced else "NO: see summary.json"}</td></tr>')
        self.add("</table>")
        if rows_in_metadata != rows_expected:
            self.add(f'<p class="note">The metadata holds {rows_in_metadata} rows, summary.json counts {rows_expected}.</p>')
        self.add("</section>")

    def histograms(self, rows: pd.DataFrame, scores: list[str], thresholds: dict) -> None:
        self.add('<section id="histograms"><h2>Score distributions</h2>')
        if not scores:
            self.add('<p class="note">This run has no score columns (no model was run).</p></section>')
            return
        fig = _histogram_figure(rows, scores, thresholds)
        alt = "histograms of " + ", ".join(scores)
        self.add(f'<img class="figure" id="histogram-figure" alt="{_e(alt)}" src="{_png_data_url(fig)}">')
        self.add('<p class="note">Samples with a score, kept and filtered stacked; dashed lines are the filter'
                 " thresholds.</p></section>")

    def sweeps(self, rows: pd.DataFrame, columns: list[str], thresholds: dict) -> None:
        scored = rows[rows["error"].isna()]
        sweeps = {}
        for col in columns:
            op = thresholds[col][0][0] if thresholds.get(col) else SWEEP_DIRECTIONS[col]
            extra = [v for _, v in thresholds.get(col, [])]
            values = scored[col]
            table = threshold_sweep(values, np.concatenate([_nice_thresholds(_finite(values), 10), extra]), keep=op)
            if len(table) and _finite(values).size:
                sweeps[col] = (op, table)
        if not sweeps:
            return
        self.add('<section id="sweep"><h2>Threshold sweep</h2>'
                 '<p class="note">How many of the scored samples pass each threshold, one score at a time.</p>')
        src = _png_data_url(_sweep_figure(sweeps, thresholds))
        self.add(f'<img class="figure" id="sweep-figure" alt="threshold sweep" src="{src}">')
        self.add('<div class="sweeps">')
        # a filter's threshold is marked in the table of its own direction only: under "aesthetic_score >="
        # the count at a "<" filter's value is what that filter dropped, not what survived it
        chosen = {col: {v for o, v in thresholds.get(col, []) if _keeps_high(o) == _keeps_high(op)}
                  for col, (op, _) in sweeps.items()}
        for col, (op, table) in sweeps.items():
            self.add(f'<table class="sweep" data-column="{_e(col)}"><tr><th>{_e(col)} {_e(op)}</th>'
                     "<th>surviving</th><th>share</th></tr>")
            for t, n, frac in table.itertuples(index=False):
                mark = ' class="chosen"' if t in chosen[col] else ""
                self.add(f'<tr{mark}><td class="num">{t:.6g}{" (filter)" if mark else ""}</td>'
                         f'<td class="num">{int(n)}</td><td class="num">{100 * frac:.1f}%</td></tr>')
            self.add("</table>")
        self.add("</div></section>")

    def thumbnails(self, section: str, heading: str, detail: pd.DataFrame, images: list, scores: list[str],
                   limit: int, *, note: str, empty: str) -> None:
        self.add(f'<section id="{section}"><h2>{_e(heading)}</h2>')
        if not len(detail):
            self.add(f'<p class="note">{_e(empty if limit else "Thumbnails are turned off.")}</p></section>')
            return
        self.add(f'<p class="note">Showing {len(detail)}: {_e(note)}.</p><div class="grid">')
        for (_, row), img in zip(detail.iterrows(), images):
            lines = [f'<span class="key">{_e(row.get("key"))}</span>']
            lines += [_e(_fmt_value(c, row.get(c))) for c in scores]
            if section == "dropped" and not pd.isna(row.get("drop_reason")):
                lines.append(f'<span class="reason">failed: {_e(row.get("drop_reason"))}</span>')
            caption = row.get("caption")
            if caption is not None and not pd.isna(caption):
                lines.append(f'<span class="caption" title="{_e(caption)}">{_e(_shorten(caption))}</span>')
            if img is None:
                picture = '<div class="missing">image unavailable</div>'
            else:
                picture = f'<img alt="{_e(row.get("key"))}" src="{_jpeg_data_url(img)}">'
            self.add(f'<figure class="thumb">{picture}<figcaption>{"<br>".join(lines)}</figcaption></figure>')
        self.add("</div></section>")

    def failures(self, detail: pd.DataFrame, total: int) -> None:
        self.add(f'<section id="failures"><h2>Failed samples ({total})</h2>')
        if total == 0:
            self.add('<p class="note">No sample failed.</p></section>')
            return
        if len(detail) < total:
            self.add(f'<p class="note">Showing the first {len(detail)} of {total}.</p>')
        self.add('<table id="failures-table"><tr><th>key</th><th>shard</th><th>kind</th><th>error</th></tr>')
        for _, row in detail.iterrows():
            error = row.get("error")
            shard = _text(row.get("shard"))
            self.add(f'<tr><td>{_e(row.get("key"))}</td><td title="{_e(shard)}">{_e(posixpath.basename(shard))}</td>'
                     f'<td>{_e(error_kind(str(error), _text(row.get("key"))))}</td><td class="error">{_e(error)}</td></tr>')
        self.add("</table></section>")

    def html(self) -> str:
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>imgcurator report: {_e(self.out_dir)}</title><style>{_CSS}</style></head><body>"
            f'<h1>imgcurator report</h1><div class="path">{_e(self.out_dir)}</div>'
            + "\n".join(self.parts)
            + "</body></html>\n"
        )


def _finite(values: pd.Series) -> np.ndarray:
    arr = np.asarray(pd.to_numeric(values, errors="coerce"), dtype=np.float64)
    return arr[np.isfinite(arr)]


def _write_atomic(target: str, text: str) -> None:
    """Write under a temporary name beside ``target``, then rename (readers never see half a page)."""
    fs, path = url_to_fs(target)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open(tmp, "wb") as f:
            f.write(text.encode("utf-8"))
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
