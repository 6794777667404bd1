"""Fixtures shared by the whole suite: tiny shards built on disk, never downloaded."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def imgcurator_home(tmp_path_factory) -> Path:
    """The suite's own ``$IMGCURATOR_HOME`` (downloads, remembered kernel timings), inherited by dask workers."""
    import os

    home = tmp_path_factory.mktemp("imgcurator_home")
    saved = os.environ.get("IMGCURATOR_HOME")
    os.environ["IMGCURATOR_HOME"] = str(home)
    yield home
    if saved is None:
        os.environ.pop("IMGCURATOR_HOME", None)
    else:
        os.environ["IMGCURATOR_HOME"] = saved


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip cleanly on machines without a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def jpeg_bytes(seed: int, size=(48, 40), quality=90) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_tar(path: Path, entries: list[tuple[str, bytes]] | list, fmt=tarfile.GNU_FORMAT) -> Path:
    """Write a tar of (name, bytes) pairs, or ready TarInfo/bytes pairs for special entries."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in entries:
            if isinstance(name, tarfile.TarInfo):
                tar.addfile(name, io.BytesIO(data) if data else None)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_entries(prefix: str, n: int, seed: int = 0, extra_ext: str | None = None) -> list[tuple[str, bytes]]:
    entries = []
    for i in range(n):
        key = f"{prefix}{i:04d}"
        entries.append((f"{key}.jpg", jpeg_bytes(seed * 1000 + i)))
        entries.append((f"{key}.txt", f"caption of {key}".encode()))
        entries.append((f"{key}.json", f'{{"i": {i}}}'.encode()))
        if extra_ext:
            entries.append((f"{key}.{extra_ext}", bytes([i % 256]) * (i + 1)))
    return entries


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    """Three shards of 5, 3 and 4 samples (jpg + txt + json + cls)."""
    d = tmp_path / "shards"
    d.mkdir()
    for s, n in enumerate((5, 3, 4)):
        write_tar(d / f"shard-{s:05d}.tar", sample_entries(f"s{s}-", n, seed=s, extra_ext="cls"))
    return d
