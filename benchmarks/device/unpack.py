"""Join, check and extract the archives that ``pack.py`` cut into carry folders (on the device).

Standard library only, since it runs before anything is installed there::

    python3 benchmarks/device/unpack.py .device               # base and dali
    python3 benchmarks/device/unpack.py .device --only base

The packages go into the running interpreter's own site-packages, as pip would put them: the
CUDA 13 wheels share the ``nvidia/`` folder with the image's (``nvidia/cu13/lib``, where DALI's
codecs look for nvJPEG), which a separate folder on ``PYTHONPATH`` would hide or be hidden by.
Exits with status 3, naming the carry folders still to send, when a part an archive needs has
not arrived; a part whose bytes differ from the manifest is an error (status 1). An archive
already extracted into the target is not extracted again.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import sysconfig
import tarfile
from pathlib import Path

MANIFEST = "manifest.json"


class MissingParts(Exception):
    """Parts an archive needs are not (or not wholly) on this machine yet."""

    def __init__(self, folders: list[str]) -> None:
        super().__init__("not here yet: " + ", ".join(folders))
        self.folders = folders


def load_manifest(root: Path) -> dict:
    """The manifest of any carry folder under ``root`` (each holds the same one)."""
    found = sorted(root.glob(f"carry-*/{MANIFEST}"))
    if not found:
        raise MissingParts([f"carry-1 (no carry folder with a manifest under {root})"])
    return json.loads(found[0].read_text())


def read_range(root: Path, manifest: dict, offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset + length)`` of the joined parts, each part checked against its sha256."""
    wanted = [p for p in manifest["parts"] if p["offset"] < offset + length and p["offset"] + p["bytes"] > offset]
    missing = [p["folder"] for p in wanted if not (root / p["folder"] / p["file"]).is_file()]
    if missing:
        raise MissingParts(missing)
    out = bytearray()
    for p in wanted:
        data = (root / p["folder"] / p["file"]).read_bytes()
        if len(data) != p["bytes"]:
            raise MissingParts([f"{p['folder']} (has {len(data)} of {p['bytes']} bytes)"])
        if hashlib.sha256(data).hexdigest() != p["sha256"]:
            raise ValueError(f"{p['folder']}/{p['file']} does not match the manifest: pack and carry it again")
        out += data
    start = offset - wanted[0]["offset"]
    return bytes(out[start : start + length])


def extract(root: Path, name: str, target: Path) -> bool:
    """Extract archive ``name`` into ``target``; False when it already was."""
    manifest = load_manifest(root)
    entry = manifest["archives"][name]
    stamp = target / f".unpacked-{name}-{entry['sha256'][:16]}"
    if stamp.exists():
        return False
    data = read_range(root, manifest, entry["offset"], entry["bytes"])
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"archive {name} does not match the manifest: pack and carry it again")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        tar.extractall(target, filter="data")
    stamp.touch()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the folder holding carry-1 ... carry-N (default .device)", nargs="?", default=".device")
    parser.add_argument("--target", default=sysconfig.get_paths()["purelib"],
                        help="where packages go (default: this interpreter's site-packages)")
    parser.add_argument("--only", action="append", help="archive(s) to extract (default: all)")
    args = parser.parse_args(argv)
    root, target = Path(args.root), Path(args.target)
    try:
        names = args.only or list(load_manifest(root)["archives"])
        for name in names:
            done = extract(root, name, target)
            print(f"{name}: {'extracted into' if done else 'already in'} {target}")
    except MissingParts as exc:
        print(f"unpack: {exc}; carry them in the next call(s)", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"unpack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
