"""Pack the Python packages a lent GPU machine lacks into folders the ``device`` tool can carry.

The lent machine reaches no package registry and each call carries at most 64 MiB, while DALI alone
is a 190 MB wheel. So, here (where PyPI is reachable)::

    python benchmarks/device/pack.py            # -> .device/carry-1 ... carry-N

downloads the pinned wheels of ``requirements.txt`` for the device's Python, checks that every
dependency they declare is pinned there or already in the device image (``image-packages.txt``),
installs them into a folder for that platform, drops the extension modules of other Pythons and
packs the folder as two xz archives (``base``: dask, open_clip, webdataset...; ``dali``: DALI and
its codecs) cut into parts, each as large as one call allows beside the working tree. ``unpack.py``
joins, checks and extracts them on the device, where ``gpu_check.sh`` runs the checks. ``README.md``
beside this file has the sequence of calls.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

HERE = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
#: The device image's Python (see image-packages.txt); the wheels and the marker checks are for it.
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
#: Distributions that go into the second archive, extracted only where DALI is wanted.
DALI_PREFIXES = ("nvidia-dali", "nvidia-nvimgcodec", "nvidia-nvjpeg", "nvidia-nvtiff", "nvidia-libnvcomp")
#: What one device call carries, working tree included.
CALL_MIB = 64


@dataclass(frozen=True)
class Wheel:
    """A downloaded wheel: its distribution name, version and declared requirements."""

    path: Path
    name: str
    version: Version
    requires: tuple[Requirement, ...]


def read_wheel(path: Path) -> Wheel:
    """Name, version and ``Requires-Dist`` of a wheel, from its METADATA."""
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        headers = HeaderParser().parsestr(zf.read(meta).decode())
    requires = tuple(Requirement(v) for v in headers.get_all("Requires-Dist") or ())
    return Wheel(path, canonicalize_name(headers["Name"]), Version(headers["Version"]), requires)


def read_pins(path: Path) -> dict[str, tuple[Requirement, ...]]:
    """``name -> requirements`` of a requirements or image-package list (comments and blanks skipped)."""
    pins: dict[str, list[Requirement]] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins.setdefault(canonicalize_name(req.name), []).append(req)
    return {name: tuple(reqs) for name, reqs in pins.items()}


def read_unneeded(path: Path) -> set[str]:
    """Names on ``# unneeded: NAME -- why`` lines: declared dependencies that are never imported."""
    found = re.findall(r"^#\s*unneeded:\s*([A-Za-z0-9._-]+)", path.read_text(), flags=re.M)
    return {canonicalize_name(n) for n in found}


def marker_env(extra: str = "", python: str = PYTHON) -> dict[str, str]:
    """The marker environment of the device's CPython on x86-64 Linux."""
    return {"python_version": python, "python_full_version": f"{python}.3", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
            "platform_machine": "x86_64", "os_name": "posix", "implementation_version": f"{python}.3", "extra": extra}


def missing_requirements(wheels: list[Wheel], image: dict[str, tuple[Requirement, ...]],
                         pins: dict[str, tuple[Requirement, ...]], unneeded: set[str] = frozenset(),
                         python: str = PYTHON) -> list[str]:
    """What the wheels need on the device that neither they nor the image provide, one line each.

    Extras asked for in ``pins`` (``pkg[all]``) or by a requirement that applies (also one that an
    extra brings, such as dask[dataframe] asking for dask[array]) are followed; a requirement on a
    wheel of the set must admit its version, one on an image package the version noted there, if
    any. Names in ``unneeded`` are not looked for.
    """
    by_name = {w.name: w for w in wheels}
    extras = {name: {e for r in reqs for e in r.extras} for name, reqs in pins.items()}

    def applying(w: Wheel) -> list[Requirement]:
        active = ("", *sorted(extras.get(w.name, ())))
        return [r for r in w.requires if any(_applies(r.marker, e, python) for e in active)]

    grew = True
    while grew:  # until no requirement asks for an extra not yet followed
        grew = False
        for w in wheels:
            for r in applying(w):
                wanted = extras.setdefault(canonicalize_name(r.name), set())
                grew |= not r.extras <= wanted
                wanted |= r.extras
    problems = []
    for w in wheels:
        for r in applying(w):
            dep = canonicalize_name(r.name)
            if dep in unneeded:
                continue
            have = by_name[dep].version if dep in by_name else _image_version(image.get(dep))
            if dep not in by_name and dep not in image:
                problems.append(f"{w.name} {w.version} needs {r}: neither pinned nor in the device image")
            elif have is not None and not r.specifier.contains(have, prereleases=True):
                where = "pinned" if dep in by_name else "in the device image"
                problems.append(f"{w.name} {w.version} needs {r}, but {dep} {have} is {where}")
    return problems


def _applies(marker: Marker | None, extra: str, python: str) -> bool:
    return marker is None or marker.evaluate(marker_env(extra, python))


def _image_version(reqs: tuple[Requirement, ...] | None) -> Version | None:
    for r in reqs or ():
        for spec in r.specifier:
            if spec.operator == "==":
                return Version(spec.version)
    return None


def is_dali(name: str) -> bool:
    """Whether a distribution belongs to the DALI archive."""
    return name.startswith(DALI_PREFIXES)


def other_python_extensions(root: Path, python: str = PYTHON) -> list[Path]:
    """Extension modules built for other CPython versions (DALI ships one per version; one is used)."""
    tag = "cpython-" + python.replace(".", "")
    pattern = re.compile(r"\.cpython-\d+t?-x86_64-linux-gnu\.so$")
    return [p for p in root.rglob("*.so") if pattern.search(p.name) and f".{tag}-" not in p.name]


def xz_tar(root: Path, members: list[Path], preset: int = 6) -> bytes:
    """``members`` (files or folders under ``root``) as an xz-compressed tar, names relative to ``root``."""
    sink = io.BytesIO()
    with lzma.LZMAFile(sink, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for m in sorted(members):
            tar.add(m, arcname=str(m.relative_to(root)))
    return sink.getvalue()


def write_parts(archives: dict[str, bytes], out: Path, part_bytes: int, python: str = PYTHON) -> dict:
    """Cut the archives, one after another, into ``out/carry-K/payload.K`` of at most ``part_bytes``.

    Each carry folder also gets the manifest (archive offsets, lengths and sha256; each part's
    sha256), so that whichever folder arrives last can check and join the others.
    """
    stream = b"".join(archives.values())
    offsets, at = {}, 0
    for name, data in archives.items():
        offsets[name] = {"offset": at, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        at += len(data)
    chunks = {start: stream[start : start + part_bytes] for start in range(0, len(stream), part_bytes)}
    parts = [{"folder": f"carry-{k}", "file": f"payload.{k}", "offset": start, "bytes": len(chunk),
              "sha256": hashlib.sha256(chunk).hexdigest()} for k, (start, chunk) in enumerate(chunks.items(), 1)]
    manifest = {"python": python, "archives": offsets, "parts": parts}
    for old in out.glob("carry-*"):
        shutil.rmtree(old)
    for part in parts:
        folder = out / part["folder"]
        folder.mkdir(parents=True)
        (folder / part["file"]).write_bytes(chunks[part["offset"]])
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _pip(*args: str, python: str) -> None:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", *args, "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", *platforms]
    subprocess.run(cmd, check=True)


def working_tree_bytes(repo: Path) -> int:
    """Bytes of what every device call sends besides its carry: tracked and untracked, not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((repo / name).stat().st_size for name in listed if name and (repo / name).is_file())


def build_archives(out: Path, requirements: Path, image: Path, python: str = PYTHON,
                   preset: int = 6) -> dict[str, bytes] | None:
    """Download, check, install and compress; None (after saying why) when a dependency is missing."""
    wheel_dir, site = out / "wheels", out / "site"
    pins = read_pins(requirements)
    shutil.rmtree(wheel_dir, ignore_errors=True)
    _pip("download", "--quiet", "-d", str(wheel_dir), "-r", str(requirements), python=python)
    wheels = [read_wheel(p) for p in sorted(wheel_dir.glob("*.whl"))]
    problems = missing_requirements(wheels, read_pins(image), pins, read_unneeded(requirements), python)
    if problems:
        print("the pinned wheels would not import on the device:\n  " + "\n  ".join(problems), file=sys.stderr)
        return None
    shutil.rmtree(site, ignore_errors=True)
    groups: dict[str, list[Wheel]] = {"base": [w for w in wheels if not is_dali(w.name)],
                                      "dali": [w for w in wheels if is_dali(w.name)]}
    archives = {}
    for group, members in groups.items():
        target = site / group
        _pip("install", "--quiet", "--no-compile", "--target", str(target), *[str(w.path) for w in members],
             python=python)
        dropped = other_python_extensions(target, python)
        for p in dropped:
            p.unlink()
        shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts, with this machine's interpreter path
        archives[group] = xz_tar(target, list(target.iterdir()), preset)
        (out / f"{group}.tar.xz").write_bytes(archives[group])
        print(f"{group}: {len(members)} wheels, {sum(w.path.stat().st_size for w in members) / 2**20:.1f} MiB; "
              f"{len(dropped)} extensions of other Pythons dropped; archive {len(archives[group]) / 2**20:.1f} MiB")
    return archives


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".device", help="where wheels, the install and carry-K/ go (git-ignored)")
    parser.add_argument("--requirements", default=str(HERE / "requirements.txt"))
    parser.add_argument("--image", default=str(HERE / "image-packages.txt"))
    parser.add_argument("--part-mib", type=float,
                        help=f"part size (default: what a {CALL_MIB} MiB call leaves beside the working tree, less 1 MiB)")
    parser.add_argument("--split-only", action="store_true", help="cut the archives of the last run again")
    parser.add_argument("--python", default=PYTHON, help="the target interpreter's version (another one to try the kit here)")
    parser.add_argument("--xz-preset", type=int, default=6, help="0-9: smaller parts, slower packing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.split_only:
        archives = {g: (out / f"{g}.tar.xz").read_bytes() for g in ("base", "dali")}
    else:
        archives = build_archives(out, Path(args.requirements), Path(args.image), args.python, args.xz_preset)
        if archives is None:
            return 1
    tree = working_tree_bytes(HERE.parents[1])
    part_bytes = int(args.part_mib * 2**20) if args.part_mib else (CALL_MIB - 1) * 2**20 - tree
    manifest = write_parts(archives, out, part_bytes, args.python)
    folders = [p["folder"] for p in manifest["parts"]]
    print(f"{len(folders)} carry folders of at most {part_bytes / 2**20:.1f} MiB under {out}/ (the working tree "
          f"is {tree / 2**20:.1f} MiB): " + ", ".join(folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
