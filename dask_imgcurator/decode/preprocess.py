"""The resize + center-crop geometry, and building a PreprocessSpec from an open_clip model or transform."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dask_imgcurator.decode.base import PreprocessSpec

__all__ = ["crop_box", "crop_offset", "preprocess_spec_from_open_clip", "resized_size"]

_INTERPOLATIONS = ("bicubic", "bilinear")


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Size after torchvision's ``Resize(size)``: shorter side ``size``, longer side truncated.

    Returns
    -------
    (new_width, new_height) : tuple of int
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def crop_offset(width: int, height: int, size: int) -> tuple[int, int]:
    """Top-left corner of torchvision's ``CenterCrop(size)`` in an image of this size.

    Returns
    -------
    (left, top) : tuple of int
    """
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """Source region that ``Resize(size)`` followed by ``CenterCrop(size)`` turns into the output.

    Resizing just this box to ``size x size`` has the same geometry as resizing the whole
    image and cropping, without computing pixels that the crop throws away.

    Parameters
    ----------
    width, height : int
        Original image size.
    size : int
        Output side.

    Returns
    -------
    (left, top, right, bottom) : tuple of float
        In source pixel coordinates.
    """
    new_w, new_h = resized_size(width, height, size)
    left, top = crop_offset(new_w, new_h, size)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def preprocess_spec_from_open_clip(transform_or_model: Any) -> PreprocessSpec:
    """Build the :class:`PreprocessSpec` that matches an open_clip model's eval preprocessing.

    Parameters
    ----------
    transform_or_model
        An open_clip model (its ``visual.preprocess_cfg`` is read), a preprocess-cfg mapping,
        or an eval transform: a torchvision ``Compose`` holding ``Resize``, ``CenterCrop`` and
        ``Normalize``, as ``open_clip.create_model_and_transforms`` returns.

    Returns
    -------
    PreprocessSpec

    Raises
    ------
    ValueError
        Preprocessing other than "resize the shorter side, center crop a square" (open_clip's
        ``resize_mode="shortest"``), or a transform whose parts cannot be found.
    """
    if hasattr(transform_or_model, "transforms"):
        return _spec_from_compose(transform_or_model.transforms)
    if isinstance(transform_or_model, Mapping):
        return _spec_from_cfg(transform_or_model)
    visual = getattr(transform_or_model, "visual", transform_or_model)
    cfg = getattr(visual, "preprocess_cfg", None)
    if cfg:
        return _spec_from_cfg(cfg)
    if hasattr(visual, "image_mean"):  # open_clip models from before preprocess_cfg existed
        return _spec_from_cfg({"size": visual.image_size, "mean": visual.image_mean, "std": visual.image_std})
    raise ValueError(
        f"cannot find preprocessing in {type(transform_or_model).__name__}: expected an open_clip model, "
        "a preprocess_cfg mapping, or a Compose of Resize/CenterCrop/Normalize"
    )


def _spec_from_cfg(cfg: Mapping[str, Any]) -> PreprocessSpec:
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode != "shortest":
        raise ValueError(
            f"open_clip resize_mode {resize_mode!r} is not supported; only 'shortest' "
            "(resize the shorter side, then center crop) is"
        )
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation == "random":  # open_clip itself evaluates "random" as bicubic
        interpolation = "bicubic"
    return _make_spec(_square_side(cfg.get("size", 224)), cfg.get("mean"), cfg.get("std"), interpolation)


def _spec_from_compose(transforms: list[Any]) -> PreprocessSpec:
    from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize
    from torchvision.transforms import v2

    resize = _find(transforms, (Resize, v2.Resize), "Resize")
    resize_sizes = [resize.size] if isinstance(resize.size, int) else list(resize.size)
    if len(resize_sizes) != 1:
        raise ValueError(f"Resize(size={resize.size}) squashes to a fixed shape; only shorter-side resizing is supported")
    if getattr(resize, "max_size", None) is not None:
        raise ValueError("Resize with max_size is not supported")
    crop = _find(transforms, (CenterCrop, v2.CenterCrop), "CenterCrop")
    normalize = _find(transforms, (Normalize, v2.Normalize), "Normalize")
    side = _square_side(crop.size)
    if side != resize_sizes[0]:
        raise ValueError(
            f"Resize({resize_sizes[0]}) followed by CenterCrop({side}) is not supported; the sides must match"
        )
    if not isinstance(resize.interpolation, InterpolationMode):
        raise ValueError(f"unsupported Resize interpolation {resize.interpolation!r}")
    return _make_spec(side, normalize.mean, normalize.std, resize.interpolation.value)


def _find(transforms: list[Any], types: tuple[type, ...], name: str) -> Any:
    found = [t for t in transforms if isinstance(t, types)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one {name} in the transform, found {len(found)}")
    return found[0]


def _square_side(size: Any) -> int:
    if isinstance(size, int):
        return size
    sides = list(size)
    if len(sides) == 1 or (len(sides) == 2 and sides[0] == sides[1]):
        return int(sides[0])
    raise ValueError(f"non-square output size {tuple(sides)} is not supported")


def _make_spec(size: int, mean: Any, std: Any, interpolation: str) -> PreprocessSpec:
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} is not supported; use one of {_INTERPOLATIONS}")
    defaults = PreprocessSpec()
    return PreprocessSpec(
        size=size,
        mean=_triple(mean) if mean is not None else defaults.mean,
        std=_triple(std) if std is not None else defaults.std,
        interpolation=interpolation,
    )


def _triple(values: Any) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"expected 3 per-channel values, got {out}")
    return out  # type: ignore[return-value]
