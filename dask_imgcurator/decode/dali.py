"""NVIDIA DALI decoder (CPU or GPU "mixed"), with Pillow handling what DALI would get wrong.

Why ``fn.external_source`` fed with bytes located by our metadata, rather than DALI's own
``fn.readers.webdataset`` with index files: on the same 220 photo-like JPEGs (512-1600 px, 2 CPU
threads, same preprocessing), ``benchmarks/decode_feed.py`` measured 153.5 images/s fed by
external_source (including our reads by offset) against 147.8 images/s from the webdataset reader
(ratio 1.04). At equal speed, external_source keeps one output per dataframe row in order (after
any filter), decodes only the rows asked for, reads any fsspec URL, and lets one bad image be
retried alone; the reader would skip or fail a whole pipeline and has no notion of our rows.
"""
from __future__ import annotations

import functools
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dask_imgcurator.decode.base import DecodedBatch, DecodeError, PreprocessSpec
from dask_imgcurator.decode.pillow import PillowDecoder, draft_reduces
from dask_imgcurator.decode.preprocess import crop_box
from dask_imgcurator.decode.probe import ImageInfo, probe_image
from dask_imgcurator.decode.resize import empty_batch, normalized_rows, resize_center_crop

__all__ = ["DaliDecoder", "dali_available"]

# What goes to DALI: plain 8-bit RGB/gray stills (ImageInfo.is_plain) in formats it decodes like
# Pillow. Everything else (alpha, palettes, CMYK, 16-bit, animations, GIF, ...) needs Pillow's conversions.
# Not TIFF: Pillow applies its orientation tag on open (so the header size is the rotated one) and
# DALI does not; TIFFs are rare in web datasets.
_DALI_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})
# On the CPU, WebP goes to Pillow's share, where torchvision's libwebp decodes the same pixels
# faster than DALI's CPU decoder (40 photo-like WebPs of 0.65 MP, one thread, decode + resize:
# 11.9-15.8 against 15.1-18.6 ms per image on a 2-core AMD EPYC; 115 against 118 images/s on an
# Intel Xeon, where they are even).
_DALI_CPU_FORMATS = _DALI_FORMATS - {"WEBP"}


@functools.lru_cache(maxsize=None)
def dali_available() -> bool:
    """True when ``nvidia.dali`` imports (installed, and its native libraries load)."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


#: Default pixel budget of one DALI run: 128 MP, about 384 MB of decoded RGB.
DEFAULT_MAX_BATCH_PIXELS = 128_000_000


def _chunks(items: list[tuple[int, ImageInfo]], max_count: int, max_pixels: int) -> list[list[tuple[int, ImageInfo]]]:
    """Split in order into runs of at most ``max_count`` images and ``max_pixels`` pixels (one image may exceed it)."""
    chunks: list[list[tuple[int, ImageInfo]]] = []
    current: list[tuple[int, ImageInfo]] = []
    pixels = 0
    for item in items:
        size = item[1].width * item[1].height
        if current and (len(current) == max_count or pixels + size > max_pixels):
            chunks.append(current)
            current, pixels = [], 0
        current.append(item)
        pixels += size
    if current:
        chunks.append(current)
    return chunks


class DaliDecoder:
    """Decode with DALI: on the GPU decoders.image → resize → crop_mirror_normalize; on the CPU
    DALI decodes and torch resizes (:func:`~dask_imgcurator.decode.resize.resize_center_crop`).

    Every image is first probed from its header: empty, unrecognised and over-limit images
    get errors without reaching DALI, and images that DALI cannot convert like
    :class:`PillowDecoder` does are decoded by one, as are images DALI fails on (their error,
    if Pillow fails too, names both). Results come back in input order.

    On the CPU, JPEGs large enough for a reduced-scale decode (shorter side at least 4x the
    output, see ``draft``) go to Pillow's draft mode, which DALI's CPU decoder does not have,
    and WebP goes to Pillow's share too (torchvision's libwebp is as fast or faster there).
    Pillow decodes its share in a side thread while DALI runs (2 threads, 384 mixed photos:
    ~4% more images/s than one after the other).

    On the GPU the resize covers only the region the center crop keeps (see :func:`crop_box`),
    which reproduces torchvision's Resize + CenterCrop geometry exactly. On the CPU, DALI's own
    resize cost more than its decode (2.2 against 0.5 ms for a 0.13 MP JPEG, 4.5 against 2.1 for
    0.6 MP, one thread), so DALI only decodes there and torch's antialiased 8-bit resize, 5-9x
    faster, does the rest, as in :class:`PillowDecoder`. EXIF orientation is not applied, as in
    open_clip and :class:`PillowDecoder` (TIFFs, whose orientation Pillow applies, go to Pillow).
    On the CPU an image whose decoded size differs from its header's is decoded again by Pillow.
    A JPEG whose compressed data is damaged inside the image is decoded by DALI as far as it goes,
    the rest filled in, where Pillow refuses it ("broken data stream"; see README, Decoding).

    The pipeline is built on first use and reused; one instance must not be used by two
    threads at the same time.

    Parameters
    ----------
    spec : PreprocessSpec
        Output size, normalisation, interpolation and pixel limit.
    device : {"cpu", "gpu"}
        "gpu" decodes with the "mixed" backend (nvJPEG) and returns CUDA tensors.
    device_id : int, optional
        CUDA device for ``device="gpu"`` (default 0); ignored on CPU.
    num_threads : int
        DALI CPU worker threads.
    batch_size : int
        Largest batch one pipeline run takes; longer inputs are split.
    max_batch_pixels : int
        Largest total of pixels (width x height, read from the headers) in one pipeline run, so
        that a batch of very large images does not hold them all decoded at once (3 bytes each).
    draft : bool
        Decode large JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, through Pillow's
        draft mode, on ``num_threads`` threads) while their shorter side stays at least twice the
        output: on the CPU such JPEGs skip DALI, which always decodes and resizes the full
        image (1.7x faster on photos of 900+ px, pixels within 0.13 of open_clip's). On the GPU
        it only affects JPEGs that Pillow decodes anyway (CMYK, DALI failures).
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        device: str = "cpu",
        device_id: int | None = None,
        num_threads: int = 2,
        batch_size: int = 64,
        max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
        draft: bool = True,
    ):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")
        self.spec = spec
        self.device = device
        self.device_id = (device_id or 0) if device == "gpu" else None
        self.num_threads = num_threads
        self.batch_size = batch_size
        self.max_batch_pixels = max_batch_pixels
        self.draft = draft
        self.name = "dali-mixed" if device == "gpu" else "dali-cpu"
        # also validates spec.interpolation
        self._pillow = PillowDecoder(spec, draft=draft, num_threads=num_threads if device == "cpu" else 1)
        self._pipe: Any = None

    @property
    def torch_device(self) -> torch.device:
        """Where :meth:`decode` puts its pixels."""
        return torch.device("cuda", self.device_id) if self.device == "gpu" else torch.device("cpu")

    def decode(self, blobs: Sequence[bytes]) -> DecodedBatch:
        """Decode and preprocess a batch.

        Parameters
        ----------
        blobs : sequence of bytes
            Encoded images, any number.

        Returns
        -------
        DecodedBatch
            Pixels on :attr:`torch_device`. A failed image gets an error string and no row.
        """
        n = len(blobs)
        width = np.full(n, -1, dtype=np.int64)
        height = np.full(n, -1, dtype=np.int64)
        errors: list[str | None] = [None] * n
        to_dali: list[tuple[int, ImageInfo]] = []
        to_pillow: list[int] = []
        for i, blob in enumerate(blobs):
            try:
                info = probe_image(blob, self.spec.max_pixels)
            except DecodeError as exc:
                errors[i], width[i], height[i] = str(exc), exc.width, exc.height
                continue
            width[i], height[i] = info.width, info.height
            if _dali_handles(info, self.device) and not self._drafts(info):
                to_dali.append((i, info))
            else:
                to_pillow.append(i)
        decode = self._decode_cpu if self.device == "cpu" else self._decode_gpu
        return DecodedBatch(pixels=decode(blobs, to_dali, to_pillow, errors), width=width, height=height, errors=errors)

    def _decode_cpu(
        self, blobs: Sequence[bytes], to_dali: list[tuple[int, ImageInfo]], to_pillow: list[int],
        errors: list[str | None],
    ) -> torch.Tensor:
        """DALI's and Pillow's shares, each image written straight into its row of one batch."""
        batch = empty_batch(len(blobs), self.spec)

        def pillow_into(indices: list[int]) -> list[str | None]:
            return self._pillow.decode_into([blobs[i] for i in indices], [batch[i] for i in indices])[0]

        def store(i: int, crop: torch.Tensor) -> None:
            batch[i].copy_(crop)  # uint8 → float in the same pass

        # Pillow's share (large JPEGs in draft mode, images DALI would convert differently) is decoded
        # in a side thread while DALI decodes the rest, so that neither waits with a core idle.
        with ThreadPoolExecutor(1, thread_name_prefix="imgcurator-pillow-side") as side:
            pillow_part = side.submit(pillow_into, to_pillow) if to_pillow else None
            dali_failures = self._decode_on_dali(blobs, to_dali, store)
            if pillow_part is not None:
                self._merge_errors(to_pillow, pillow_part.result(), errors)
        if dali_failures:  # Pillow may still read what DALI refused
            retry = sorted(dali_failures)
            self._merge_errors(retry, pillow_into(retry), errors, dali_failures)
        return normalized_rows(batch, errors, self.spec)

    def _decode_gpu(
        self, blobs: Sequence[bytes], to_dali: list[tuple[int, ImageInfo]], to_pillow: list[int],
        errors: list[str | None],
    ) -> torch.Tensor:
        """DALI's normalised CUDA rows, and Pillow's share (images DALI would convert differently) copied over."""
        rows: list[torch.Tensor | None] = [None] * len(blobs)

        def place(indices: list[int], part: DecodedBatch, failures: dict[int, str] | None = None) -> None:
            self._merge_errors(indices, part.errors, errors, failures)
            decoded = iter(part.pixels.to(self.torch_device))
            for i, error in zip(indices, part.errors):
                if error is None:
                    rows[i] = next(decoded)

        with ThreadPoolExecutor(1, thread_name_prefix="imgcurator-pillow-side") as side:
            pillow_part = side.submit(self._pillow.decode, [blobs[i] for i in to_pillow]) if to_pillow else None
            dali_failures = self._decode_on_dali(blobs, to_dali, rows.__setitem__)
            if pillow_part is not None:
                place(to_pillow, pillow_part.result())
        if dali_failures:
            retry = sorted(dali_failures)
            place(retry, self._pillow.decode([blobs[i] for i in retry]), dali_failures)
        kept = [r for r, e in zip(rows, errors) if e is None]
        if not kept:
            return torch.empty((0, 3, self.spec.size, self.spec.size), dtype=torch.float32, device=self.torch_device)
        return torch.stack(kept)

    def _decode_on_dali(
        self, blobs: Sequence[bytes], items: list[tuple[int, ImageInfo]], store: Callable[[int, torch.Tensor], Any]
    ) -> dict[int, str]:
        """Decode ``items`` (index, header) with DALI, handing each result to ``store(index, pixels)``;
        returns DALI's reason for each failure."""
        failures: dict[int, str] = {}
        for chunk in _chunks(items, self.batch_size, self.max_batch_pixels):
            results = self._run_chunk([blobs[i] for i, _ in chunk], [info for _, info in chunk])
            for (i, _), result in zip(chunk, results):
                if isinstance(result, str):
                    failures[i] = result
                else:
                    store(i, result)
        return failures

    @staticmethod
    def _merge_errors(
        indices: list[int], part_errors: list[str | None], errors: list[str | None],
        dali_failures: dict[int, str] | None = None,
    ) -> None:
        """Put Pillow's errors for ``indices`` in place; an error also names DALI's, if DALI failed first."""
        for i, error in zip(indices, part_errors):
            if error is None:
                errors[i] = None
            elif dali_failures and i in dali_failures:
                errors[i] = f"{error}; {dali_failures[i]}"
            else:
                errors[i] = error

    def _drafts(self, info: ImageInfo) -> bool:
        """Whether this image goes to Pillow's reduced-scale JPEG decode instead of DALI."""
        return self.draft and self.device == "cpu" and draft_reduces(info, self.spec.size)

    def _run_chunk(self, blobs: list[bytes], infos: list[ImageInfo]) -> list[torch.Tensor | str]:
        """Decode up to ``batch_size`` images; after a failure, retry one by one to find the culprit.

        DALI reports a bad sample by failing the whole run and may leave the pipeline unusable,
        so every failure is followed by a rebuild. A failed sample gets DALI's reason instead.
        """
        try:
            return list(self._run(blobs, infos))
        except RuntimeError as exc:
            self._pipe = None
            if len(blobs) == 1:
                return [_dali_reason(exc)]
        return [self._run_chunk([blob], [info])[0] for blob, info in zip(blobs, infos)]

    def _run(self, blobs: list[bytes], infos: list[ImageInfo]) -> Sequence[torch.Tensor | str]:
        """One pipeline run: on the CPU (3, size, size) uint8 crops (or why DALI's pixels were not
        used), on the GPU normalised float rows."""
        if self._pipe is None:
            self._pipe = self._build()
        pipe = self._pipe
        pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
        if self.device == "cpu":
            (out,) = pipe.run()

            def crop(i: int) -> torch.Tensor | str:
                # a view of DALI's output buffer (valid until the next run), resized into a new tensor
                pixels = np.asarray(out[i])
                if pixels.shape[:2] != (infos[i].height, infos[i].width):  # Pillow would see another image
                    return (f"DALI decoded {pixels.shape[1]}x{pixels.shape[0]} pixels where the header says "
                            f"{infos[i].width}x{infos[i].height}")
                return resize_center_crop(pixels, infos[i].width, infos[i].height, self.spec)

            if self.num_threads == 1 or len(infos) == 1:
                return [crop(i) for i in range(len(infos))]
            # torch resizes one image on one thread (and releases the GIL): spread them over the
            # threads DALI decoded on, or the other cores idle while the resizes run one by one
            with ThreadPoolExecutor(min(self.num_threads, len(infos)), thread_name_prefix="imgcurator-resize") as pool:
                return list(pool.map(crop, range(len(infos))))
        boxes = [crop_box(info.width, info.height, self.spec.size) for info in infos]
        # DALI's ROI is (y, x) ordered, like the tensor shape
        pipe.feed_input("roi_start", [np.array([top, left], dtype=np.float32) for left, top, _, _ in boxes])
        pipe.feed_input("roi_end", [np.array([bottom, right], dtype=np.float32) for _, _, right, bottom in boxes])
        (out,) = pipe.run()
        return self._gpu_output_to_torch(out)

    def _gpu_output_to_torch(self, out: Any) -> torch.Tensor:
        """The GPU pipeline's (N, 3, size, size) float output as a CUDA tensor, on torch's stream."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        size = self.spec.size
        dense = out.as_tensor()
        result = torch.empty((len(out), 3, size, size), dtype=torch.float32, device=self.torch_device)
        feed_ndarray(dense, result, cuda_stream=torch.cuda.current_stream(self.torch_device))
        return result

    def _build(self) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        spec = self.spec
        gpu = self.device == "gpu"
        interp = types.INTERP_CUBIC if spec.interpolation == "bicubic" else types.INTERP_LINEAR

        # prefetch_queue_depth=1: a run returns (or fails with) exactly the batch just fed.
        # With the default depth of 2 errors surface one run late and outputs lag behind inputs.
        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
        )
        def graph():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            decoder_args = {"jpeg_fancy_upsampling": True} if gpu else {}  # match libjpeg-turbo's upsampling
            images = fn.decoders.image(
                encoded,
                device="mixed" if gpu else "cpu",
                output_type=types.RGB,
                adjust_orientation=False,  # Pillow/open_clip ignore EXIF orientation too
                **decoder_args,
            )
            if not gpu:  # torch resizes on the CPU (see the class docstring)
                return images
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            images = fn.resize(
                images,
                size=[spec.size, spec.size],
                roi_start=roi_start,
                roi_end=roi_end,
                interp_type=interp,
                antialias=True,
            )
            return fn.crop_mirror_normalize(
                images,
                mean=[m * 255 for m in spec.mean],
                std=[s * 255 for s in spec.std],
                output_layout="CHW",
                dtype=types.FLOAT,
            )

        pipe = graph()
        pipe.build()
        return pipe


def _dali_handles(info: ImageInfo, device: str) -> bool:
    return info.format in (_DALI_CPU_FORMATS if device == "cpu" else _DALI_FORMATS) and info.is_plain


def _dali_reason(exc: Exception) -> str:
    """The useful part of DALI's multi-line "Critical error in pipeline" message."""
    text = str(exc)
    op = re.search(r"operator `nvidia\.dali\.fn\.([\w.]+)`", text)
    detail = text.split("encountered:", 1)[-1]
    detail = detail.split("Current pipeline object is no longer valid", 1)[0]
    detail = re.sub(r"\s*sample #\d+\s*", " sample ", detail)
    detail = " ".join(detail.split()).rstrip(" :") or text.splitlines()[0]
    return f"DALI {op.group(1) if op else 'pipeline'} error: {detail}"
