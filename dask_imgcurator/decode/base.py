"""What every image decoder takes and returns (the contract between decode and embed)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: Default decompression-bomb guard: images with more pixels than this are refused before decode.
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default warning threshold


@dataclass(frozen=True)
class PreprocessSpec:
    """CLIP-style preprocessing: resize the shorter side, center crop, normalise.

    Parameters
    ----------
    size : int
        Side of the square output in pixels.
    mean, std : tuple of float
        Per-channel normalisation (RGB, values for pixels scaled to 0..1).
    interpolation : {"bicubic", "bilinear"}
        Resize filter, as the model was trained with.
    max_pixels : int
        Images with more pixels (width * height) are refused before full decode.
    """

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    max_pixels: int = DEFAULT_MAX_PIXELS


class DecodeError(ValueError):
    """One image cannot be decoded (empty, unrecognised, too large, corrupt).

    ``width``/``height`` carry the size read from the header when it is known (-1 otherwise),
    so that a refused image can still report how big it claimed to be.
    """

    def __init__(self, message: str, *, width: int = -1, height: int = -1):
        super().__init__(message)
        self.width = width
        self.height = height


@dataclass
class DecodedBatch:
    """Result of decoding one batch of encoded images.

    ``pixels`` holds one row per sample whose ``errors`` entry is None, in input order.
    ``width``/``height`` are the original image size (-1 where unknown).
    """

    pixels: torch.Tensor
    width: np.ndarray
    height: np.ndarray
    errors: list[str | None] = field(default_factory=list)

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


class Decoder(Protocol):
    """Turns encoded image bytes into a normalised float32 batch tensor (N, 3, size, size)."""

    name: str

    def decode(self, blobs: Sequence[bytes]) -> DecodedBatch: ...
