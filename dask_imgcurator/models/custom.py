"""Custom embedding models: any torch image encoder, built on the worker by a factory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from dask.base import tokenize

from ..decode.base import PreprocessSpec
from .cache import get_cached
from .encoder import LoadedModel, ModelInfo
from .store import absolute_dirs
from .tokens import stable_token
from ..decode.preprocess import preprocess_spec_from_open_clip

EncoderFactory = Callable[[], torch.nn.Module | Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class CustomModel:
    """A user-supplied image encoder; holds only the factory, never a built model.

    Build one with ``custom_model``. ``name`` identifies the model in the per-worker
    cache and is its ``head_family``: heads are looked up as ``heads/<head>/<name>.*``.
    ``model_dir``/``cache_dir``/``offline`` say where such head weights live.
    """

    name: str
    factory: EncoderFactory
    preprocess: PreprocessSpec
    embed_dim: int
    model_dir: str | None = None
    cache_dir: str | None = None
    offline: bool | None = None
    #: Identifies factory and preprocessing in the per-worker cache and in a run's fingerprint, the
    #: same in every process (see :func:`~dask_imgcurator.models.tokens.stable_token`); taken once
    #: (see ``HeadSpec.token``).
    token: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        absolute_dirs(self, "model_dir", "cache_dir")
        object.__setattr__(self, "token", tokenize(stable_token(self.factory), self.preprocess))

    def __dask_tokenize__(self) -> tuple:
        # not where heads' weights are looked for: EmbedConfig's token takes their files' versions
        return ("CustomModel", self.name, self.token, self.embed_dim)

    @property
    def head_family(self) -> str:
        """Embedding space for ``load_head``'s ``clip_name``: the model's name."""
        return self.name

    def store_kwargs(self) -> dict[str, Any]:
        """``model_dir``, ``cache_dir`` and ``offline``, as ``load_head`` takes them."""
        return {"model_dir": self.model_dir, "cache_dir": self.cache_dir, "offline": self.offline}

    def info(self) -> ModelInfo:
        """Name, embedding width and preprocessing."""
        return ModelInfo(self.name, self.embed_dim, self.preprocess)

    def load(self, device: str = "cpu", precision: str = "fp32") -> LoadedModel:
        """Run the factory (once per worker, device and precision) and wrap its result."""
        # the factory and preprocessing are part of the key: a name reused for another model
        # (or a fixed factory) must not get the first one's cached encoder
        key = ("custom", self.name, self.token, self.embed_dim, str(device), precision)
        return get_cached(key, lambda: LoadedModel(self.factory(), self.info(), device, precision))


def custom_model(
    factory: EncoderFactory, preprocess: PreprocessSpec | Any, embed_dim: int, name: str
) -> CustomModel:
    """Describe a custom embedding model for the embed stage.

    Parameters
    ----------
    factory : callable
        No-argument function returning an ``nn.Module`` (or function) that maps
        (N, 3, S, S) float32 pixels to (N, embed_dim) features. It runs on the workers;
        it must be picklable (a module-level function or ``functools.partial``).
    preprocess : PreprocessSpec or torchvision-style transform
        How images are prepared; an open_clip/torchvision ``Compose`` is converted.
    embed_dim : int
        Output width D. Outputs are L2-normalised.
    name : str
        Unique name (output metadata, cache key and head family).
    """
    spec = preprocess if isinstance(preprocess, PreprocessSpec) else preprocess_spec_from_open_clip(preprocess)
    return CustomModel(name=name, factory=factory, preprocess=spec, embed_dim=embed_dim)
