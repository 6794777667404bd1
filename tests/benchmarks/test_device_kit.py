"""benchmarks/device: packing what the GPU machine lacks into carry-sized parts, and unpacking it there."""
import os
import stat
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks" / "device"))
import pack  # noqa: E402
import unpack  # noqa: E402


def fake_wheel(folder: Path, name: str, version: str, *requires: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta + "\nlong description: x\n")
        zf.writestr(f"{name.replace('-', '_')}/__init__.py", "")
    return path


def pins_of(tmp_path: Path, text: str) -> dict:
    path = tmp_path / "pins.txt"
    path.write_text(text)
    return pack.read_pins(path)


def test_requirements_are_checked_against_the_set_and_the_image(tmp_path):
    wheels = [pack.read_wheel(fake_wheel(tmp_path, *w)) for w in [
        ("app", "1.0", "lib>=2", "tool", "old-only; python_version < '3.12'", "docs-thing; extra == 'docs'",
         "codec[all]"),
        ("lib", "1.5"),
        ("codec", "0.9", "plugin-a; extra == 'all'", "plugin-b; extra == 'b'"),
    ]]
    image = pins_of(tmp_path, "# the image\ntool==3.0\nnumpy\n")
    problems = pack.missing_requirements(wheels, image, pins_of(tmp_path, "app==1.0\nlib==1.5\ncodec==0.9\n"))
    assert problems == [
        "app 1.0 needs lib>=2, but lib 1.5 is pinned",
        "codec 0.9 needs plugin-a; extra == \"all\": neither pinned nor in the device image",
    ]
    wheels.append(pack.read_wheel(fake_wheel(tmp_path, "lib", "2.0")))
    wheels = [w for w in wheels if (w.name, str(w.version)) != ("lib", "1.5")]
    assert pack.missing_requirements(wheels, image, {}, unneeded={"plugin-a"}) == []
    assert pack.missing_requirements(wheels, pins_of(tmp_path, "tool==2.0\n"), {}, unneeded={"plugin-a"}) == []
    strict = [pack.read_wheel(fake_wheel(tmp_path, "app2", "1.0", "tool>=3"))]
    assert pack.missing_requirements(strict, pins_of(tmp_path, "tool==2.0\n"), {}) == [
        "app2 1.0 needs tool>=3, but tool 2.0 is in the device image"
    ]


def test_unneeded_names_come_from_their_comment_lines(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("dask-cuda==26.10.0\n# unneeded: Rapids_Dask.Dependency -- only pins dask\n# other comment\n")
    assert pack.read_unneeded(path) == {"rapids-dask-dependency"}
    assert set(pack.read_pins(path)) == {"dask-cuda"}


def test_extensions_of_other_pythons_are_found(tmp_path):
    names = ["backend_impl.cpython-312-x86_64-linux-gnu.so", "backend_impl.cpython-313t-x86_64-linux-gnu.so",
             "backend_impl.cpython-310-x86_64-linux-gnu.so", "libdali.so", "_speedups.abi3.so"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    found = sorted(p.name for p in pack.other_python_extensions(tmp_path, python="3.12"))
    assert found == ["backend_impl.cpython-310-x86_64-linux-gnu.so", "backend_impl.cpython-313t-x86_64-linux-gnu.so"]


@pytest.fixture
def packed(tmp_path):
    """Two archives cut into parts of 4 kB, as pack.py leaves them; the trees they came from."""
    trees = {}
    archives = {}
    for name, n_files in (("base", 3), ("dali", 6)):
        root = tmp_path / "site" / name
        (root / f"{name}_pkg").mkdir(parents=True)
        for i in range(n_files):
            (root / f"{name}_pkg" / f"mod{i}.py").write_bytes(bytes(range(256)) * 8 + name.encode() * i)
        lib = root / f"{name}_pkg" / "lib.so"
        lib.write_bytes(os.urandom(6000))  # incompressible: the archives span several parts
        lib.chmod(0o755)
        trees[name] = root
        archives[name] = pack.xz_tar(root, list(root.iterdir()))
    out = tmp_path / "carry"
    manifest = pack.write_parts(archives, out, part_bytes=4096)
    return out, manifest, trees


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".unpacked")}


def test_parts_rejoin_into_the_same_trees(packed, tmp_path):
    out, manifest, trees = packed
    assert len(manifest["parts"]) >= 4 and all(p["bytes"] <= 4096 for p in manifest["parts"])
    assert all((out / p["folder"] / "manifest.json").is_file() for p in manifest["parts"])
    target = tmp_path / "target"
    assert unpack.main([str(out), "--target", str(target)]) == 0
    for name, root in trees.items():
        assert {k: v for k, v in files_under(target).items() if k.startswith(f"{name}_pkg")} == files_under(root)
    assert stat.S_IMODE((target / "dali_pkg" / "lib.so").stat().st_mode) & 0o100
    assert unpack.extract(out, "dali", target) is False  # already there: not again


def test_an_archive_whose_parts_have_arrived_unpacks_before_the_rest(packed, tmp_path, capsys):
    out, manifest, trees = packed
    base = manifest["archives"]["base"]
    later = [p for p in manifest["parts"] if p["offset"] >= base["offset"] + base["bytes"]]
    assert later
    for p in later:
        (out / p["folder"] / p["file"]).unlink()
    target = tmp_path / "target"
    assert unpack.main([str(out), "--target", str(target), "--only", "base"]) == 0
    assert (target / "base_pkg" / "mod2.py").is_file()
    assert unpack.main([str(out), "--target", str(target)]) == 3
    err = capsys.readouterr().err
    assert all(p["folder"] in err for p in later)
    assert not (target / "dali_pkg").exists()


def test_a_damaged_part_is_refused(packed, tmp_path, capsys):
    out, manifest, _ = packed
    part = manifest["parts"][1]
    path = out / part["folder"] / part["file"]
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert unpack.main([str(out), "--target", str(tmp_path / "t")]) == 1
    assert part["folder"] in capsys.readouterr().err
    path.write_bytes(bytes(data[:-5]))
    assert unpack.main([str(out), "--target", str(tmp_path / "t")]) == 3


def test_extras_that_an_extra_asks_for_are_followed(tmp_path):
    wheels = [pack.read_wheel(fake_wheel(tmp_path, *w)) for w in [
        ("frame", "2.0", "frame[array]; extra == 'dataframe'", "pyarrow>=16; extra == 'dataframe'",
         "numpy>=2; extra == 'array'", "sphinx; extra == 'docs'"),
    ]]
    problems = pack.missing_requirements(wheels, pins_of(tmp_path, "numpy==1.26\n"), pins_of(tmp_path, "frame[dataframe]==2.0\n"))
    assert problems == [
        "frame 2.0 needs pyarrow>=16; extra == \"dataframe\": neither pinned nor in the device image",
        "frame 2.0 needs numpy>=2; extra == \"array\", but numpy 1.26 is in the device image",
    ]
