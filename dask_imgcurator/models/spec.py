"""Turn open_clip preprocessing descriptions into a ``PreprocessSpec``."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from ..decode.base import PreprocessSpec

_INTERPOLATIONS = ("bicubic", "bilinear")


def spec_from_cfg(cfg: Mapping[str, Any]) -> PreprocessSpec:
    """``PreprocessSpec`` from an open_clip ``preprocess_cfg`` dict (``model.visual.preprocess_cfg``).

    Raises
    ------
    ValueError
        Non-square size or an interpolation other than bicubic/bilinear.
    """
    if cfg.get("resize_mode", "shortest") != "shortest":
        warnings.warn(
            f"model expects resize_mode={cfg['resize_mode']!r}; images will be resized on the "
            "shorter side and center-cropped instead",
            stacklevel=2,
        )
    return _spec(cfg["size"], cfg.get("interpolation", "bicubic"), cfg["mean"], cfg["std"])


def spec_from_transform(transform: Any) -> PreprocessSpec:
    """``PreprocessSpec`` from a torchvision-style transform (as open_clip returns).

    Reads the ``Resize`` interpolation, the ``CenterCrop`` (else ``Resize``) size and the
    ``Normalize`` mean/std of a ``Compose`` (or of a single transform).
    """
    found: dict[str, Any] = {"interpolation": "bicubic"}
    for t in getattr(transform, "transforms", [transform]):
        kind = type(t).__name__
        if kind == "Resize":
            found.setdefault("size", t.size)
            found["interpolation"] = getattr(t.interpolation, "value", t.interpolation)
        elif kind == "CenterCrop":
            found["size"] = t.size
        elif kind == "Normalize":
            found["mean"], found["std"] = t.mean, t.std
    missing = {"size", "mean", "std"} - found.keys()
    if missing:
        raise ValueError(f"cannot read {sorted(missing)} from transform {transform!r}; pass a PreprocessSpec")
    return _spec(found["size"], found["interpolation"], found["mean"], found["std"])


def _spec(size: Any, interpolation: str, mean: Any, std: Any) -> PreprocessSpec:
    if not isinstance(size, int):
        sizes = set(size)
        if len(sizes) != 1:
            raise ValueError(f"only square inputs are supported, got size {tuple(size)}")
        (size,) = sizes
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"unsupported interpolation {interpolation!r}; expected one of {_INTERPOLATIONS}")
    return PreprocessSpec(
        size=int(size),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        interpolation=interpolation,
    )
