"""torch's resize + center crop against Pillow's (the reference PillowDecoder uses with resize="pillow")."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dask_imgcurator.decode import PillowDecoder, PreprocessSpec
from dask_imgcurator.decode.preprocess import resized_size
from dask_imgcurator.decode.resize import empty_batch, normalized_rows, resize_center_crop, resizes_whole

from .conftest import encode, photo


def _levels_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _hwc(chw: torch.Tensor) -> np.ndarray:
    return chw.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(640, 480), (300, 1000), (225, 229), (16, 16)])
def test_matches_pillow_within_a_level_almost_everywhere(size, interpolation):
    spec = PreprocessSpec(interpolation=interpolation)
    img = photo(*size, seed=3)
    pixels = resize_center_crop(np.array(img), *size, spec)
    reference = PillowDecoder(spec, draft=False, resize="pillow")._crop_rgb(img, _info(size))
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.uint8
    diff = np.abs(pixels.numpy().astype(int) - reference.numpy().astype(int))
    # both round to 8 bits between passes; at a few hard edges (300x1000 bicubic) up to 8 levels apart
    assert (diff > 1).mean() < 0.001 and diff.max() <= 8


@pytest.mark.parametrize("size", [(4000, 200), (1000, 240), (240, 1000), (728, 90)])
def test_aspect_ratios_above_4_are_resized_whole_like_pillow(size):
    """Resizing only the crop's box, widened to whole pixels, stretched it (69 levels off at 1000x240)."""
    spec = PreprocessSpec()
    img = photo(*size, seed=4)
    pixels = resize_center_crop(np.array(img), *size, spec)
    reference = PillowDecoder(spec, draft=False, resize="pillow")._crop_rgb(img, _info(size))
    assert pixels.shape == (3, 224, 224)
    diff = np.abs(pixels.numpy().astype(int) - reference.numpy().astype(int))
    assert (diff > 1).mean() < 0.001 and diff.max() <= 8


def test_extreme_upscales_resize_the_kept_box_only(monkeypatch):
    spec = PreprocessSpec()
    assert resizes_whole(*resized_size(728, 90, 224), 728 * 90, 224)
    assert resizes_whole(*resized_size(20_000, 2_000, 224), 20_000 * 2_000, 224)  # downscaled: smaller than the image
    assert not resizes_whole(*resized_size(20_000, 10, 224), 20_000 * 10, 224)  # 448000 x 224 if resized whole
    shapes = []
    interpolate = torch.nn.functional.interpolate

    def spy(*args, **kwargs):
        out = interpolate(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    pixels = resize_center_crop(np.array(photo(20_000, 10, seed=4)), 20_000, 10, spec)
    assert pixels.shape == (3, 224, 224) and shapes == [(1, 3, 224, 224)]


def test_a_reduced_scale_decode_keeps_the_original_geometry():
    """A JPEG drafted to 1/2 has ceil(877 / 2) = 439 rows covering 438.5 original half-rows."""
    spec = PreprocessSpec(size=160, interpolation="bilinear")
    half = photo(617, 439, seed=6)  # what libjpeg would decode at 1/2
    exact = resize_center_crop(np.array(half), 1234, 877, spec, scale=(617 / 1234, 438.5 / 877))
    pillow = np.asarray(half.resize((225, 160), Image.Resampling.BILINEAR, box=(0, 0, 617, 438.5)))
    assert _levels_apart(_hwc(exact), pillow[:, 32:192]) <= 2


def test_crop_of_an_image_already_at_size_is_a_copy():
    """Decoders hand in views of buffers they reuse (DALI's output): the crop must not alias them."""
    rgb = np.array(photo(224, 224, seed=7))
    crop = resize_center_crop(rgb, 224, 224, PreprocessSpec())
    assert np.array_equal(_hwc(crop), rgb)
    rgb[:] = 0
    assert int(crop.max()) > 0


def test_normalized_rows_are_totensor_then_normalize_of_the_decoded_rows():
    spec = PreprocessSpec(size=8)
    crops = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    expected = (crops.float() / 255 - mean) / std  # torchvision: ToTensor, then Normalize
    batch = empty_batch(3, spec)
    for row, crop in zip(batch, crops):
        row.copy_(crop)
    kept = normalized_rows(batch.clone(), [None, None, None], spec)
    assert kept.is_contiguous() and torch.equal(kept, expected)
    assert torch.equal(normalized_rows(batch.clone(), [None, "broken", None], spec), expected[[0, 2]])
    assert normalized_rows(batch.clone(), ["a", "b", "c"], spec).shape == (0, 3, 8, 8)


def test_decoders_resize_with_torch_by_default():
    spec = PreprocessSpec()
    blob = encode(photo(640, 480, seed=1), "PNG")
    fast = PillowDecoder(spec, draft=False).decode([blob]).pixels
    exact = PillowDecoder(spec, draft=False, resize="pillow").decode([blob]).pixels
    assert not torch.equal(fast, exact) and (fast - exact).abs().max() < 0.05


def test_unknown_resize_is_refused():
    with pytest.raises(ValueError, match="resize"):
        PillowDecoder(PreprocessSpec(), resize="opencv")


def _info(size):
    from dask_imgcurator.decode.probe import ImageInfo

    return ImageInfo("PNG", size[0], size[1], "RGB", has_alpha=False, is_animated=False, bit_depth=8)
