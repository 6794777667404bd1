"""Photo-like benchmark shards: mixed sizes (256-2048 px long side), JPEG q85-95, some PNG and WebP.

Images are built from smooth colour fields, mid-frequency texture, a few hard-edged shapes and
sensor noise, so that encoders spend about as many bytes on them as on real photos (a 2048 px
JPEG at q90 is about 1 MB). Shards are cached on disk by content parameters: the same call
returns the same bytes without regenerating them, and shard ``i`` is the same file whether 1x
or 4x the shards are asked for (the scaling runs grow by adding shards).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: Bump when the generator changes, so cached shards are not reused.
GENERATOR_VERSION = 3
#: Share of images per format (the rest JPEG); a few JPEGs are grayscale.
PNG_SHARE, WEBP_SHARE, GRAY_SHARE = 0.08, 0.07, 0.03


def cache_root() -> Path:
    """Where generated shards are kept (``$IMGCURATOR_BENCH_CACHE``, default under /tmp)."""
    return Path(os.environ.get("IMGCURATOR_BENCH_CACHE", "/tmp/imgcurator-bench-cache"))


def photo_like(rng: np.random.Generator, width: int, height: int, noise: float = 8.0) -> Image.Image:
    """A synthetic photo: smooth colour field + texture + shapes + grain, RGB uint8."""
    coarse = rng.uniform(0, 255, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        w, h = rng.uniform(0.05, 0.5) * width, rng.uniform(0.05, 0.5) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        box = (x0, y0, x0 + w, y0 + h)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))  # lens softness on edges
    pixels = np.asarray(img, dtype=np.int16)
    # mid-frequency texture (foliage, fabric): low-res noise upsampled, different per channel scale
    tw, th = max(2, width // int(rng.integers(4, 12))), max(2, height // int(rng.integers(4, 12)))
    texture = rng.integers(-40, 41, size=(th, tw), dtype=np.int16).astype(np.uint8) + np.uint8(128)
    texture = np.asarray(Image.fromarray(texture, "L").resize((width, height), Image.Resampling.BILINEAR), np.int16) - 128
    pixels = pixels + (texture[..., None] * rng.uniform(0.3, 1.0)).astype(np.int16)
    if noise > 0:
        pixels += rng.integers(-int(noise), int(noise) + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _sample(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[str, bytes, dict]:
    long_side = int(np.exp(rng.uniform(np.log(min_side), np.log(max_side))))
    short_side = max(16, int(long_side * rng.uniform(0.5, 1.0)))
    w, h = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
    roll = rng.random()
    buf = io.BytesIO()
    if roll < PNG_SHARE:  # PNGs on the web are mostly graphics: less grain
        ext = "png"
        photo_like(rng, w, h, noise=1.5).save(buf, "PNG", compress_level=6)
    elif roll < PNG_SHARE + WEBP_SHARE:
        ext = "webp"
        photo_like(rng, w, h).save(buf, "WEBP", quality=int(rng.integers(75, 91)), method=2)
    else:
        ext = "jpg"
        img = photo_like(rng, w, h)
        if roll > 1 - GRAY_SHARE:
            img = img.convert("L")
        img.save(buf, "JPEG", quality=int(rng.integers(85, 96)))
    return ext, buf.getvalue(), {"width": w, "height": h}


def _write_shard(path: Path, shard: int, samples: int, seed: int, min_side: int, max_side: int) -> None:
    rng = np.random.default_rng([seed, shard])
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(samples):
            key = f"{shard:05d}{i:05d}"
            ext, data, meta = _sample(rng, min_side, max_side)
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.txt", f"a synthetic photograph number {i} of shard {shard}".encode())
            _add(tar, f"{key}.json", json.dumps({"key": key, **meta, "format": ext}).encode())
    os.replace(tmp, path)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def bench_shards(
    n_shards: int,
    samples_per_shard: int,
    *,
    seed: int = 0,
    min_side: int = 256,
    max_side: int = 2048,
    workers: int | None = None,
) -> list[str]:
    """Paths of ``n_shards`` photo-like shards, generated (in parallel) where not cached yet."""
    tag = f"v{GENERATOR_VERSION}-s{seed}-n{samples_per_shard}-{min_side}-{max_side}"
    root = cache_root() / hashlib.sha1(tag.encode()).hexdigest()[:10]
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.txt").write_text(tag + "\n")
    paths = [root / f"bench-{i:05d}.tar" for i in range(n_shards)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            list(pool.map(_write_shard, [paths[i] for i in missing], missing, [samples_per_shard] * len(missing),
                          [seed] * len(missing), [min_side] * len(missing), [max_side] * len(missing)))
    return [str(p) for p in paths]


def large_member_shards(n_shards: int, samples_per_shard: int, *, mean_bytes: int = 1_500_000, seed: int = 0) -> list[str]:
    """Shards of large image-sized members (random bytes, 0.5x-1.5x ``mean_bytes``) for header scans."""
    tag = f"large-v1-s{seed}-n{samples_per_shard}-b{mean_bytes}"
    root = cache_root() / hashlib.sha1(tag.encode()).hexdigest()[:10]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(n_shards):
        path = root / f"large-{shard:05d}.tar"
        paths.append(str(path))
        if path.exists():
            continue
        rng = np.random.default_rng([seed, shard])
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(samples_per_shard):
                key = f"{shard:05d}{i:05d}"
                size = int(mean_bytes * rng.uniform(0.5, 1.5))
                _add(tar, f"{key}.jpg", rng.bytes(size))
                _add(tar, f"{key}.txt", f"caption {key}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
        os.replace(tmp, path)
    return paths


def describe(paths: list[str]) -> dict:
    """Image count, format mix, mean bytes and mean long side of shards (for the report)."""
    formats: dict[str, int] = {}
    nbytes, long_sides = [], []
    for path in paths:
        with tarfile.open(path) as tar:
            for info in tar:
                ext = info.name.rsplit(".", 1)[-1]
                if ext == "json":
                    meta = json.loads(tar.extractfile(info).read())
                    long_sides.append(max(meta["width"], meta["height"]))
                elif ext != "txt":
                    formats[ext] = formats.get(ext, 0) + 1
                    nbytes.append(info.size)
    return {
        "images": len(nbytes),
        "formats": formats,
        "mean_kb": round(float(np.mean(nbytes)) / 1024, 1),
        "total_mb": round(float(np.sum(nbytes)) / 2**20, 1),
        "long_side_px": {"min": int(np.min(long_sides)), "median": int(np.median(long_sides)), "max": int(np.max(long_sides))},
    }
