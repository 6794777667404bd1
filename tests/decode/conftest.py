"""Image-making fixtures for the decode tests, and the bad-image matrix both decoders must pass.

Everything is generated with Pillow/numpy; nothing is downloaded.
"""
from __future__ import annotations

import io
import itertools
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pytest
import torch
from PIL import Image

from dask_imgcurator.decode import DecodedBatch, PreprocessSpec

#: (width, height) of the photo-like test images: landscape, portrait, square, tiny, odd.
PHOTO_SIZES = [(640, 480), (1000, 300), (16, 16), (300, 1000), (225, 229), (512, 512), (1234, 877)]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like RGB: smooth gradients, a few flat shapes with hard edges, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack(
        [
            128 + 90 * np.sin(x / (width / 3.1) + seed),
            128 + 90 * np.cos(y / (height / 2.3)),
            255 * (x + y) / (width + height),
        ],
        axis=-1,
    )
    for _ in range(3):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.1, 0.3) * min(width, height)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 8, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, rows: Iterable[bytes], bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """Assemble a PNG from unfiltered scanlines (each without its filter byte).

    Pillow cannot write every variant (16-bit RGB, for one), and writes huge ones slowly.
    """
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(b"\x00" + row) for row in rows) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_of_size(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size: a 20000x20000 one is about 50 kB (a pixel bomb)."""
    return raw_png(width, height, itertools.repeat(bytes((width + 7) // 8), height), bit_depth=1, colour_type=0)


def png_16bit_rgb(pixels: np.ndarray) -> bytes:
    """16-bit RGB PNG from a (H, W, 3) uint16 array."""
    height, width, _ = pixels.shape
    rows = (row.astype(">u2").tobytes() for row in pixels)
    return raw_png(width, height, rows, bit_depth=16, colour_type=2)


def normalised_white(spec: PreprocessSpec) -> torch.Tensor:
    """What a white pixel becomes: (1 - mean) / std per channel, shape (3, 1, 1)."""
    return ((1 - torch.tensor(spec.mean)) / torch.tensor(spec.std)).view(3, 1, 1)


def transparent_png() -> bytes:
    """Fully transparent RGBA PNG whose hidden colour is black."""
    return encode(Image.new("RGBA", (50, 40), (0, 0, 0, 0)), "PNG")


def unnormalize(pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Normalised (..., 3, H, W) back to 0..1 RGB."""
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return pixels.cpu() * std + mean


@dataclass
class ImageCase:
    """One input and its exact expected outcome.

    Either ``error`` (a phrase the error string must contain) or ``check`` (called with the
    decoded row, un-normalised to 0..1 RGB, shape (3, S, S)) is set.
    """

    blob: bytes
    width: int
    height: int
    error: str | None = None
    check: Callable[[torch.Tensor], None] | None = None
    spec_overrides: dict = field(default_factory=dict)

    def verify(self, batch: DecodedBatch, spec: PreprocessSpec) -> None:
        assert batch.width.tolist() == [self.width] and batch.height.tolist() == [self.height]
        if self.error is not None:
            assert batch.errors[0] is not None and self.error in batch.errors[0], batch.errors
            assert batch.pixels.shape == (0, 3, spec.size, spec.size)
            return
        assert batch.errors == [None]
        assert batch.pixels.shape == (1, 3, spec.size, spec.size)
        rgb = unnormalize(batch.pixels[0], spec)
        assert rgb.min() > -0.01 and rgb.max() < 1.01
        self.check(rgb)


def _rgb_close(region: torch.Tensor, colour: tuple[int, int, int], levels: float = 3) -> None:
    want = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255
    assert (region - want).abs().max() <= levels / 255 + 1e-4, region.mean(dim=(1, 2)) * 255


def _with_transparent_top(img: Image.Image) -> Image.Image:
    """RGBA with the top third fully transparent (and black underneath), the rest opaque."""
    rgba = np.array(img.convert("RGBA"))
    rgba[: img.height // 3, :, :3] = 0
    rgba[: img.height // 3, :, 3] = 0
    return Image.fromarray(rgba, "RGBA")


def _white_top(rgb: torch.Tensor) -> None:
    # Output rows 0..~70 come from the transparent top third; keep clear of the resize blur.
    _rgb_close(rgb[:, :60, :], (255, 255, 255), levels=0)
    assert rgb[:, 100:, :].mean() < 0.9  # the opaque photo is not white


def _grey(rgb: torch.Tensor) -> None:
    assert torch.allclose(rgb[0], rgb[1], atol=1e-5) and torch.allclose(rgb[1], rgb[2], atol=1e-5)
    assert rgb.std() > 0.05  # still the photo, not a flat fill


def _bad_cases() -> dict[str, Callable[[], ImageCase]]:
    good = encode(photo(320, 240, seed=7), quality=90)
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    gif = io.BytesIO()
    red, green = Image.new("RGB", (64, 48), (220, 20, 30)), Image.new("RGB", (64, 48), (10, 200, 40))
    red.save(gif, "GIF", save_all=True, append_images=[green], duration=100, loop=0)
    return {
        "corrupt_jpeg": lambda: ImageCase(b"\xff\xd8" + b"\x00" + noise, -1, -1, error="unrecognised"),
        "truncated_jpeg": lambda: ImageCase(good[: len(good) // 2], 320, 240, error="truncated or corrupt JPEG"),
        "zero_bytes": lambda: ImageCase(b"", -1, -1, error="empty image (0 bytes)"),
        "random_bytes": lambda: ImageCase(noise, -1, -1, error="unrecognised"),
        "png_rgba": lambda: ImageCase(
            encode(_with_transparent_top(photo(300, 240, 1)), "PNG"), 300, 240, check=_white_top
        ),
        "webp_alpha": lambda: ImageCase(
            encode(_with_transparent_top(photo(300, 240, 2)), "WEBP", lossless=True), 300, 240, check=_white_top
        ),
        "grayscale_jpeg": lambda: ImageCase(encode(photo(300, 200, 3).convert("L")), 300, 200, check=_grey),
        "cmyk_jpeg": lambda: ImageCase(
            encode(Image.new("RGB", (120, 90), (200, 40, 60)).convert("CMYK"), quality=95),
            120,
            90,
            check=lambda rgb: _rgb_close(rgb, (200, 40, 60)),
        ),
        "png_16bit": lambda: ImageCase(
            encode(Image.fromarray(np.full((50, 70), 32896, np.uint16)), "PNG"),  # 32896 = 128 * 257
            70,
            50,
            check=lambda rgb: _rgb_close(rgb, (128, 128, 128), levels=0),
        ),
        "animated_gif": lambda: ImageCase(
            gif.getvalue(), 64, 48, check=lambda rgb: _rgb_close(rgb, (220, 20, 30), levels=4)
        ),
        "over_pixel_limit": lambda: ImageCase(
            encode(photo(200, 200, 4)),
            200,
            200,
            error="200x200 = 0.04 MP, over the pixel limit of 0.01 MP",
            spec_overrides={"max_pixels": 10_000},
        ),
        "png_pixel_bomb": lambda: ImageCase(
            png_of_size(20_000, 20_000), 20_000, 20_000, error="20000x20000 = 400.0 MP, over the pixel limit of 89.5 MP"
        ),
    }


BAD_CASES = _bad_cases()


@pytest.fixture
def spec() -> PreprocessSpec:
    return PreprocessSpec()


@pytest.fixture(params=sorted(BAD_CASES))
def image_case(request) -> ImageCase:
    """Each entry of the bad-image matrix in turn."""
    return BAD_CASES[request.param]()


@pytest.fixture(scope="session")
def photo_jpegs() -> list[bytes]:
    """Opaque RGB JPEGs (quality 90) in all PHOTO_SIZES."""
    return [encode(photo(w, h, seed=i), quality=90) for i, (w, h) in enumerate(PHOTO_SIZES)]


@pytest.fixture(scope="session")
def truncated_jpeg(photo_jpegs) -> bytes:
    return photo_jpegs[0][: len(photo_jpegs[0]) // 2]


def unusual_images() -> dict[str, bytes]:
    """Images that need Pillow's conversions (neither DALI nor torchvision decodes them), by name."""
    return {
        "cmyk": encode(photo(80, 60).convert("CMYK")),
        "rgba": encode(photo(80, 60).convert("RGBA"), "PNG"),
        "palette": encode(photo(80, 60).quantize(), "PNG"),
        "gif": encode(photo(80, 60), "GIF"),
        "png16": png_16bit_rgb(np.full((60, 80, 3), 30000, np.uint16)),
    }
