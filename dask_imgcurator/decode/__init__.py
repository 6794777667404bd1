"""Encoded image bytes → CLIP-preprocessed batch tensors, with Pillow or NVIDIA DALI."""
from __future__ import annotations

from typing import Any

from dask_imgcurator.decode.base import DecodedBatch, DecodeError, Decoder, PreprocessSpec
from dask_imgcurator.decode.dali import DaliDecoder, dali_available
from dask_imgcurator.decode.pillow import PillowDecoder
from dask_imgcurator.decode.preprocess import preprocess_spec_from_open_clip
from dask_imgcurator.decode.probe import ImageInfo, probe_image

__all__ = [
    "PreprocessSpec",
    "DecodedBatch",
    "DecodeError",
    "Decoder",
    "ImageInfo",
    "PillowDecoder",
    "DaliDecoder",
    "dali_available",
    "make_decoder",
    "probe_image",
    "preprocess_spec_from_open_clip",
]


_DALI_ONLY_OPTIONS = ("device_id", "batch_size", "max_batch_pixels")


def make_decoder(spec: PreprocessSpec, backend: str = "auto", device: str = "cpu", **kw: Any) -> Decoder:
    """Pick a decoder.

    Parameters
    ----------
    spec : PreprocessSpec
        Preprocessing to apply.
    backend : {"auto", "dali", "pillow"}
        "auto" uses DALI when it imports, Pillow otherwise.
    device : {"cpu", "gpu"}
        For DALI: "gpu" decodes on the GPU ("mixed" backend). Pillow always runs on the CPU.
    **kw
        Passed to the decoder class (``draft`` and ``num_threads`` for both; ``device_id``,
        ``batch_size`` and ``max_batch_pixels`` for DALI, dropped for Pillow; ``resize`` for Pillow).

    Returns
    -------
    Decoder
    """
    if backend == "auto":
        backend = "dali" if dali_available() else "pillow"
    if backend == "pillow":  # options meant for DALI do not apply to Pillow (the fallback, or chosen)
        kw = {k: v for k, v in kw.items() if k not in _DALI_ONLY_OPTIONS}
    if backend == "dali":
        if not dali_available():
            raise ImportError("backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120")
        return DaliDecoder(spec, device=device, **kw)
    if backend == "pillow":
        return PillowDecoder(spec, **kw)
    raise ValueError(f"backend must be 'auto', 'dali' or 'pillow', not {backend!r}")
