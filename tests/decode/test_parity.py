"""Every decoder against open_clip's own eval preprocessing of the same opaque RGB images.

Differences are in normalised units (one 8-bit level is about 0.015). Measured on this suite's
images (PHOTO_SIZES, plus three ~2000 px photos for JPEG), bicubic at 224 px:

===================  ======  =======  ========  ================
decoder              format  max abs  mean abs  max abs, inner
===================  ======  =======  ========  ================
pillow, draft=False  all     0        0         0
pillow, draft=True   JPEG    0.085    0.0011    0.085
pillow, draft=True   PNG     0        0         0   (draft is JPEG only)
dali-cpu, draft=F    JPEG    0.075    0.0022    0.060
dali-cpu, draft=F    PNG     0.175    0.0027    0.131
dali-cpu, draft=F    WebP    0.175    0.0027    0.131
dali-cpu (default)   JPEG    0.085    0.0029    0.085  (the ~2000 px JPEGs go to Pillow's draft)
===================  ======  =======  ========  ================

Bilinear at 160 px (JPEG): pillow 0 / 0, draft 0.100 / 0.0011, dali-cpu with draft=False 0.128 / 0.0017
(inner 0.015), dali-cpu 0.128 / 0.0024 (inner 0.100).

"Inner" leaves out the outermost pixel ring, where Pillow renormalises the truncated filter and
DALI clamps to the edge. Pillow without draft is bit-identical to open_clip. DALI decodes to the
same 8-bit pixels as Pillow; its resize keeps the intermediate pass in float where Pillow rounds
and clips it to 8 bits, so hard edges in lossless images and the 14x upscaled 16x16 image differ
by a few levels (DALI is within one level of an all-float resize there).
"""
from __future__ import annotations

import io

import open_clip
import pytest
import torch
from PIL import Image

from dask_imgcurator.decode import PillowDecoder, PreprocessSpec

from .conftest import PHOTO_SIZES, encode, photo

LARGE_SIZES = [(2000, 1500), (1800, 1200), (1200, 2100)]


def _images() -> dict[str, list[bytes]]:
    photos = [photo(w, h, seed=i) for i, (w, h) in enumerate(PHOTO_SIZES + LARGE_SIZES)]
    return {
        "jpeg": [encode(p, quality=90) for p in photos],
        "png": [encode(p, "PNG", compress_level=1) for p in photos[: len(PHOTO_SIZES)]],
        "webp": [encode(p, "WEBP", lossless=True, method=0) for p in photos[: len(PHOTO_SIZES)]],
    }


IMAGES = _images()


def reference(blobs: list[bytes], spec: PreprocessSpec) -> torch.Tensor:
    transform = open_clip.image_transform(
        spec.size, is_train=False, mean=spec.mean, std=spec.std, interpolation=spec.interpolation
    )
    return torch.stack([transform(Image.open(io.BytesIO(b))) for b in blobs])


def _diff(decoder, fmt: str, spec: PreprocessSpec) -> tuple[float, float, float]:
    """(max, mean, max over all but the outermost pixel ring) of |decoder - open_clip|."""
    out = decoder.decode(IMAGES[fmt])
    assert out.errors == [None] * len(IMAGES[fmt])
    diff = (out.pixels.cpu() - reference(IMAGES[fmt], spec)).abs()
    return diff.max().item(), diff.mean().item(), diff[..., 1:-1, 1:-1].max().item()


@pytest.fixture(scope="module")
def spec() -> PreprocessSpec:
    return PreprocessSpec()


@pytest.mark.parametrize("fmt", sorted(IMAGES))
def test_pillow_is_bit_identical(spec, fmt):
    assert _diff(PillowDecoder(spec, draft=False), fmt, spec) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("fmt", sorted(IMAGES))
def test_pillow_draft(spec, fmt):
    max_abs, mean_abs, _ = _diff(PillowDecoder(spec, draft=True), fmt, spec)
    assert max_abs < 0.1 and mean_abs < 0.0015


def test_pillow_bilinear_is_bit_identical():
    spec = PreprocessSpec(size=160, interpolation="bilinear")
    assert _diff(PillowDecoder(spec, draft=False), "jpeg", spec) == (0.0, 0.0, 0.0)


# (max, mean, inner max) allowed: the measured values above plus a margin
DALI_TOLERANCE = {"jpeg": (0.09, 0.003, 0.07), "png": (0.2, 0.0035, 0.15), "webp": (0.2, 0.0035, 0.15)}


@pytest.mark.parametrize("fmt", sorted(IMAGES))
def test_dali_cpu(spec, fmt):
    pytest.importorskip("nvidia.dali")
    from dask_imgcurator.decode import DaliDecoder

    max_abs, mean_abs, inner_max = _diff(DaliDecoder(spec, draft=False), fmt, spec)
    tol_max, tol_mean, tol_inner = DALI_TOLERANCE[fmt]
    assert max_abs < tol_max and mean_abs < tol_mean and inner_max < tol_inner


def test_dali_cpu_with_draft(spec):
    """The default: large JPEGs decoded at reduced scale by Pillow, the rest by DALI."""
    pytest.importorskip("nvidia.dali")
    from dask_imgcurator.decode import DaliDecoder

    max_abs, mean_abs, _ = _diff(DaliDecoder(spec), "jpeg", spec)
    assert max_abs < 0.1 and mean_abs < 0.0035


def test_dali_cpu_bilinear():
    pytest.importorskip("nvidia.dali")
    from dask_imgcurator.decode import DaliDecoder

    spec = PreprocessSpec(size=160, interpolation="bilinear")
    max_abs, mean_abs, inner_max = _diff(DaliDecoder(spec, draft=False), "jpeg", spec)
    assert max_abs < 0.15 and mean_abs < 0.0025 and inner_max < 0.03
    max_abs, mean_abs, _ = _diff(DaliDecoder(spec), "jpeg", spec)
    assert max_abs < 0.15 and mean_abs < 0.003
