"""The bad-input matrix: one case per row, each with its exact outcome. Nothing else is lost."""
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

import dask_imgcurator as ic
from dask_imgcurator.cli import main
from dask_imgcurator.pipeline import error_kind
from tests.conftest import jpeg_bytes, sample_entries, write_tar

SPEC_MAX_PIXELS = 100_000
rng = np.random.default_rng(7)
PICTURE = Image.fromarray((rng.random((60, 80, 3)) * 255).astype("uint8"))


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    PICTURE.save(buf, fmt)
    return buf.getvalue()


def huge_size_header(tmp_path):
    """A tar whose second member header claims ~8 GB (checksum fixed so the header parses)."""
    path = write_tar(tmp_path / "t.tar", sample_entries("ok", 1) + [("big.jpg", jpeg_bytes(1))])
    data = bytearray(path.read_bytes())
    header = 512 * 8  # ok0000.jpg/txt/json then big.jpg's header
    while data[header : header + 7] != b"big.jpg":
        header += 512
    data[header + 124 : header + 136] = b"77777777777\x00"
    data[header + 148 : header + 156] = b"        "
    data[header + 148 : header + 156] = f"{sum(data[header : header + 512]):06o}\x00 ".encode()
    path.write_bytes(bytes(data))
    return path


def special_entries(tmp_path):
    sym = tarfile.TarInfo("s-link.jpg")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("s-hard.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, "ok0000.jpg"
    dev = tarfile.TarInfo("s-dev.jpg")
    dev.type = tarfile.CHRTYPE
    return write_tar(tmp_path / "t.tar", sample_entries("ok", 1) + [(sym, b""), (hard, b""), (dev, b"")])


# (case, builder(tmp_path) -> tar path, {key: expected error kind or None}, phrase in the errors)
SHARD_CASES = [
    ("truncated tar", lambda p: _cut(write_tar(p / "t.tar", sample_entries("ok", 3)), 512 * 14),
     {"ok0000": None, "ok0001": "unreadable shard", "": "unreadable shard"}, "truncated tar"),
    ("corrupt header mid-archive",
     lambda p: _at_header(write_tar(p / "t.tar", sample_entries("ok", 3)), "ok0002.jpg",
                          lambda d, at: d[:at] + b"X" * 10 + d[at + 10 :]),
     {"ok0000": None, "ok0001": "unreadable shard", "": "unreadable shard"}, "invalid member header at byte"),
    ("cut at a member boundary",
     lambda p: _at_header(write_tar(p / "t.tar", sample_entries("ok", 3)), "ok0002.jpg", lambda d, at: d[:at]),
     {"ok0000": None, "ok0001": "unreadable shard", "": "unreadable shard"}, "without an end-of-archive marker"),
    ("garbage named .tar", lambda p: _bytes(p / "t.tar", b"<html>not a tar</html>" * 50),
     {"": "unreadable shard"}, "not a tar archive"),
    ("zero-byte .tar", lambda p: _bytes(p / "t.tar", b""), {"": "unreadable shard"}, "empty file (0 bytes)"),
    ("empty tar", lambda p: write_tar(p / "t.tar", []), {}, None),
    ("only txt members", lambda p: write_tar(p / "t.tar", [("a.txt", b"x"), ("b.txt", b"y")]),
     {"a": "no image", "b": "no image"}, "no image member (extensions found: txt)"),
    ("duplicate keys", lambda p: write_tar(p / "t.tar", sample_entries("d", 2) + sample_entries("d", 1)),
     {"d0000": "duplicate key", "d0001": None}, "duplicate key 'd0000'"),
    ("huge member size in a corrupt header", huge_size_header,
     {"ok0000": None, "big": "unreadable shard", "": "unreadable shard"}, "declares 8589934591 bytes"),
    ("symlink, hardlink, device entries", special_entries,
     {"ok0000": None, "s-link": "unsupported tar entry", "s-hard": "unsupported tar entry",
      "s-dev": "unsupported tar entry"}, "symlink entries are not supported"),
    ("'..' and absolute member names", lambda p: write_tar(p / "t.tar", [("../up.jpg", jpeg_bytes(1)), ("/abs.jpg", jpeg_bytes(2))]),
     {"../up": "unsafe member name", "/abs": "unsafe member name"}, "contains '..'"),
]


def _at_header(path, name, damage):
    """Apply ``damage(data, header_offset)`` to a tar around the header of member ``name``."""
    data = path.read_bytes()
    path.write_bytes(damage(data, data.index(name.encode() + b"\0")))
    return path


def _cut(path, n):
    path.write_bytes(path.read_bytes()[:n])
    return path


def _bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case, build, expected, phrase", SHARD_CASES, ids=[c[0] for c in SHARD_CASES])
def test_shard_matrix(tmp_path, case, build, expected, phrase):
    path = build(tmp_path)
    df = ic.read_webdataset(str(path)).compute()
    got = {k: (error_kind(e) if isinstance(e, str) else None) for k, e in zip(df["key"], df["error"])}
    assert got == expected
    if phrase:
        assert any(phrase in e for e in df["error"].dropna())


IMAGE_CASES = [(f"{ext}-{how}", ext, how) for ext in ("jpg", "png", "webp", "gif", "bmp", "tiff")
               for how in ("truncated", "corrupt", "zero")] + [("png-over-pixel-limit", "png", "big")]
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF"}
KIND = {"truncated": {"corrupt image"}, "corrupt": {"corrupt image", "unrecognised image"},
        "zero": {"empty image"}, "big": {"image over pixel limit"}}


def bad_image(ext: str, how: str) -> bytes:
    if how == "big":
        buf = io.BytesIO()
        Image.new("RGB", (400, 400)).save(buf, "PNG")
        return buf.getvalue()
    data = encoded(FORMATS[ext])
    return {"truncated": data[: len(data) // 2], "zero": b"",
            "corrupt": data[:20] + bytes(range(256)) * 4 + data[20 + 1024 :]}[how]


@pytest.fixture(scope="module")
def image_matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    entries = [("good-0.jpg", encoded("JPEG"))]
    for case, ext, how in IMAGE_CASES:
        entries.append((f"{case}.{ext}", bad_image(ext, how)))
    entries.append(("good-1.png", encoded("PNG")))
    write_tar(root / "images.tar", entries)
    return root, ic.make_tiny_model_dir(root / "models")


@pytest.mark.parametrize("decoder", ["pillow", "dali"])
def test_image_matrix(image_matrix, decoder):
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    root, ref = image_matrix
    ddf = ic.embed(ic.read_webdataset(str(root / "images.tar")), ref, decoder=decoder, max_pixels=SPEC_MAX_PIXELS, batch_size=8)
    df = ddf.compute().set_index("key")
    assert len(df) == len(IMAGE_CASES) + 2
    for case, ext, how in IMAGE_CASES:
        error = df.loc[case, "error"]
        assert isinstance(error, str) and error_kind(error) in KIND[how], (case, error)
        assert df.loc[case, "embedding"] is None or df["embedding"].isna()[case]
    for good in ("good-0", "good-1"):
        assert df["error"].isna()[good] and (df.loc[good, "width"], df.loc[good, "height"]) == (80, 60)
    assert df.loc["png-over-pixel-limit", "width"] == 400  # size read from the header, never decoded


def test_wrong_width_embeddings_fed_to_score(tmp_path):
    import pandas as pd

    from dask_imgcurator.schema import embedding_series

    frame = pd.DataFrame({"key": ["a", "b"]})
    frame["embedding"] = embedding_series(np.ones((2, 512), np.float32) / np.sqrt(512), frame.index)
    frame.to_parquet(tmp_path / "e.parquet")
    ref = ic.make_tiny_model_dir(tmp_path / "models")  # its heads expect 32-d
    with pytest.raises(ValueError, match="expects 32-d embeddings .* but got 512-d"):
        ic.score(ic.read_parquet(str(tmp_path / "e.parquet")), clip_name=ref.head_family, model_dir=ref.model_dir).compute()


@pytest.mark.parametrize(
    "setup, argv, phrase",
    [
        ("none", ["reshard", "/does/not/exist.tar", "--out", "{out}"], "error: no such shard: /does/not/exist.tar"),
        ("file", ["reshard", "{shards}", "--out", "{file}/sub"], "error: cannot write to the output directory"),
        ("other-run", ["reshard", "{shards}", "--out", "{out}", "--samples-per-shard", "3"],
         "already holds the output of a different run"),
        ("model-file", ["curate", "{shards}", "--out", "{out}", "--model", "ViT-B-32/{tmp}/missing.pt", "--offline"],
         "error:"),
    ],
    ids=["non-existent path", "unwritable output dir", "output dir of a different run", "missing model file"],
)
def test_cli_refusals(tmp_path, capsys, setup, argv, phrase):
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=4)
    (tmp_path / "file").write_text("a file, not a directory")
    if setup == "other-run":
        assert main(["reshard", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
        capsys.readouterr()
    argv = [a.format(out=tmp_path / "out", shards=tmp_path / "in", file=tmp_path / "file", tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err
    if setup == "model-file":
        assert "missing.pt" in err
