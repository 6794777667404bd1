"""Random-weight CLIP image encoders and heads of real architectures, saved in our model-dir layout.

Speed does not depend on the weights, so the benchmarks use ``open_clip.create_model(name,
pretrained=None)`` (the real ViT-B-32 / ViT-L-14 graphs) with random weights, saved exactly like a
downloaded model (``clip/<name>-random/`` as an open_clip local dir, ``heads/<kind>/<slug>.safetensors``)
and loaded through the package's own loader as ``ClipRef(name, "random", model_dir=...)``
(or ``--model NAME/random --model-dir DIR`` on the command line).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

TAG = "random"


def random_clip_dir(model_dir: str | os.PathLike, name: str = "ViT-B-32", seed: int = 0):
    """Write (once) a random ``name`` CLIP plus aesthetic and NSFW heads; return its ``ClipRef``."""
    import open_clip
    from safetensors.torch import save_file

    from dask_imgcurator.models import AestheticHead, ClipRef, NsfwHead
    from dask_imgcurator.models.clip import is_clip_dir, save_clip_dir

    ref = ClipRef(name, TAG, model_dir=str(model_dir), offline=True)
    root = Path(model_dir)
    clip_path = root / "clip" / ref.slug
    head_paths = {kind: root / "heads" / kind / f"{ref.slug}.safetensors" for kind in ("aesthetic", "nsfw")}
    if is_clip_dir(clip_path) and all(p.is_file() for p in head_paths.values()):
        return ref
    cfg = open_clip.get_model_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
        dim = int(cfg["embed_dim"])
        heads = {"aesthetic": AestheticHead(dim, ref.slug), "nsfw": NsfwHead(dim, ref.slug)}
    save_clip_dir(model, cfg, clip_path)
    for kind, head in heads.items():
        head_paths[kind].parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(head_paths[kind]))
    return ref
