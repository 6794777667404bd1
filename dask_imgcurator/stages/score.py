"""The score stage: run heads on an existing ``embedding`` column (e.g. Parquet written earlier)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import dask.dataframe as dd
from dask.base import tokenize
import numpy as np
import pandas as pd
import torch

from dask_imgcurator.backend import apply_torch_threads, from_pandas_like, to_pandas, worker_device
from dask_imgcurator.models import HeadSpec, head_spec, load_head
from dask_imgcurator.models.heads import head_weights_version
from dask_imgcurator.models.store import WHERE_WEIGHTS_ARE, absolute_dirs
from dask_imgcurator.schema import embedding_matrix
from dask_imgcurator.stages.embed import score_columns

__all__ = ["score", "score_partition", "ScoreConfig"]


@dataclass(frozen=True)
class ScoreConfig:
    """Which heads to run and where their weights come from; configuration only."""

    heads: tuple[HeadSpec, ...]
    clip_name: str
    model_dir: str | None = None
    cache_dir: str | None = None
    offline: bool | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        absolute_dirs(self, "model_dir", "cache_dir")

    def __dask_tokenize__(self) -> tuple:
        # the heads' weights files (saved over at the same paths, they make another run), not the
        # folders they are found in (see files_version) nor whether downloads are allowed
        heads = head_weights_version([h.name for h in self.heads], self.clip_name, self.model_dir, self.cache_dir)
        fields = [getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in WHERE_WEIGHTS_ARE]
        return tokenize("ScoreConfig", *fields, heads)  # dask does not recurse


def score(
    ddf: dd.DataFrame,
    heads: Sequence[str | HeadSpec] = ("aesthetic", "nsfw"),
    *,
    clip_name: str = "ViT-L-14-openai",
    model_dir: str | None = None,
    cache_dir: str | None = None,
    offline: bool | None = None,
    device: str = "auto",
) -> dd.DataFrame:
    """Add ``<head>_score`` columns computed from the ``embedding`` column (lazy).

    Parameters
    ----------
    ddf : dask.dataframe.DataFrame
        Must hold an ``embedding`` column (L2-normalised CLIP image embeddings, e.g. from
        :func:`embed` or a Parquet file it wrote). Null embeddings get NaN scores.
    heads : sequence of str or HeadSpec
        Registered heads to run.
    clip_name : str
        The CLIP model family the embeddings come from, as heads are trained per family
        (``ClipRef.head_family``: ``"ViT-L-14-openai"``, or the tiny model's slug).
    model_dir, cache_dir, offline :
        Where head weights are looked up.
    device : {"auto", "cpu", "cuda"}

    Returns
    -------
    dask.dataframe.DataFrame

    Raises
    ------
    ValueError
        (at compute time) when the embeddings are not as wide as a head expects; the message
        names both widths.
    """
    if "embedding" not in ddf.columns:
        raise ValueError("score() needs an 'embedding' column; run embed() first or read Parquet that has one")
    specs = tuple(head_spec(h) if isinstance(h, str) else h for h in heads)
    config = ScoreConfig(specs, clip_name, model_dir, cache_dir, offline, device)
    columns = score_columns([s.name for s in specs])
    meta = ddf._meta.assign(**{n: pd.Series([], dtype=t) for n, t in columns.items()})
    return ddf.map_partitions(score_partition, config, meta=meta, align_dataframes=False)


def score_partition(df, config: ScoreConfig):
    """Score one partition; see :func:`score`."""
    apply_torch_threads()
    frame = to_pandas(df).copy()
    device = worker_device() if config.device == "auto" else config.device
    valid = frame["embedding"].notna().to_numpy()
    matrix = embedding_matrix(frame["embedding"]) if len(frame) else np.zeros((0, 0), np.float32)
    for spec in config.heads:
        values = np.full(len(frame), np.nan, dtype=np.float32)
        if valid.any():
            head = load_head(spec, matrix.shape[1], config.clip_name, model_dir=config.model_dir,
                             cache_dir=config.cache_dir, offline=config.offline, device=device)
            with torch.inference_mode():
                values[valid] = head(torch.from_numpy(matrix[valid]).to(device)).float().cpu().numpy()
        frame[f"{spec.name}_score"] = values
    return from_pandas_like(df, frame)
