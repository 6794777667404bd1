"""Which CLIP model to use: a small, picklable reference that travels in the task graph."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip

from .store import absolute_dirs

HF_HUB_PREFIX = "hf-hub:"
HF_HUB_SLUG_PREFIX = "hf-hub-"  # hf-hub:org/repo is stored as hf-hub-org--repo
LOCAL_DIR_PREFIX = "local-dir:"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_PATH_STARTS = ("/", "./", "../", "~")


def _absolute(path: str) -> str:
    """``path`` with ``~`` expanded, absolute from this process's working directory."""
    return os.path.abspath(os.path.expanduser(path))


def _exists(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


@dataclass(frozen=True)
class ClipRef:
    """Reference to a CLIP image encoder; configuration only (no weights), cheap to pickle.

    Parameters
    ----------
    name : str
        open_clip architecture name (``"ViT-L-14"``), ``"hf-hub:org/repo"`` or
        ``"local-dir:/path"`` (a folder with ``open_clip_config.json`` and weights).
    pretrained : str or None
        open_clip pretrained tag (``"openai"``) or a local checkpoint file for ``name``.
        Must be None for ``hf-hub:`` and ``local-dir:`` names.
    model_dir : str or None
        Prepared model directory searched first (see ``download_models``).
    cache_dir : str or None
        Download cache; default ``$IMGCURATOR_HOME/models`` (``~/.cache/dask_imgcurator/models``).

    Local paths (``model_dir``, ``cache_dir``, and an existing ``local-dir:`` folder or checkpoint
    file) are made absolute when the reference is made, so that workers started in another
    directory find them.
    offline : bool or None
        Never download. None: offline when ``HF_HUB_OFFLINE`` or ``IMGCURATOR_OFFLINE`` is set.
    """

    name: str = "ViT-L-14"
    pretrained: str | None = "openai"
    model_dir: str | None = None
    cache_dir: str | None = None
    offline: bool | None = None

    def __post_init__(self) -> None:
        absolute_dirs(self, "model_dir", "cache_dir")
        if self.name.startswith(LOCAL_DIR_PREFIX) and _exists(self.name[len(LOCAL_DIR_PREFIX):]):
            object.__setattr__(self, "name", LOCAL_DIR_PREFIX + _absolute(self.name[len(LOCAL_DIR_PREFIX):]))
        if self.pretrained is not None and _exists(self.pretrained) and self.kind == "file":
            object.__setattr__(self, "pretrained", _absolute(self.pretrained))
        if self.name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
            if self.pretrained is not None:
                raise ValueError(f"pretrained must be None for {self.name!r} (the weights come with it)")
        elif "/" in self.name:
            raise ValueError(f"{self.name!r} is not an architecture name; use ClipRef.parse({self.name!r})")
        elif not self.pretrained:
            raise ValueError(
                f"no weights given for {self.name!r}: pass a pretrained tag "
                f"({', '.join(open_clip.list_pretrained_tags_by_model(self.name)) or 'none known'}) "
                "or a checkpoint path"
            )

    @classmethod
    def parse(cls, text: str, **kw) -> ClipRef:
        """Build a reference from its text form.

        Accepted forms: ``"ViT-L-14/openai"`` (architecture/tag), ``"ViT-B-32"`` (tag
        ``openai`` where open_clip has it), ``"ViT-L-14//data/ckpt.pt"`` (architecture/
        checkpoint path), ``"/data/ckpt.pt"`` (checkpoint for ``kw["name"]``, default
        ViT-L-14), ``"hf-hub:org/repo"``, ``"local-dir:/path"`` and ``"/path/to/dir"``.
        Text naming an existing file or directory (``"models/clip/my-model"``, no ``./``
        needed) is that path, except a bare architecture name such as ``"ViT-B-32"``.

        Parameters
        ----------
        text : str
            The model as written on a command line.
        **kw
            Further ``ClipRef`` fields (``model_dir``, ``cache_dir``, ``offline``, ``name``).
        """
        text = text.strip()
        if text.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
            return cls(name=text, pretrained=None, **kw)
        path = os.path.expanduser(text)
        if text.startswith(_PATH_STARTS) or (os.path.exists(path) and text not in open_clip.list_models()):
            if path.endswith(CHECKPOINT_SUFFIXES):
                return cls(**{"pretrained": path, **kw})
            return cls(name=LOCAL_DIR_PREFIX + path, pretrained=None, **kw)
        name, _, tag = text.partition("/")
        if not tag:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if "openai" not in tags:
                raise ValueError(f"give a pretrained tag for {name!r}, e.g. {name}/TAG; known tags: {tags}")
            tag = "openai"
        return cls(name=name, pretrained=tag, **kw)

    @property
    def kind(self) -> str:
        """``"tag"``, ``"file"`` (checkpoint path), ``"hf-hub"`` or ``"local-dir"``."""
        if self.name.startswith(HF_HUB_PREFIX):
            return "hf-hub"
        if self.name.startswith(LOCAL_DIR_PREFIX):
            return "local-dir"
        assert self.pretrained is not None
        if "/" in self.pretrained or self.pretrained.endswith(CHECKPOINT_SUFFIXES):
            return "file"
        return "tag"

    @property
    def slug(self) -> str:
        """Directory/file stem naming this model in a model dir (``ViT-L-14-openai``)."""
        kind = self.kind
        if kind == "hf-hub":
            return HF_HUB_SLUG_PREFIX + self.name[len(HF_HUB_PREFIX) :].replace("/", "--")
        if kind == "local-dir":
            return Path(self.name[len(LOCAL_DIR_PREFIX) :]).name
        if kind == "file":
            return f"{self.name}-{Path(str(self.pretrained)).stem}"
        return f"{self.name}-{self.pretrained}"

    @property
    def head_family(self) -> str:
        """Embedding space for ``load_head``'s ``clip_name``: the slug."""
        return self.slug

    def store_kwargs(self) -> dict[str, Any]:
        """``model_dir``, ``cache_dir`` and ``offline``, as ``load_head`` takes them."""
        return {"model_dir": self.model_dir, "cache_dir": self.cache_dir, "offline": self.offline}

    def __str__(self) -> str:
        return self.name if self.pretrained is None else f"{self.name}/{self.pretrained}"

    def __dask_tokenize__(self) -> tuple:
        # What the weights are, not where they are found: the name or tag, and the local weights'
        # names, sizes and times (weights saved over the old ones at the same path are another run;
        # a model dir moved with its files' times is the same one). Not ``offline`` either: it only
        # says whether a download may happen.
        from .clip import weights_version

        kind = self.kind
        identity = str(self) if kind in ("tag", "hf-hub") else self.slug  # a local dir's or checkpoint's own name
        return ("ClipRef", kind, identity, weights_version(self))

    def load(self, device: str = "cpu", precision: str = "fp32"):
        """Load (or reuse from the per-worker cache) the encoder; see ``load_clip``."""
        from .clip import load_clip

        return load_clip(self, device=device, precision=precision)

    def info(self):
        """Embedding width and preprocessing without loading weights; see ``clip_info``."""
        from .clip import clip_info

        return clip_info(self)
