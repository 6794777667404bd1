"""Score heads on CLIP embeddings: LAION aesthetic and NSFW predictors, plus custom heads.

A head factory ``factory(in_dim, *, clip_name, model_dir, cache_dir, offline) -> nn.Module``
builds a module mapping (N, in_dim) float32 embeddings to (N,) float32 scores. ``clip_name``
names the embedding space (a CLIP slug such as ``ViT-L-14-openai``); the other keywords say
where weights are stored (see ``store``). The built-in heads are registered like any custom one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cache import get_cached
from .store import (
    KNOWN_HEAD_WEIGHTS, WeightFile, files_version, find_weights, identity_roots, load_state_dict, resolve,
)
from .tokens import stable_token

HeadFactory = Callable[..., nn.Module]
_ROLE_ALIASES = {"var": "variance", "running_var": "variance", "running_mean": "mean"}


def width_error(head: str, expected: int, clip_name: str, got: int) -> str:
    """Message for embeddings whose width does not match a head."""
    return (
        f"{head} head expects {expected}-d embeddings ({clip_name}) but got {got}-d; "
        "use a matching CLIP model or head"
    )


class Head(nn.Module):
    """Base for built-in heads: remembers its input width and checks it."""

    kind = "score"
    #: Output width of the first linear layer (used to read the input width off weights).
    first_out = 0

    def __init__(self, in_dim: int, clip_name: str) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.clip_name = clip_name

    def check_width(self, x: torch.Tensor) -> None:
        """Raise ValueError when ``x`` is not (N, in_dim)."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(width_error(self.kind, self.in_dim, self.clip_name, x.shape[-1]))


class AestheticHead(Head):
    """LAION improved aesthetic predictor v2: a linear MLP (no activations), scores ~0-10.

    Same layout and state-dict keys as the original (``layers.0/2/4/6/7``); expects
    L2-normalised embeddings.
    """

    kind = "aesthetic"
    first_out = 1024

    def __init__(self, in_dim: int = 768, clip_name: str = "ViT-L-14-openai") -> None:
        super().__init__(in_dim, clip_name)
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_width(x)
        return self.layers(x).squeeze(-1)


class _Normalization(nn.Module):
    """Keras-style feature normalisation: (x - mean) / sqrt(variance)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.variance.sqrt()


class NsfwHead(Head):
    """LAION CLIP-based NSFW detector (PyTorch port of the autokeras model), scores 0-1 (1 = unsafe).

    State-dict keys as in the published port: ``norm.mean``, ``norm.variance``,
    ``linear_1`` ... ``linear_4``.
    """

    kind = "nsfw"
    first_out = 64

    def __init__(self, in_dim: int = 768, clip_name: str = "ViT-L-14-openai") -> None:
        super().__init__(in_dim, clip_name)
        self.norm = _Normalization(in_dim)
        self.linear_1 = nn.Linear(in_dim, 64)
        self.linear_2 = nn.Linear(64, 512)
        self.linear_3 = nn.Linear(512, 256)
        self.linear_4 = nn.Linear(256, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_width(x)
        x = torch.relu(self.linear_1(self.norm(x)))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x)).squeeze(-1)


def adapt_state_dict(found: dict[str, torch.Tensor], module: nn.Module, what: str) -> dict[str, torch.Tensor]:
    """Rename ``found`` tensors to ``module``'s state-dict keys.

    Keys match exactly, or tensors are paired by role (last key part: weight, bias,
    mean, variance/var) and shape (size-1 axes ignored), in order, so other module names
    (``model.0.weight``, ``fc1.weight``) and (1, D) buffers are accepted.

    Raises
    ------
    ValueError
        Lists the expected and the found keys with shapes when no unambiguous pairing exists.
    """
    expected = module.state_dict()
    if found.keys() == expected.keys() and all(found[k].shape == v.shape for k, v in expected.items()):
        return found
    pools: dict[tuple, list[str]] = {}
    for key, value in found.items():
        pools.setdefault(_slot(key, value), []).append(key)
    mapped = {}
    for key, value in expected.items():
        pool = pools.get(_slot(key, value))
        if not pool:
            raise ValueError(_mismatch(what, expected, found))
        mapped[key] = found[pool.pop(0)].reshape(value.shape)
    if any(pools.values()):
        raise ValueError(_mismatch(what, expected, found))
    return mapped


def _slot(key: str, value: torch.Tensor) -> tuple:
    role = key.rsplit(".", 1)[-1]
    return _ROLE_ALIASES.get(role, role), tuple(d for d in value.shape if d != 1)


def _mismatch(what: str, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    def rows(sd: dict[str, torch.Tensor]) -> str:
        return "\n".join(f"  {k} {tuple(v.shape)}" for k, v in sd.items())

    return f"cannot map the weights of {what}.\nexpected:\n{rows(expected)}\nfound:\n{rows(found)}"


def head_weights(
    head: str,
    clip_name: str,
    model_dir: str | None = None,
    cache_dir: str | None = None,
    offline: bool | None = None,
) -> Path:
    """Weights file of ``head`` for the CLIP model ``clip_name`` (a slug such as ``ViT-L-14-openai``).

    Looks for ``heads/<head>/<clip_name>.{safetensors,pth}`` in ``model_dir``, then the
    cache; downloads when the pair is in ``KNOWN_HEAD_WEIGHTS`` (unless offline).
    """
    return resolve(head_entry(head, clip_name), model_dir, cache_dir, offline)


def head_weights_version(heads: Sequence[str], clip_name: str, model_dir: str | None = None,
                         cache_dir: str | None = None) -> str:
    """The version (:func:`~dask_imgcurator.models.store.files_version`) of the weights files the
    built-in factories of ``heads`` would load for ``clip_name`` (where present).

    Heads with a known download source count only in ``model_dir`` (see
    :func:`~dask_imgcurator.models.store.identity_roots`).
    """
    found = [find_weights(head_entry(head, clip_name).stem,
                          identity_roots(model_dir, cache_dir, downloadable=(head, clip_name) in KNOWN_HEAD_WEIGHTS))
             for head in heads]
    return files_version([path for path in found if path is not None])


def head_entry(head: str, clip_name: str) -> WeightFile:
    """The ``WeightFile`` of ``head`` for ``clip_name``: known download sources, or none."""
    return KNOWN_HEAD_WEIGHTS.get((head, clip_name)) or WeightFile(
        name=f"{head} head for {clip_name} (downloads known only for: "
        f"{', '.join(slug for h, slug in KNOWN_HEAD_WEIGHTS if h == head) or 'none'})",
        stem=f"heads/{head}/{clip_name}",
    )


def _build_head(cls: type[Head], in_dim: int, clip_name: str, **store: Any) -> Head:
    path = head_weights(cls.kind, clip_name, **store)
    state = load_state_dict(path)
    firsts = [v for v in state.values() if v.ndim == 2 and v.shape[0] == cls.first_out]
    file_dim = firsts[0].shape[1] if len(firsts) == 1 else in_dim
    if file_dim != in_dim:
        raise ValueError(width_error(cls.kind, file_dim, clip_name, in_dim))
    head = cls(in_dim, clip_name)
    head.load_state_dict(adapt_state_dict(state, head, f"{cls.kind} head {path}"))
    return head


def aesthetic_head(in_dim: int, *, clip_name: str, **store: Any) -> nn.Module:
    """Head factory of the built-in ``"aesthetic"`` head (LAION aesthetic predictor v2)."""
    return _build_head(AestheticHead, in_dim, clip_name, **store)


def nsfw_head(in_dim: int, *, clip_name: str, **store: Any) -> nn.Module:
    """Head factory of the built-in ``"nsfw"`` head (LAION CLIP-based NSFW detector)."""
    return _build_head(NsfwHead, in_dim, clip_name, **store)


@dataclass(frozen=True)
class HeadSpec:
    """A named head factory; picklable when the factory is (ship this to workers)."""

    name: str
    factory: HeadFactory
    #: Identifies the factory in the per-worker cache (a replaced factory is another head) and in a
    #: run's fingerprint, the same in every process (see :func:`~dask_imgcurator.models.tokens.stable_token`);
    #: taken once here, since tokenizing a closure that holds weights costs as much as pickling them.
    token: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "token", stable_token(self.factory))

    def __dask_tokenize__(self) -> tuple:
        return ("HeadSpec", self.name, self.token)


_REGISTRY: dict[str, HeadSpec] = {}


def register_head(name: str, factory: HeadFactory) -> HeadSpec:
    """Register (or replace) a head factory under ``name`` in this process.

    Workers in other processes only know heads registered there; pass the returned
    ``HeadSpec`` (or ``head_spec(name)``) to ``load_head`` inside tasks instead of the name.
    """
    spec = HeadSpec(name, factory)
    _REGISTRY[name] = spec
    return spec


def head_spec(name: str) -> HeadSpec:
    """The registered ``HeadSpec`` called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; registered heads: {sorted(_REGISTRY)}") from None


class _FunctionHead(nn.Module):
    """A plain function of the embeddings, as a module."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _input_width(module: nn.Module) -> int | None:
    """The embedding width ``module`` takes, where it says (``in_dim``) or its first Linear does."""
    width = getattr(module, "in_dim", None)
    if isinstance(width, int):
        return width
    return next((m.in_features for m in module.modules() if isinstance(m, nn.Linear)), None)


class ScoreHead(nn.Module):
    """A head on a device, run in inference mode, returning (N,) float32 scores.

    ``inner`` is an ``nn.Module`` or a plain function of the (N, D) float32 embeddings.
    """

    def __init__(self, name: str, inner: nn.Module | Callable[[torch.Tensor], torch.Tensor],
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        if not isinstance(inner, nn.Module):
            if not callable(inner):
                raise TypeError(
                    f"head {name!r}: its factory returned {type(inner).__name__}, expected an nn.Module "
                    "or a function mapping (N, D) embeddings to N scores"
                )
            inner = _FunctionHead(inner)
        self.name = name
        self.device = torch.device(device)
        self.inner = inner.eval().requires_grad_(False).float().to(self.device)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings.to(self.device, torch.float32)
        with torch.inference_mode():
            try:
                out = self.inner(x)
            except RuntimeError as err:  # e.g. "mat1 and mat2 shapes cannot be multiplied"
                expected = _input_width(self.inner)
                if expected is not None and x.ndim == 2 and expected != x.shape[1]:
                    raise ValueError(
                        f"head {self.name!r} expects {expected}-d embeddings but got {x.shape[1]}-d; "
                        "use a matching model or build the head for its width (the factory's in_dim)"
                    ) from err
                raise
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"head {self.name!r} returned {type(out).__name__}, expected a tensor of N scores")
        if out.numel() != len(x):
            raise ValueError(f"head {self.name!r} returned shape {tuple(out.shape)} for {len(x)} embeddings")
        return out.reshape(len(x)).float()


def load_head(
    name: str | HeadSpec,
    embed_dim: int,
    clip_name: str,
    model_dir: str | None = None,
    cache_dir: str | None = None,
    offline: bool | None = None,
    device: str | torch.device = "cpu",
) -> ScoreHead:
    """Build a head for one CLIP model's embeddings, once per worker and arguments.

    Parameters
    ----------
    name : str or HeadSpec
        Registered name (``"aesthetic"``, ``"nsfw"``) or a spec from ``head_spec``.
    embed_dim : int
        Width of the embeddings to score.
    clip_name : str
        Which embedding space they are in: the CLIP slug (``ClipRef.head_family``,
        e.g. ``"ViT-L-14-openai"``) or a custom model's name.
    model_dir, cache_dir, offline :
        Where head weights are looked for and whether they may be downloaded (as in ``ClipRef``).
    device : str or torch.device
        Where the head runs.

    Raises
    ------
    ValueError
        Unknown head, or weights for a different embedding width.
    WeightsNotFoundError
        Weights are missing and cannot be downloaded.
    """
    spec = name if isinstance(name, HeadSpec) else head_spec(name)
    store = {"model_dir": model_dir, "cache_dir": cache_dir, "offline": offline}
    # the factory's token is in the key (``register_head`` may replace a name's factory), and the
    # version of the weights it would find (they may be saved over at the same path)
    version = head_weights_version([spec.name], clip_name, model_dir, cache_dir)
    key = ("head", spec.name, spec.token, version, embed_dim, clip_name, model_dir, cache_dir, offline, str(device))
    return get_cached(
        key, lambda: ScoreHead(spec.name, spec.factory(embed_dim, clip_name=clip_name, **store), device)
    )


register_head("aesthetic", aesthetic_head)
register_head("nsfw", nsfw_head)
