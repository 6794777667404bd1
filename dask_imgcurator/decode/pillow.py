"""The CPU decoder without DALI: Pillow (and torchvision's decoders) + CLIP preprocessing, as open_clip's eval transform."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dask_imgcurator.decode.base import DecodedBatch, DecodeError, PreprocessSpec
from dask_imgcurator.decode.preprocess import crop_box, crop_offset, resized_size
from dask_imgcurator.decode.probe import ImageInfo, open_image
from dask_imgcurator.decode.resize import empty_batch, normalized_rows, resize_center_crop, resizes_whole

__all__ = ["PillowDecoder", "draft_reduces"]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_WHITE = (255, 255, 255)
_RESIZERS = ("torch", "pillow")
# JPEG draft keeps at least this many times the output size, leaving the last 2x+ reduction to the
# antialiased resize (like Pillow's thumbnail reducing_gap): max error 0.18 instead of 0.48 for
# a shorter-side-only draft, for about 30% more time; both are ~2x faster than no draft.
_DRAFT_GAP = 2
_DRAFT_FORMATS = ("JPEG", "MPO")  # MPO: multi-picture JPEGs from cameras and phones
# Plain images in these formats are decoded by torchvision (see PillowDecoder._fast_pixels). Never PNG:
# torchvision 0.29's libpng error path segfaults on a bad IDAT CRC or filter byte, killing the worker,
# where Pillow loads the one and raises OSError on the other (tests/decode/test_corrupt_png.py).
_TORCHVISION_FORMATS = frozenset({"JPEG", "WEBP"})


class PillowDecoder:
    """Decode with Pillow, one image at a time.

    Pillow opens and checks every image. The pixels of plain 8-bit RGB or gray JPEG and WebP
    stills that are not drafted come from torchvision's decoders, the same libraries returning
    the same pixels ~1.5x faster (with ``resize="torch"``, the default); PNG is always decoded
    by Pillow, which fails safely on corrupt files where torchvision crashes. Every image
    is converted to RGB (alpha composited onto white, 16-bit scaled to 8-bit,
    first frame of animations), its shorter side resized to ``spec.size`` and center cropped,
    as torchvision does for PIL images, then scaled to 0..1 and normalised. Like open_clip,
    EXIF orientation is not applied (except TIFF's orientation tag, which Pillow applies when it
    opens the file, for open_clip too). With ``resize="pillow"`` and no draft the output is
    bit-identical to open_clip's eval transform on the opened image. Stateless, so safe to
    share across threads.

    Parameters
    ----------
    spec : PreprocessSpec
        Output size, normalisation, interpolation and pixel limit.
    draft : bool
        Let libjpeg decode JPEGs at 1/2, 1/4 or 1/8 scale while the shorter side stays at
        least ``2 * spec.size``: about twice as fast on large photos, slightly different pixels.
    num_threads : int
        Images decoded at the same time (Pillow releases the GIL while it decodes and resizes).
    resize : {"torch", "pillow"}
        "torch": torch's antialiased 8-bit resize (:mod:`~dask_imgcurator.decode.resize`), ~5x
        faster than Pillow's, within two 8-bit levels of it; "pillow": Pillow's own resize,
        bit-identical to open_clip.
    """

    name = "pillow"

    def __init__(self, spec: PreprocessSpec, draft: bool = True, num_threads: int = 1, resize: str = "torch"):
        if spec.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation {spec.interpolation!r} is not one of {sorted(_RESAMPLE)}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, not {num_threads}")
        if resize not in _RESIZERS:
            raise ValueError(f"resize must be one of {_RESIZERS}, not {resize!r}")
        self.spec = spec
        self.draft = draft
        self.num_threads = num_threads
        self.resize = resize

    def decode(self, blobs: Sequence[bytes]) -> DecodedBatch:
        """Decode and preprocess a batch.

        Parameters
        ----------
        blobs : sequence of bytes
            Encoded images.

        Returns
        -------
        DecodedBatch
            A failed image gets an error string and no row; the others are unaffected.
        """
        batch = empty_batch(len(blobs), self.spec)
        errors, width, height = self.decode_into(blobs, list(batch))
        return DecodedBatch(pixels=normalized_rows(batch, errors, self.spec), width=width, height=height, errors=errors)

    def decode_into(
        self, blobs: Sequence[bytes], rows: Sequence[torch.Tensor]
    ) -> tuple[list[str | None], np.ndarray, np.ndarray]:
        """Decode ``blobs[i]`` into ``rows[i]``, a float32 (3, size, size) tensor, as 0..255 values
        (not normalised: see :func:`~dask_imgcurator.decode.resize.normalized_rows`).

        Returns
        -------
        (errors, width, height)
            Per image: the error or None (a failed image leaves its row as it was), and the size
            from its header (-1 where unknown).
        """
        n = len(blobs)
        width = np.full(n, -1, dtype=np.int64)
        height = np.full(n, -1, dtype=np.int64)
        errors: list[str | None] = [None] * n

        def decode_row(i: int) -> None:
            errors[i], width[i], height[i] = self._decode_one(blobs[i], rows[i])

        if self.num_threads > 1 and n > 1:
            # a pool per call keeps the decoder stateless; starting threads costs far less than one image
            with ThreadPoolExecutor(min(self.num_threads, n), thread_name_prefix="imgcurator-pillow") as pool:
                list(pool.map(decode_row, range(n)))
        else:
            for i in range(n):
                decode_row(i)
        return errors, width, height

    def _decode_one(self, blob: bytes, out: torch.Tensor) -> tuple[str | None, int, int]:
        """Decode one image into ``out``; returns (error or None, width, height)."""
        try:
            img, info = open_image(blob, self.spec.max_pixels)
        except DecodeError as exc:
            return str(exc), exc.width, exc.height
        try:
            pixels = self._fast_pixels(blob, info)
            if pixels is not None:
                out.copy_(resize_center_crop(pixels, info.width, info.height, self.spec))
            else:
                out.copy_(self._crop_rgb(img, info))
        except Exception as exc:  # a broken image must cost its own row only
            return _describe(exc, info), info.width, info.height
        return None, info.width, info.height

    def _fast_pixels(self, blob: bytes, info: ImageInfo) -> torch.Tensor | None:
        """(H, W, 3) uint8 pixels from torchvision's decoders, for plain JPEG/WebP images
        resized by torch at full scale; None where Pillow decodes (PNG, draft, conversions, its resize).

        torchvision wraps the same libjpeg-turbo and libwebp as Pillow and returns the same
        pixels (``tests/decode/test_pillow.py``), ~1.5x faster: on the benchmark photos, one
        thread, JPEG 0.56 against 0.89 ms below 448 px and 2.25 against 3.28 ms below 896 px,
        WebP 1.2-1.6x. Anything it refuses (a corrupt file, a format this torchvision lacks)
        returns None, and Pillow's decode gives the image's error.
        """
        if self.resize != "torch" or info.format not in _TORCHVISION_FORMATS or not info.is_plain:
            return None
        if self.draft and draft_reduces(info, self.spec.size):
            return None
        from torchvision.io import ImageReadMode, decode_image

        try:
            # bytearray: torch wants a writable buffer; the copy is of the compressed bytes only
            chw = decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            return None
        if tuple(chw.shape[1:]) != (info.height, info.width):  # not what the header said: Pillow decides
            return None
        return chw.permute(1, 2, 0)

    def _crop_rgb(self, img: Image.Image, info: ImageInfo) -> torch.Tensor:
        """The opened image converted, resized and center cropped: (3, size, size) uint8."""
        size = self.spec.size
        # Source pixels per original pixel: 1, or 1/2, 1/4, 1/8 once libjpeg decodes at reduced scale.
        fx = fy = 1.0
        if self.draft and info.format in _DRAFT_FORMATS:
            fx, fy = self._apply_draft(img, info)
        rgb = _to_rgb(img, info)
        if self.resize == "torch":
            return resize_center_crop(np.array(rgb), info.width, info.height, self.spec, scale=(fx, fy))
        resample = _RESAMPLE[self.spec.interpolation]
        new_w, new_h = resized_size(info.width, info.height, size)
        if resizes_whole(new_w, new_h, rgb.width * rgb.height, size):
            # Resize everything, then crop: bit-identical to torchvision. (Pillow's resize with a
            # cropping box orders its two passes differently and drifts by a few levels.)
            left, top = crop_offset(new_w, new_h, size)
            resized = rgb.resize((new_w, new_h), resample, box=(0, 0, info.width * fx, info.height * fy))
            return _chw(resized.crop((left, top, left + size, top + size)))
        # Extreme upscales: resize only the kept region instead of a huge intermediate.
        left, top, right, bottom = crop_box(info.width, info.height, size)
        return _chw(rgb.resize((size, size), resample, box=(left * fx, top * fy, right * fx, bottom * fy)))

    def _apply_draft(self, img: Image.Image, info: ImageInfo) -> tuple[float, float]:
        """Ask libjpeg for a power-of-two reduction whose shorter side stays >= 2 * spec.size.

        Returns the (x, y) factors from original to drafted pixel coordinates.
        """
        short = min(info.width, info.height)
        target = _DRAFT_GAP * self.spec.size
        wanted = (
            -(-info.width * target // short),  # ceil: the draft never goes below this
            -(-info.height * target // short),
        )
        drafted = img.draft("RGB", wanted)
        if drafted is None:
            return 1.0, 1.0
        _, (_, _, scaled_w, scaled_h) = drafted
        return scaled_w / info.width, scaled_h / info.height


def _chw(img: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as a (3, H, W) uint8 tensor (channels-last strides)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def draft_reduces(info: ImageInfo, size: int) -> bool:
    """True when draft mode decodes this image at reduced scale for output side ``size``.

    libjpeg scales by 1/2, 1/4 or 1/8, and the draft keeps the shorter side at least
    ``2 * size``: a JPEG is decoded smaller only when its shorter side is at least ``4 * size``.
    """
    return info.format in _DRAFT_FORMATS and min(info.width, info.height) >= 2 * _DRAFT_GAP * size


def _to_rgb(img: Image.Image, info: ImageInfo) -> Image.Image:
    """Any Pillow mode → 8-bit RGB, transparency composited onto white (first frame if animated)."""
    if img.mode.startswith("I"):
        values = np.asarray(img)
        gray = _gray16_to_8(values, info.bit_depth)
        key = img.info.get("transparency")
        if isinstance(key, int):  # a colour key (16-bit gray PNG's tRNS): those pixels are transparent
            gray[values == key] = 255
        return Image.fromarray(gray).convert("RGB")
    if info.has_alpha:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image


def _gray16_to_8(values: np.ndarray, bit_depth: int) -> np.ndarray:
    """Scale integer grayscale to 0..255 (Pillow's own convert("L") clips everything above 255)."""
    if bit_depth <= 8:
        return np.clip(values, 0, 255).astype(np.uint8)
    # round(v * 255 / 65535) = round(v / 257) = (v + 128) // 257 (no ties), in 4 bytes per pixel
    # where float64 took 16 (a 9400 x 9400 16-bit PNG: +2.4 GB)
    scaled = np.clip(values, 0, 65535).astype(np.uint32)
    scaled += 128
    scaled //= 257
    return scaled.astype(np.uint8)


def _describe(exc: Exception, info: ImageInfo) -> str:
    if isinstance(exc, (OSError, SyntaxError, EOFError)):  # what Pillow's decoders raise on bad data
        return f"truncated or corrupt {info.format}: {exc}"
    return f"cannot decode {info.format} ({info.mode}): {type(exc).__name__}: {exc}"
