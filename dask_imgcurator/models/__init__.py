"""Models: CLIP image encoders, LAION score heads, weight storage and per-worker caching.

Typical worker-side use::

    ref = ClipRef.parse("ViT-L-14/openai", model_dir="/models")   # picklable, goes in the graph
    model = ref.load("cuda", "bf16")                 # == load_clip(ref, "cuda", "bf16")
    emb = model.encode(pixels)                       # (N, 768) float32, L2-normalised
    head = load_head("aesthetic", model.embed_dim, ref.head_family, device="cuda", **ref.store_kwargs())
    scores = head(emb)                               # (N,) float32

Only descriptions (``ClipRef``, ``CustomModel``, ``HeadSpec``) belong in task graphs;
weights are loaded on the workers, once per worker (``get_cached``).
"""

from .cache import clear_cache, get_cached
from .clip import clip_info, load_clip
from .custom import CustomModel, custom_model
from .encoder import LoadedModel, ModelInfo
from .heads import AestheticHead, HeadSpec, NsfwHead, ScoreHead, head_spec, load_head, register_head
from .manage import ModelRow, download_models, list_models
from .ref import ClipRef
from .source import ModelSource, as_model_source
from .store import DamagedWeightsError, UnsafeWeightsError, WeightsNotFoundError, WeightsVerificationError
from .tiny import make_tiny_model_dir

__all__ = [
    "AestheticHead",
    "ClipRef",
    "CustomModel",
    "DamagedWeightsError",
    "HeadSpec",
    "LoadedModel",
    "ModelInfo",
    "ModelRow",
    "ModelSource",
    "NsfwHead",
    "ScoreHead",
    "UnsafeWeightsError",
    "WeightsNotFoundError",
    "WeightsVerificationError",
    "as_model_source",
    "clear_cache",
    "clip_info",
    "custom_model",
    "download_models",
    "get_cached",
    "head_spec",
    "list_models",
    "load_clip",
    "load_head",
    "make_tiny_model_dir",
    "register_head",
]
