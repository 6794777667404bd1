"""PillowDecoder: bad-image matrix, batch isolation, batch shapes, draft mode."""
from __future__ import annotations

import dataclasses
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, JpegImagePlugin

from dask_imgcurator.decode import ImageInfo, PillowDecoder, PreprocessSpec, make_decoder, probe_image
from dask_imgcurator.decode.pillow import draft_reduces

from .conftest import (
    encode, normalised_white, photo, png_chunk, png_of_size, raw_png, transparent_png, unnormalize, unusual_images,
)


@pytest.mark.parametrize("draft", [True, False])
def test_bad_image_matrix(image_case, spec, draft):
    spec = dataclasses.replace(spec, **image_case.spec_overrides)
    image_case.verify(PillowDecoder(spec, draft=draft).decode([image_case.blob]), spec)


def test_transparent_pixels_are_white(spec):
    pixels = PillowDecoder(spec).decode([transparent_png()]).pixels[0]
    assert torch.allclose(pixels, normalised_white(spec).expand_as(pixels), atol=1e-6)


@pytest.mark.parametrize("hidden", [1000, 0])
def test_16bit_grey_colour_key_is_transparent(spec, hidden):
    """A 16-bit gray PNG whose tRNS colour key matches the left half: that half is white."""
    values = np.full((30, 40), 20000, np.uint16)
    values[:, :20] = hidden
    png = raw_png(40, 30, (row.astype(">u2").tobytes() for row in values), bit_depth=16, colour_type=0)
    at = png.find(b"IDAT") - 4
    png = png[:at] + png_chunk(b"tRNS", struct.pack(">H", hidden)) + png[at:]
    assert probe_image(png).has_alpha
    rgb = unnormalize(PillowDecoder(spec, resize="pillow").decode([png]).pixels[0], spec)
    # the halves meet at output column 112; the bicubic upscale blurs ~15 columns either side
    assert torch.allclose(rgb[:, :, :90], torch.ones(3, 224, 90), atol=1e-6)
    assert torch.allclose(rgb[:, :, 134:], torch.full((3, 224, 90), round(20000 * 255 / 65535) / 255), atol=1e-6)


def test_32bit_integer_grey_is_read_as_16bit(spec):
    blob = encode(Image.fromarray(np.full((30, 40), 32896, np.int32)), "TIFF")  # mode "I"
    rgb = PillowDecoder(spec).decode([blob]).pixels[0] * torch.tensor(spec.std).view(3, 1, 1)
    rgb += torch.tensor(spec.mean).view(3, 1, 1)
    assert torch.allclose(rgb, torch.full_like(rgb, 128 / 255), atol=1e-6)


def test_truncated_jpeg_is_an_error_not_grey(spec, truncated_jpeg):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    out = PillowDecoder(spec).decode([truncated_jpeg])
    assert out.errors[0].startswith("truncated or corrupt JPEG: image file is truncated")


def test_bad_rows_do_not_disturb_good_ones(spec, photo_jpegs, truncated_jpeg):
    dec = PillowDecoder(spec)
    good = photo_jpegs[:4]
    batch = [good[0], b"", good[1], truncated_jpeg, b"garbage", good[2], good[3]]
    out = dec.decode(batch)
    assert out.ok.tolist() == [True, False, True, False, False, True, True]
    assert torch.equal(out.pixels, dec.decode(good).pixels)
    assert out.width.tolist() == [640, -1, 1000, 640, -1, 16, 300]
    assert out.height.tolist() == [480, -1, 300, 480, -1, 16, 1000]


@pytest.mark.parametrize("n", [0, 1, 3, 7])
def test_batch_sizes(spec, photo_jpegs, n):
    out = PillowDecoder(spec).decode(photo_jpegs[:n])
    assert out.pixels.shape == (n, 3, 224, 224) and out.pixels.dtype == torch.float32
    assert out.pixels.is_contiguous()
    assert out.errors == [None] * n and len(out.width) == len(out.height) == n


def test_all_bad_batch_has_empty_pixels(spec):
    out = PillowDecoder(spec).decode([b"", b"nope"])
    assert out.pixels.shape == (0, 3, 224, 224)
    assert not out.ok.any()


def test_draft_keeps_twice_the_output_size(spec, monkeypatch):
    sizes = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    big = encode(photo(2400, 1800, seed=5), quality=90)
    drafted = PillowDecoder(spec, draft=True).decode([big])
    assert sizes == [(600, 450)]  # 1/4 scale: shorter side 450 >= 2 * 224; 1/8 would be 225
    full = PillowDecoder(spec, draft=False).decode([big])
    assert drafted.width.tolist() == [2400] and drafted.height.tolist() == [1800]
    diff = (drafted.pixels - full.pixels).abs()
    assert 0 < diff.mean() < 0.01


def test_small_jpeg_is_not_drafted(spec, photo_jpegs):
    # 640x480 cannot be halved without going under 2 * 224, so draft changes nothing
    a = PillowDecoder(spec, draft=True).decode(photo_jpegs[:1])
    b = PillowDecoder(spec, draft=False).decode(photo_jpegs[:1])
    assert torch.equal(a.pixels, b.pixels)


def test_draft_reduces_only_jpegs_with_a_shorter_side_of_four_outputs(spec):
    def info(fmt, w, h):
        return ImageInfo(format=fmt, width=w, height=h, mode="RGB", has_alpha=False, is_animated=False, bit_depth=8)

    assert draft_reduces(info("JPEG", 2000, 896), 224)
    assert not draft_reduces(info("JPEG", 2000, 895), 224)  # halving would leave under 2 * 224
    assert draft_reduces(info("MPO", 900, 900), 224)
    assert not draft_reduces(info("PNG", 4000, 4000), 224)
    assert draft_reduces(info("JPEG", 700, 640), 160)


@pytest.mark.parametrize("draft", [True, False])
def test_threads_give_the_same_result_in_order(spec, photo_jpegs, truncated_jpeg, draft, monkeypatch):
    batch = [photo_jpegs[0], b"", encode(photo(2400, 1800, seed=5)), truncated_jpeg, *photo_jpegs[1:]]
    threads = set()
    crop = PillowDecoder._crop_rgb

    def spy(self, img, info):
        threads.add(threading.get_ident())
        return crop(self, img, info)

    monkeypatch.setattr(PillowDecoder, "_crop_rgb", spy)
    alone = PillowDecoder(spec, draft=draft).decode(batch)
    assert threads == {threading.get_ident()}
    threads.clear()
    pooled = PillowDecoder(spec, draft=draft, num_threads=3).decode(batch)
    assert threading.get_ident() not in threads and 1 <= len(threads) <= 3
    assert torch.equal(pooled.pixels, alone.pixels)
    assert pooled.errors == alone.errors and pooled.errors[1] is not None and pooled.errors[3] is not None
    assert pooled.width.tolist() == alone.width.tolist() and pooled.height.tolist() == alone.height.tolist()


def test_num_threads_must_be_positive(spec):
    with pytest.raises(ValueError, match="num_threads"):
        PillowDecoder(spec, num_threads=0)


def test_extreme_aspect_ratio_resizes_only_the_crop(spec):
    # 20000x10 would be a 448000x224 intermediate if resized whole
    out = PillowDecoder(spec).decode([encode(photo(20_000, 10, seed=6), "PNG")])
    assert out.errors == [None] and out.pixels.shape == (1, 3, 224, 224)


def test_bilinear_spec(photo_jpegs):
    spec = PreprocessSpec(size=96, interpolation="bilinear")
    out = PillowDecoder(spec).decode(photo_jpegs)
    assert out.pixels.shape == (len(photo_jpegs), 3, 96, 96)


def test_unknown_interpolation_is_refused():
    with pytest.raises(ValueError, match="interpolation"):
        PillowDecoder(PreprocessSpec(interpolation="lanczos"))


def test_pixel_bomb_is_refused_before_decoding(spec, monkeypatch):
    def no_load(self):
        raise AssertionError("full decode attempted")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    out = PillowDecoder(spec).decode([png_of_size(20_000, 20_000)])
    assert "over the pixel limit" in out.errors[0]


def test_make_decoder_pillow(spec):
    dec = make_decoder(spec, backend="pillow", draft=False, num_threads=2)
    assert isinstance(dec, PillowDecoder) and dec.name == "pillow" and dec.draft is False and dec.num_threads == 2
    with pytest.raises(ValueError, match="backend"):
        make_decoder(spec, backend="opencv")


def test_package_works_without_dali():
    code = (
        "import sys; sys.modules['nvidia.dali'] = None\n"  # makes `import nvidia.dali` fail
        "from dask_imgcurator.decode import PreprocessSpec, dali_available, make_decoder\n"
        "assert not dali_available()\n"
        "dec = make_decoder(PreprocessSpec(), device='gpu')\n"
        "assert dec.name == 'pillow', dec.name\n"
        "assert 'nvidia.dali' not in {k for k, v in sys.modules.items() if v is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


PLAIN_IMAGES = {
    "jpeg": lambda: encode(photo(640, 480, seed=11)),
    "progressive_jpeg": lambda: encode(photo(500, 333, seed=12), progressive=True, quality=90),
    "gray_jpeg": lambda: encode(photo(300, 400, seed=13).convert("L")),
    "subsampled_444_jpeg": lambda: encode(photo(257, 259, seed=14), subsampling=0, quality=95),
    "webp": lambda: encode(photo(400, 300, seed=18), "WEBP", quality=85),
    "lossless_webp": lambda: encode(photo(300, 400, seed=19), "WEBP", lossless=True),
}
# Plain PNGs, which Pillow decodes all the same (torchvision crashes on corrupt ones: test_corrupt_png.py)
PLAIN_PNGS = {
    "png": lambda: encode(photo(320, 240, seed=15), "PNG"),
    "gray_png": lambda: encode(photo(240, 320, seed=16).convert("L"), "PNG"),
    "png_with_gamma": lambda: encode(photo(300, 300, seed=17), "PNG", pnginfo=_png_with_gamma()),
}


def _png_with_gamma():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add(b"gAMA", (45455).to_bytes(4, "big"))  # gamma 1/2.2, which Pillow does not apply
    return info


@pytest.mark.parametrize("name", sorted(PLAIN_IMAGES))
def test_plain_images_decode_through_torchvision_to_pillows_pixels(spec, name, monkeypatch):
    """The fast path must be a pure speed-up: the same 8-bit pixels as Pillow's own decode."""
    import torchvision.io

    from dask_imgcurator.decode.probe import open_image

    blob = PLAIN_IMAGES[name]()
    img, info = open_image(blob)
    assert info.is_plain
    decoder = PillowDecoder(spec, draft=False)
    fast = decoder._fast_pixels(blob, info)
    assert fast is not None and fast.shape == (info.height, info.width, 3)
    assert np.array_equal(fast.numpy(), np.array(img.convert("RGB")))

    calls = []
    decode_image = torchvision.io.decode_image
    monkeypatch.setattr(torchvision.io, "decode_image", lambda *a, **k: calls.append(1) or decode_image(*a, **k))
    with_fast = decoder.decode([blob]).pixels
    monkeypatch.setattr(PillowDecoder, "_fast_pixels", lambda self, blob, info: None)
    assert calls == [1] and torch.equal(with_fast, decoder.decode([blob]).pixels)


@pytest.mark.parametrize("name", [*sorted(unusual_images()), *sorted(PLAIN_PNGS), "draft"])
def test_images_needing_pillow_skip_torchvision(spec, name):
    from dask_imgcurator.decode.probe import probe_image

    if name == "draft":  # libjpeg decodes it at 1/2 scale, through Pillow
        blob = encode(photo(2000, 1000, seed=2))
    else:
        blob = PLAIN_PNGS[name]() if name in PLAIN_PNGS else unusual_images()[name]
    assert PillowDecoder(spec)._fast_pixels(blob, probe_image(blob)) is None


def test_pillows_own_resize_decodes_with_pillow(spec):
    from dask_imgcurator.decode.probe import probe_image

    blob = encode(photo(64, 48))
    assert PillowDecoder(spec, resize="pillow")._fast_pixels(blob, probe_image(blob)) is None


def test_what_torchvision_refuses_gets_pillows_error(spec, truncated_jpeg):
    from dask_imgcurator.decode.probe import probe_image

    assert PillowDecoder(spec)._fast_pixels(truncated_jpeg, probe_image(truncated_jpeg)) is None
    assert PillowDecoder(spec).decode([truncated_jpeg]).errors[0].startswith("truncated or corrupt JPEG")
