"""Slightly corrupt PNGs cost their own row, in both backends, and never crash the process.

torchvision 0.29's PNG decoder segfaults on a bad IDAT CRC or an invalid filter byte (libpng's
error path), which in a dask worker killed the worker and the run. The decoding runs in a child
process so that such a crash fails the test instead of killing pytest.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import pytest
import torch

from dask_imgcurator.decode import PreprocessSpec, make_decoder

from .conftest import encode, photo, png_chunk

SPEC = PreprocessSpec(size=64)

_CHILD = """
import json, pathlib, sys
import torch
from dask_imgcurator.decode import PreprocessSpec, make_decoder
folder, backend = pathlib.Path(sys.argv[1]), sys.argv[2]
blobs = [path.read_bytes() for path in sorted(folder.glob("*.img"))]
out = make_decoder(PreprocessSpec(size=64), backend=backend, num_threads=1).decode(blobs)
torch.save(out.pixels, folder / "pixels.pt")
print(json.dumps({"errors": out.errors, "width": out.width.tolist()}))
"""


def bad_crc_png() -> bytes:
    """A valid 64x64 RGB PNG except for its IDAT chunk's CRC."""
    png = bytearray(encode(photo(64, 64, seed=1), "PNG"))
    at = png.find(b"IDAT")
    (length,) = struct.unpack(">I", png[at - 4 : at])
    png[at + 4 + length] ^= 0xFF
    return bytes(png)


def bad_filter_png() -> bytes:
    """A 64x64 RGB PNG whose scanline 10 has filter type 7 (only 0-4 exist)."""
    rows = b"".join(bytes([7 if y == 10 else 0]) + bytes(3 * 64) for y in range(64))
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@pytest.mark.parametrize("backend", ["pillow", "dali"])
def test_corrupt_pngs_mid_batch_cost_only_their_rows(backend, tmp_path):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    good = [encode(photo(80, 60, seed=s), fmt) for s, fmt in [(2, "PNG"), (3, "JPEG"), (4, "PNG")]]
    batch = [good[0], bad_crc_png(), good[1], bad_filter_png(), good[2]]
    for i, blob in enumerate(batch):
        (tmp_path / f"{i}.img").write_bytes(blob)

    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), backend], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, f"decoding crashed (exit {child.returncode}):\n{child.stderr[-2000:]}"
    result = json.loads(child.stdout.strip().splitlines()[-1])
    errors = result["errors"]
    assert result["width"] == [80, 64, 80, 64, 80]
    assert errors[0] is None and errors[2] is None and errors[4] is None
    assert errors[3] is not None and "corrupt PNG" in errors[3]  # Pillow refuses the filter byte
    # Pillow loads the bad-CRC one (its pixel data is intact); an error would be acceptable too
    assert errors[1] is None or "PNG" in errors[1]

    pixels = torch.load(tmp_path / "pixels.pt")
    row_of = {i: row for row, i in enumerate(i for i, error in enumerate(errors) if error is None)}
    decoder = make_decoder(SPEC, backend=backend, num_threads=1)
    assert torch.equal(pixels[[row_of[0], row_of[2], row_of[4]]], decoder.decode(good).pixels)
    if errors[1] is None:
        clean = encode(photo(64, 64, seed=1), "PNG")
        assert torch.equal(pixels[row_of[1]], decoder.decode([clean]).pixels[0])
