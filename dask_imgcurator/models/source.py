"""What the embed stage accepts as a model: text, a ``ClipRef`` or a ``CustomModel``."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from .custom import CustomModel
from .encoder import LoadedModel, ModelInfo
from .ref import ClipRef


class ModelSource(Protocol):
    """A picklable model description that loads on the worker (``ClipRef``, ``CustomModel``)."""

    @property
    def head_family(self) -> str:
        """Embedding space name passed to ``load_head`` as ``clip_name``."""
        ...

    def store_kwargs(self) -> dict[str, Any]:
        """Where weights are stored, as ``load_head`` keywords."""
        ...

    def info(self) -> ModelInfo:
        """Name, embedding width and preprocessing, without loading weights."""
        ...

    def load(self, device: str = "cpu", precision: str = "fp32") -> LoadedModel:
        """The encoder on ``device``; cached per worker."""
        ...


def as_model_source(
    model: str | ClipRef | CustomModel,
    model_dir: str | None = None,
    cache_dir: str | None = None,
    offline: bool | None = None,
) -> ClipRef | CustomModel:
    """Turn ``model`` into a ``ModelSource``, filling storage settings it leaves unset.

    Parameters
    ----------
    model : str, ClipRef or CustomModel
        Text is parsed with ``ClipRef.parse``.
    model_dir, cache_dir, offline :
        Used where ``model`` does not set them itself.
    """
    given = {"model_dir": model_dir, "cache_dir": cache_dir, "offline": offline}
    if isinstance(model, str):
        return ClipRef.parse(model, **given)
    if not isinstance(model, (ClipRef, CustomModel)):
        raise TypeError(f"expected model text, a ClipRef or a custom_model(...), got {type(model).__name__}")
    unset = {k: v for k, v in given.items() if getattr(model, k) is None and v is not None}
    return dataclasses.replace(model, **unset)
