"""Tiny random-weight models for tests and demos, stored exactly like downloaded ones."""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
from open_clip.model import set_model_preprocess_cfg
from safetensors.torch import save

from ..decode.base import OPENAI_MEAN, OPENAI_STD
from .clip import save_clip_dir
from .heads import AestheticHead, Head, NsfwHead
from .ref import ClipRef
from .store import save_unless_same

TINY_NAME = "imgcurator-tiny"


def make_tiny_model_dir(
    model_dir: str | os.PathLike,
    embed_dim: int = 32,
    image_size: int = 32,
    seed: int = 0,
    quick_gelu: bool = True,
) -> ClipRef:
    """Write a tiny random CLIP plus aesthetic and NSFW heads into ``model_dir``.

    The files use the normal model-dir layout (``clip/<slug>/`` in open_clip local-dir
    format, ``heads/<head>/<slug>.safetensors``), so they load through ``load_clip`` and
    ``load_head`` like real weights. The same arguments always give the same weights.
    Embeddings of different images differ clearly (average-pooled tokens); head scores
    are meaningless, the aesthetic head is biased to centre around 5.

    Parameters
    ----------
    model_dir : path
        Model directory to write into (created if needed).
    embed_dim : int
        Embedding width.
    image_size : int
        Input side in pixels; a multiple of 8 (the patch size).
    seed : int
        Seed of the random weights.
    quick_gelu : bool
        Use QuickGELU activations (as OpenAI CLIP models do) instead of GELU.

    Returns
    -------
    ClipRef
        Reference to the tiny model (offline, ``model_dir`` set).
    """
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
    pretrained = f"d{embed_dim}-px{image_size}-seed{seed}" + ("-quickgelu" if quick_gelu else "")
    ref = ClipRef(TINY_NAME, pretrained, model_dir=str(model_dir), offline=True)
    root = Path(model_dir)
    cfg = {
        "embed_dim": embed_dim,
        "quick_gelu": quick_gelu,
        # average pooling: random CLS-token models map every image to nearly the same direction
        "vision_cfg": {
            "image_size": image_size,
            "layers": 2,
            "width": 64,
            "patch_size": 8,
            "head_width": 32,
            "pool_type": "avg",
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg)
        aesthetic = AestheticHead(embed_dim, ref.slug)
        nsfw = NsfwHead(embed_dim, ref.slug)
        nsfw.norm.mean.normal_(0.0, 0.01)
        nsfw.norm.variance.uniform_(0.5, 1.5)
    with torch.no_grad():
        aesthetic.layers[-1].bias.fill_(5.0)
    set_model_preprocess_cfg(
        model,
        {
            "size": image_size,
            "mean": OPENAI_MEAN,
            "std": OPENAI_STD,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    )
    save_clip_dir(model, cfg, root / "clip" / ref.slug)
    for head in (aesthetic, nsfw):
        _save_head(head, root / "heads" / head.kind / f"{ref.slug}.safetensors")
    return ref


def _save_head(head: Head, path: Path) -> None:
    save_unless_same(path, save({k: v.contiguous() for k, v in head.state_dict().items()}))
