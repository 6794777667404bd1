"""Built-in sample data: small photo-like WebDataset shards generated on the fly."""
from __future__ import annotations

import io
import json
import posixpath
import tarfile

import numpy as np
from fsspec.core import url_to_fs
from PIL import Image

from dask_imgcurator.io.shards import full_url

__all__ = ["make_demo_shards", "synthetic_image"]


def synthetic_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: a smooth colour gradient, a few shapes, and sensor noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-0.6, 0.6, size=(3, 2))
    img = np.stack([base[c] + slope[c, 0] * x * 255 / width + slope[c, 1] * y * 255 / height for c in range(3)], -1)
    for _ in range(rng.integers(1, 5)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.3) * min(width, height)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 6, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_demo_shards(
    out_dir: str,
    n_shards: int = 4,
    samples_per_shard: int = 16,
    *,
    seed: int = 0,
    min_side: int = 64,
    max_side: int = 320,
    broken: bool = False,
) -> list[str]:
    """Write ``n_shards`` WebDataset tars of photo-like JPEG/PNG images with captions and JSON.

    Parameters
    ----------
    out_dir : str
        Local directory or fsspec URL; created if missing.
    n_shards, samples_per_shard : int
        How much data to make.
    seed : int
        Same seed, same bytes.
    min_side, max_side : int
        Range of the images' longer side in pixels.
    broken : bool
        Also put two bad samples at the end of the first shard, as real data has them: a
        truncated JPEG (``.bad.jpg`` key suffix ``b``) and a sample with text but no image.

    Returns
    -------
    list of str
        The shard paths, ``demo-00000.tar`` onwards.

    Examples
    --------
    >>> paths = make_demo_shards("memory://demo-doc", n_shards=1, samples_per_shard=2)
    >>> [p.rsplit("/", 1)[-1] for p in paths]
    ['demo-00000.tar']
    """
    rng = np.random.default_rng(seed)
    fs, root = url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    paths = demo_shard_paths(out_dir, n_shards)
    for s, url in enumerate(paths):
        path = url_to_fs(url)[1]
        with fs.open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(samples_per_shard):
                key = f"{s:05d}{i:04d}"
                long_side = int(rng.integers(min_side, max_side + 1))
                short_side = int(long_side * rng.uniform(0.5, 1.0))
                w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
                image = synthetic_image(rng, w, h)
                buf = io.BytesIO()
                ext = "png" if i % 7 == 3 else "jpg"
                image.save(buf, "PNG" if ext == "png" else "JPEG", quality=int(rng.integers(85, 96)))
                meta = {"key": key, "width": w, "height": h, "source": "dask_imgcurator demo"}
                _add(tar, f"{key}.{ext}", buf.getvalue())
                _add(tar, f"{key}.txt", f"synthetic picture {key}".encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
            if broken and s == 0:
                truncated = io.BytesIO()
                synthetic_image(rng, 200, 150).save(truncated, "JPEG")
                _add(tar, f"{s:05d}b001.jpg", truncated.getvalue()[:600])
                _add(tar, f"{s:05d}b001.txt", b"this JPEG was cut short")
                _add(tar, f"{s:05d}b002.txt", b"a caption whose image went missing")
    return paths


def demo_shard_paths(out_dir: str, n_shards: int) -> list[str]:
    """Where :func:`make_demo_shards` writes ``n_shards`` shards in ``out_dir`` (local paths absolute, else URLs)."""
    fs, root = url_to_fs(out_dir)
    return [full_url(fs, posixpath.join(root, f"demo-{s:05d}.tar")) for s in range(n_shards)]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
