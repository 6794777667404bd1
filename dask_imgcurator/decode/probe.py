"""Read an encoded image's header (format, size, mode, alpha, animation) without decoding it."""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from dask_imgcurator.decode.base import DEFAULT_MAX_PIXELS, DecodeError

__all__ = ["ImageInfo", "open_image", "probe_image"]

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_PLAIN_MODES = frozenset({"RGB", "L"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Serialises the brief window in which Pillow's own pixel limit is lifted (a process-wide global).
_PILLOW_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says about it.

    Attributes
    ----------
    format : str
        Pillow's format name ("JPEG", "PNG", "WEBP", "GIF", ...).
    width, height : int
        Size in pixels as Pillow opens the image: as stored, EXIF orientation not applied,
        except for TIFF, whose orientation tag Pillow applies (5-8 swap width and height).
    mode : str
        Pillow mode of the first frame ("RGB", "L", "CMYK", "I;16", "P", ...).
    has_alpha : bool
        An alpha channel or a transparent palette entry / colour key is present.
    is_animated : bool
        More than one frame (GIF, APNG, WebP, multi-page TIFF).
    bit_depth : int
        Bits per channel, as far as the header tells (8 for ordinary images, 16 for 16-bit PNGs).
    """

    format: str
    width: int
    height: int
    mode: str
    has_alpha: bool
    is_animated: bool
    bit_depth: int

    @property
    def is_plain(self) -> bool:
        """An 8-bit RGB or gray still image without transparency: its pixels need no conversion
        beyond gray → RGB, so any decoder of its format yields what Pillow's ``convert("RGB")`` does."""
        return (self.mode in _PLAIN_MODES and self.bit_depth == 8 and not self.has_alpha
                and not self.is_animated)


def probe_image(blob: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Describe an encoded image from its header alone.

    Parameters
    ----------
    blob : bytes
        The encoded file.
    max_pixels : int
        Refuse images whose width * height exceeds this (decompression-bomb guard).

    Returns
    -------
    ImageInfo

    Raises
    ------
    DecodeError
        Empty input, data Pillow does not recognise, or an image over ``max_pixels``.
    """
    return open_image(blob, max_pixels)[1]


def open_image(blob: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, ImageInfo]:
    """Open an image lazily and check it like :func:`probe_image`.

    Returns
    -------
    (PIL.Image.Image, ImageInfo)
        The image is not loaded yet, so the caller can still request JPEG draft mode.
    """
    if len(blob) == 0:
        raise DecodeError("empty image (0 bytes)")
    img, is_animated = _open_unlimited(blob)
    width, height = img.size
    if width * height > max_pixels:
        raise DecodeError(
            f"image is {width}x{height} = {_megapixels(width * height)}, over the pixel limit of "
            f"{_megapixels(max_pixels)}; raise max_pixels to allow it",
            width=width,
            height=height,
        )
    info = ImageInfo(
        format=img.format or "unknown",
        width=width,
        height=height,
        mode=img.mode,
        has_alpha=img.mode in _ALPHA_MODES or "transparency" in img.info,
        is_animated=is_animated,
        bit_depth=_bit_depth(blob, img),
    )
    return img, info


def _open_unlimited(blob: bytes) -> tuple[Image.Image, bool]:
    """``Image.open`` (and the animation check) with Pillow's own bomb check lifted.

    ``max_pixels`` is the guard here: Pillow would raise before telling us the size, and its
    limit may be lower than ours. Only headers are parsed, so the lifted window is short.
    """
    with _PILLOW_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(io.BytesIO(blob))
            return img, bool(getattr(img, "is_animated", False))
        except UnidentifiedImageError:
            raise DecodeError(f"unrecognised image data ({len(blob)} bytes, starts {blob[:8]!r})") from None
        except Exception as exc:  # any parser failure on untrusted bytes is this image's problem only
            raise DecodeError(f"unreadable image header: {type(exc).__name__}: {exc}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _megapixels(pixels: int) -> str:
    mp = pixels / 1e6
    return f"{mp:.1f} MP" if mp >= 0.1 else f"{mp:.2g} MP"


def _bit_depth(blob: bytes, img: Image.Image) -> int:
    if blob.startswith(_PNG_SIGNATURE) and len(blob) > 24:
        return blob[24]  # IHDR bit depth: Pillow reduces 16-bit RGB(A) PNGs to 8-bit modes silently
    if img.mode.startswith("I;16"):
        return 16
    if img.mode in ("I", "F"):
        return 32
    if img.mode == "1":
        return 1
    return 8
