"""probe_image: header facts, refusals, and the decompression-bomb guard."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from dask_imgcurator.decode import DecodeError, probe_image

from .conftest import encode, photo, png_16bit_rgb, png_of_size


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in [(255, 0, 0), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


RGBA = Image.new("RGBA", (40, 30), (10, 20, 30, 128))
CASES = {
    "jpeg": (encode(photo(64, 48)), "JPEG", "RGB", False, False, 8),
    "jpeg_gray": (encode(photo(64, 48).convert("L")), "JPEG", "L", False, False, 8),
    "jpeg_cmyk": (encode(photo(64, 48).convert("CMYK")), "JPEG", "CMYK", False, False, 8),
    "png_rgba": (encode(RGBA, "PNG"), "PNG", "RGBA", True, False, 8),
    "png_la": (encode(RGBA.convert("LA"), "PNG"), "PNG", "LA", True, False, 8),
    "png_palette_transparent": (encode(RGBA.quantize(), "PNG", transparency=0), "PNG", "P", True, False, 8),
    "png_palette": (encode(photo(64, 48).quantize(), "PNG"), "PNG", "P", False, False, 8),
    "png_16bit_gray": (encode(Image.fromarray(np.zeros((30, 40), np.uint16)), "PNG"), "PNG", "I;16", False, False, 16),
    "webp_alpha": (encode(RGBA, "WEBP", lossless=True), "WEBP", "RGBA", True, False, 8),
    "webp": (encode(photo(40, 30), "WEBP"), "WEBP", "RGB", False, False, 8),
    "gif_animated": (_animated("GIF"), "GIF", "P", False, True, 8),
    "webp_animated": (_animated("WEBP"), "WEBP", "RGB", False, True, 8),
    "bmp": (encode(photo(40, 30), "BMP"), "BMP", "RGB", False, False, 8),
    "tiff": (encode(photo(40, 30), "TIFF"), "TIFF", "RGB", False, False, 8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_header_facts(name):
    blob, fmt, mode, has_alpha, is_animated, bit_depth = CASES[name]
    info = probe_image(blob)
    assert (info.format, info.mode, info.has_alpha, info.is_animated, info.bit_depth) == (
        fmt,
        mode,
        has_alpha,
        is_animated,
        bit_depth,
    )
    assert (info.width, info.height) in {(64, 48), (40, 30)}


def test_16bit_rgb_png_reports_its_depth():
    # Pillow opens these as 8-bit "RGB"; the IHDR still says 16
    info = probe_image(png_16bit_rgb(np.full((30, 40, 3), 40000, np.uint16)))
    assert (info.mode, info.bit_depth, info.width, info.height) == ("RGB", 16, 40, 30)


def test_probe_does_not_decode(monkeypatch):
    def no_load(self):
        raise AssertionError("full decode attempted")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    assert probe_image(encode(photo(64, 48))).width == 64


def test_empty():
    with pytest.raises(DecodeError, match=r"^empty image \(0 bytes\)$"):
        probe_image(b"")


@pytest.mark.parametrize("blob", [b"hello world", np.random.default_rng(0).bytes(3000), b"\xff\xd8\x00garbage"])
def test_unrecognised(blob):
    with pytest.raises(DecodeError, match="unrecognised image data"):
        probe_image(blob)


def test_pixel_limit_message():
    with pytest.raises(DecodeError) as err:
        probe_image(png_of_size(30_000, 30_000))
    assert str(err.value) == (
        "image is 30000x30000 = 900.0 MP, over the pixel limit of 89.5 MP; raise max_pixels to allow it"
    )
    assert (err.value.width, err.value.height) == (30_000, 30_000)


def test_pixel_limit_is_exclusive():
    blob = encode(photo(100, 100))
    assert probe_image(blob, max_pixels=10_000).width == 100
    with pytest.raises(DecodeError, match="over the pixel limit"):
        probe_image(blob, max_pixels=9_999)


def test_our_limit_replaces_pillows_without_changing_it():
    before = Image.MAX_IMAGE_PIXELS
    bomb = png_of_size(20_000, 20_000)  # 400 MP: Pillow alone refuses over 179 MP
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    info = probe_image(bomb, max_pixels=500_000_000)
    assert (info.width, info.height, info.mode) == (20_000, 20_000, "1")
    assert Image.MAX_IMAGE_PIXELS == before
