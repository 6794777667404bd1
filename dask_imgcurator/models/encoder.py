"""A loaded image encoder: device, precision and output normalisation in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..decode.base import PreprocessSpec

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """What a model needs and produces, known without loading its weights."""

    name: str
    embed_dim: int
    preprocess: PreprocessSpec


class LoadedModel:
    """An image encoder ready for inference on one device.

    Parameters
    ----------
    forward : callable
        ``nn.Module`` or function mapping a pixel batch to (N, D) features.
    info : ModelInfo
        Name, embedding width and preprocessing of the model.
    device : str or torch.device
        Where it runs.
    precision : {"fp32", "bf16", "fp16"}
        fp32; bf16 (CPU: module weights cast to bf16; GPU: bf16 autocast); fp16 (GPU
        only, autocast).
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        info: ModelInfo,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        if precision == "fp16" and on_cpu:
            raise ValueError("precision 'fp16' needs a GPU; use 'bf16' or 'fp32' on CPU")
        self.info = info
        self.precision = precision
        is_module = isinstance(forward, torch.nn.Module)
        cast_weights = is_module and precision == "bf16" and on_cpu  # else autocast
        self._input_dtype = torch.bfloat16 if cast_weights else torch.float32
        self._autocast_dtype = None if precision == "fp32" or cast_weights else _DTYPES[precision]
        if is_module:
            forward = forward.eval().requires_grad_(False).to(self.device, self._input_dtype)
        self._forward = forward

    @property
    def embed_dim(self) -> int:
        """Width D of the embeddings."""
        return self.info.embed_dim

    @property
    def preprocess(self) -> PreprocessSpec:
        """How pixels must be prepared for ``encode``."""
        return self.info.preprocess

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed a batch of preprocessed images.

        Parameters
        ----------
        pixels : torch.Tensor
            (N, 3, S, S) float32, normalised as ``preprocess`` describes.

        Returns
        -------
        torch.Tensor
            (N, D) float32 on the model's device, each row L2-normalised.
        """
        size = self.preprocess.size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(
                f"{self.info.name} expects pixels of shape (N, 3, {size}, {size}), got {tuple(pixels.shape)}"
            )
        if len(pixels) == 0:
            return torch.empty(0, self.embed_dim, device=self.device)
        x = pixels.to(self.device, self._input_dtype, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            out = self._forward(x)
            if isinstance(out, tuple):  # towers that also return tokens
                out = out[0]
            if tuple(out.shape) != (len(pixels), self.embed_dim):
                raise ValueError(
                    f"{self.info.name} returned shape {tuple(out.shape)}, expected ({len(pixels)}, {self.embed_dim})"
                )
            return F.normalize(out.float(), dim=-1)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)
