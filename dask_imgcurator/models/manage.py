"""Prepare model dirs for offline use and list what is available."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip

from .clip import CONFIG_FILE, _read_config, check_checkpoint_fits, clip_dir, clip_info, is_clip_dir
from .heads import head_entry, head_weights
from .ref import HF_HUB_PREFIX, HF_HUB_SLUG_PREFIX, LOCAL_DIR_PREFIX, ClipRef
from .store import KNOWN_HEAD_WEIGHTS, WEIGHT_SUFFIXES, DamagedWeightsError, is_offline, locate, search_roots

DEFAULT_CLIP = "ViT-L-14/openai"
DEFAULT_HEADS = ("aesthetic", "nsfw")


def download_models(
    model_dir: str | os.PathLike,
    clip: str | ClipRef = DEFAULT_CLIP,
    heads: Sequence[str] = DEFAULT_HEADS,
) -> list[Path]:
    """Download a CLIP model and its heads into ``model_dir`` for use without internet.

    ``model_dir`` gets the same layout as the cache (``clip/<slug>/`` as an open_clip
    local dir, ``heads/<head>/<slug>.*``); copy it to the offline machine and pass it as
    ``model_dir``. Files already present are kept.

    Parameters
    ----------
    model_dir : path
        Directory to fill (created if needed).
    clip : str or ClipRef
        CLIP model, e.g. ``"ViT-L-14/openai"`` or ``"hf-hub:org/repo"``.
    heads : sequence of str
        Heads with known weights for that model (see ``KNOWN_HEAD_WEIGHTS``).

    Returns
    -------
    list of Path
        The CLIP directory, then one weights file per head.
    """
    ref = clip if isinstance(clip, ClipRef) else ClipRef.parse(clip)
    if ref.kind not in ("tag", "hf-hub"):
        raise ValueError(f"{ref} is already local; only open_clip tags and hf-hub: models are downloaded")
    target = dataclasses.replace(ref, model_dir=None, cache_dir=str(model_dir))
    return [clip_dir(target)] + [head_weights(h, target.head_family, **target.store_kwargs()) for h in heads]


@dataclass(frozen=True)
class ModelRow:
    """One model in ``list_models``.

    ``kind`` is ``"clip"`` or ``"head"``; ``name`` the CLIP slug or ``head/slug``;
    ``location`` the local path (None: not present); ``source`` where it downloads from;
    ``model`` (CLIP rows only) the text to pass as ``--model`` / ``ClipRef.parse``;
    ``problem`` why a present folder cannot be used (its config is damaged), also noted
    after the path in ``location``.
    """

    kind: str
    name: str
    embed_dim: int | None
    location: str | None
    source: str
    model: str | None = None
    problem: str | None = None


def list_models(
    model_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> list[ModelRow]:
    """Known downloadable models plus everything present in ``model_dir`` and the cache.

    Where a model is in both, ``location`` is the one used (``model_dir`` first).
    """
    default = ClipRef.parse(DEFAULT_CLIP)
    rows = {
        ("clip", default.slug): ModelRow(
            "clip", default.slug, clip_info(default).embed_dim, None, f"open_clip {default}", str(default)
        )
    }
    for (head, slug), entry in KNOWN_HEAD_WEIGHTS.items():
        sources = " | ".join(str(s) for s in entry.sources)
        rows["head", f"{head}/{slug}"] = ModelRow("head", f"{head}/{slug}", entry.embed_dim, None, sources)
    for root in reversed(search_roots(model_dir, cache_dir)):
        for path in sorted((root / "clip").glob("*")):
            if is_clip_dir(path):
                dim, problem = None, None
                try:
                    dim = int(_read_config(path)["model_cfg"]["embed_dim"])
                except DamagedWeightsError as err:
                    problem = str(err)
                except (KeyError, TypeError, ValueError):
                    problem = f"{path / CONFIG_FILE} is damaged: it has no model_cfg.embed_dim"
                _present(rows, "clip", path.name, dim, path, model=model_text(path), problem=problem)
        for path in sorted((root / "heads").glob("*/*")):
            if path.suffix in WEIGHT_SUFFIXES:
                _present(rows, "head", f"{path.parent.name}/{path.stem}", None, path)
    dims = {row.name: row.embed_dim for row in rows.values() if row.kind == "clip"}
    return [
        dataclasses.replace(row, embed_dim=dims.get(row.name.split("/", 1)[1]))
        if row.kind == "head" and row.embed_dim is None
        else row
        for row in rows.values()
    ]


def model_text(clip_dir: Path) -> str:
    """What to pass as ``--model`` for the CLIP folder ``clip_dir`` of a model dir or cache.

    Folders are named by ``ClipRef.slug`` (``ViT-L-14-openai``), which joins architecture and tag
    with a hyphen that architecture names contain too; the longest known architecture that
    round-trips wins. A folder no name explains is given as ``local-dir:PATH``.

    >>> model_text(Path("models/clip/ViT-B-32-quickgelu-openai"))
    'ViT-B-32-quickgelu/openai'
    >>> model_text(Path("models/clip/hf-hub-laion--CLIP-ViT-B-32"))
    'hf-hub:laion/CLIP-ViT-B-32'
    """
    from .tiny import TINY_NAME

    slug = clip_dir.name
    if slug.startswith(HF_HUB_SLUG_PREFIX):
        candidates = [HF_HUB_PREFIX + slug[len(HF_HUB_SLUG_PREFIX):].replace("--", "/", 1)]
    else:
        names = sorted((n for n in (*open_clip.list_models(), TINY_NAME) if slug.startswith(n + "-")), key=len)
        candidates = [f"{name}/{slug[len(name) + 1:]}" for name in reversed(names)]
    for text in candidates:
        try:
            if ClipRef.parse(text).slug == slug:
                return text
        except ValueError:
            continue
    return LOCAL_DIR_PREFIX + str(clip_dir)


def _present(
    rows: dict, kind: str, name: str, dim: int | None, path: Path, model: str | None = None,
    problem: str | None = None,
) -> None:
    location = str(path)
    if problem is not None:
        location += f" (DAMAGED: {CONFIG_FILE} unreadable; re-download or replace it)"
    old = rows.get((kind, name))
    if old is None:
        rows[kind, name] = ModelRow(kind, name, dim, location, "local only", model, problem)
    else:
        rows[kind, name] = dataclasses.replace(
            old, location=location, embed_dim=old.embed_dim or dim, problem=problem
        )


def check_weights(ref: ClipRef, heads: Sequence[str]) -> None:
    """Fail now, on the client, when the weights of ``ref`` or its built-in heads cannot be had.

    Without this the error would only surface from inside the first worker task, after a cluster
    started, wrapped in the scheduler's task-failure log. Nothing is downloaded here: what is not
    present locally must be downloadable (a pretrained tag open_clip knows, a head with a known
    source) and downloads must be allowed. ``hf-hub:`` models online and custom heads (built by
    their own factories) are left to the workers.

    Parameters
    ----------
    ref : ClipRef
        The CLIP model and where its weights are stored.
    heads : sequence of str
        Head names; only ``"aesthetic"`` and ``"nsfw"`` are checked.

    Raises
    ------
    ValueError
        Unknown open_clip architecture or pretrained tag, with no local copy; a checkpoint file of
        another architecture.
    WeightsNotFoundError
        Weights missing locally that cannot (or may not) be downloaded.
    """
    if is_offline(ref.offline) and ref.kind != "file":
        clip_dir(ref)  # offline it only looks locally: raises when missing
    elif ref.kind != "hf-hub":  # online, clip_info would fetch an hf-hub config
        clip_info(ref)  # raises for a missing local dir or checkpoint, an unknown architecture or tag
    check_checkpoint_fits(ref)
    for head in heads:
        if head in DEFAULT_HEADS:
            locate(head_entry(head, ref.head_family), **ref.store_kwargs())

