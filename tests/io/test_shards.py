import io
import shutil
import subprocess
import tarfile

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
import pytest
import webdataset as wds

from dask_imgcurator.io.shards import (
    Member,
    RemoteReadError,
    expand_shards,
    expand_shards_versions,
    files_matching,
    group_samples,
    is_inside,
    listed_version,
    read_ranges,
    scan_members,
    shard_version,
    split_key,
    unsafe_member_reason,
)
from tests.conftest import sample_entries, write_tar


def test_expand_path_list_glob_braces_and_directory(shard_dir):
    paths = sorted(str(p) for p in shard_dir.glob("*.tar"))
    assert expand_shards(paths[0]) == [paths[0]]
    assert expand_shards(paths[::-1]) == paths[::-1]
    assert expand_shards(str(shard_dir / "*.tar")) == paths
    assert expand_shards(str(shard_dir / "shard-{00000..00002}.tar")) == paths
    assert expand_shards(str(shard_dir)) == paths
    assert expand_shards(f"file://{shard_dir}/shard-0000{{0,2}}.tar") == [paths[0], paths[2]]


def test_expand_memory_urls():
    fs = fsspec.filesystem("memory")
    for i in range(2):
        fs.pipe(f"/exp/b-{i}.tar", b"x")
    assert expand_shards("memory://exp/b-{0..1}.tar") == ["memory:///exp/b-0.tar", "memory:///exp/b-1.tar"]
    assert expand_shards("memory://exp/*.tar") == ["memory:///exp/b-0.tar", "memory:///exp/b-1.tar"]


def test_a_directory_leaves_out_the_folders_earlier_runs_wrote_inside_it():
    """Only folders holding a run's record (manifest.json / _run.json with a fingerprint) are left
    out, with a warning; a user's own manifest.json is data, and naming an output folder reads it."""
    fs = fsspec.filesystem("memory")
    for path in ("/runs/in-0.tar", "/runs/more/in-1.tar", "/runs/out/shards/00000.tar", "/runs/part/shards/00000.tar",
                 "/runs/mine/x.tar"):
        fs.pipe(path, b"x")
    fs.pipe("/runs/out/shards/manifest.json", b'{"fingerprint": "abc", "shards": []}')
    fs.pipe("/runs/part/shards/_run.json", b'{"fingerprint": "def"}')  # a run still in progress
    fs.pipe("/runs/mine/manifest.json", b'{"files": ["x.tar"]}')
    with pytest.warns(UserWarning) as caught:
        urls = expand_shards("memory://runs")
    assert urls == ["memory:///runs/in-0.tar", "memory:///runs/mine/x.tar", "memory:///runs/more/in-1.tar"]
    assert sorted(str(w.message).split(",")[0] for w in caught) == [
        "leaving out 1 .tar file(s) in memory:///runs/out/shards", "leaving out 1 .tar file(s) in memory:///runs/part/shards",
    ]
    assert expand_shards("memory://runs/out/shards") == ["memory:///runs/out/shards/00000.tar"]
    assert expand_shards("memory://runs/*/shards/*.tar") == [
        "memory:///runs/out/shards/00000.tar", "memory:///runs/part/shards/00000.tar",
    ]


@pytest.mark.parametrize("spec, phrase", [("/no/such/file.tar", "no such shard"), ("/no/such/*.tar", "matched no files")])
def test_expand_missing_paths_name_the_path(spec, phrase):
    with pytest.raises(FileNotFoundError, match=phrase):
        expand_shards(spec)


@pytest.mark.parametrize("spec", ["", "  ", ["", "x.tar"], "{,x.tar}"])
def test_expand_refuses_an_empty_spec(tmp_path, monkeypatch, spec):
    write_tar(tmp_path / "here.tar", sample_entries("h", 1))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="empty shard spec"):
        expand_shards(spec)


def test_expand_takes_existing_paths_with_glob_characters_literally(tmp_path):
    folder = tmp_path / "[2024] set?"
    folder.mkdir()
    shard = str(write_tar(folder / "x*.tar", sample_entries("x", 1)))
    assert expand_shards(shard) == [shard]
    assert expand_shards(str(folder)) == [shard]
    with pytest.raises(FileNotFoundError, match="matched no files"):
        expand_shards(str(folder / "y*.tar"))


def test_expand_lists_each_shard_once_in_first_seen_order(shard_dir):
    paths = sorted(str(p) for p in shard_dir.glob("*.tar"))
    assert expand_shards([paths[2], str(shard_dir / "*.tar")]) == [paths[2], paths[0], paths[1]]
    assert expand_shards(str(shard_dir / "shard-{00001,00000,00001}.tar")) == [paths[1], paths[0]]
    assert expand_shards([f"file://{paths[0]}", paths[0], str(shard_dir)]) == paths


def test_split_key_is_webdataset_style():
    assert split_key("a/b/c.seg.png") == ("a/b/c", "seg.png")
    assert split_key("x.JPG") == ("x", "JPG")
    assert split_key("noext") == ("noext", "")


def test_scan_reads_offsets_that_point_at_payloads(tmp_path):
    entries = sample_entries("k", 3)
    path = write_tar(tmp_path / "a.tar", entries)
    members, refused, error = scan_members(str(path))
    assert error is None and refused == []
    data = path.read_bytes()
    assert [m.name for m in members] == [n for n, _ in entries]
    for m, (_, payload) in zip(members, entries):
        assert data[m.offset : m.offset + m.size] == payload


def test_scan_flags_truncation_and_garbage(tmp_path):
    path = write_tar(tmp_path / "a.tar", sample_entries("k", 3))
    (tmp_path / "cut.tar").write_bytes(path.read_bytes()[:3000])
    members, _, error = scan_members(str(tmp_path / "cut.tar"))
    assert "truncated tar" in error and "cut.tar" in error
    assert [m.name for m in members] == ["k0000.jpg", "k0000.txt", "k0000.json"][: len(members)]
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    assert "not a tar archive" in scan_members(str(tmp_path / "junk.tar"))[2]
    (tmp_path / "zero.tar").write_bytes(b"")
    assert "empty file (0 bytes)" in scan_members(str(tmp_path / "zero.tar"))[2]


def _header_offset(path, name):
    members, _, _ = scan_members(str(path))
    return next(m.offset for m in members if m.name == name) - tarfile.BLOCKSIZE


@pytest.mark.parametrize(
    "damage, phrase",
    [
        ("overwritten header", "corrupt tar after member 'k0001.json': invalid member header at byte {at}"),
        ("zeroed header", "corrupt tar after member 'k0001.json': non-zero data at byte"),
        ("cut at a member boundary",
         "truncated tar after member 'k0001.json': the file ends at byte {at} without an end-of-archive marker"),
        ("cut inside a header", "truncated tar after member 'k0001.json': the member header at byte {at} is cut off"),
    ],
    ids=["overwritten header", "zeroed header", "cut at a member boundary", "cut inside a header"],
)
def test_scan_reports_damage_after_good_members(tmp_path, damage, phrase):
    path = write_tar(tmp_path / "a.tar", sample_entries("k", 4))
    at = _header_offset(path, "k0002.jpg")
    data = bytearray(path.read_bytes())
    if damage == "overwritten header":
        data[at : at + 10] = b"X" * 10
    elif damage == "zeroed header":
        data[at : at + tarfile.BLOCKSIZE] = bytes(tarfile.BLOCKSIZE)
    else:
        del data[at + (100 if damage == "cut inside a header" else 0) :]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    members, refused, error = scan_members(str(bad))
    assert [m.name for m in members] == [n for n, _ in sample_entries("k", 2)]
    assert refused == []
    assert error.startswith(f"{bad}: ") and phrase.format(at=at) in error


def _tar_by_gnu_tar(tmp_path):
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    names = []
    for name, payload in sample_entries("g", 3):
        (tmp_path / name).write_bytes(payload)
        names.append(name)
    subprocess.run(["tar", "cf", str(tmp_path / "gnu.tar"), "-C", str(tmp_path), *names], check=True)
    return tmp_path / "gnu.tar", names


def _tar_by_webdataset(tmp_path):
    with wds.TarWriter(str(tmp_path / "wds.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"w{i}", "jpg": b"j" * (100 * i + 1), "txt": "t"})
    return tmp_path / "wds.tar", [f"w{i}.{ext}" for i in range(3) for ext in ("jpg", "txt")]


def _header_then_zero_padding(tmp_path):
    info = tarfile.TarInfo("a.jpg")
    (tmp_path / "pad.tar").write_bytes(info.tobuf(tarfile.GNU_FORMAT) + bytes(700))
    return tmp_path / "pad.tar", ["a.jpg"]


@pytest.mark.parametrize(
    "build",
    [
        lambda p: (write_tar(p / "py.tar", sample_entries("p", 2)), [n for n, _ in sample_entries("p", 2)]),
        lambda p: (write_tar(p / "pax.tar", [("d/" + "n" * 120 + ".jpg", b"x")], fmt=tarfile.PAX_FORMAT),
                   ["d/" + "n" * 120 + ".jpg"]),
        _tar_by_gnu_tar,
        _tar_by_webdataset,
        _header_then_zero_padding,
    ],
    ids=["tarfile", "tarfile pax long name", "gnu tar", "webdataset TarWriter", "header then zero padding"],
)
def test_scan_accepts_well_formed_archive_ends(tmp_path, build):
    path, names = build(tmp_path)
    members, refused, error = scan_members(str(path))
    assert error is None and refused == []
    assert [m.name for m in members] == names


def test_group_flags_duplicates_missing_images_and_unsafe_names():
    members = [Member(n, 512 * i, 1) for i, n in enumerate(
        ["a.jpg", "a.txt", "b.txt", "a.png", "../evil.jpg", "c.jpg", "c.JPG", "/abs.jpg"]
    )]
    samples = {s.key + str(i): s for i, s in enumerate(group_samples(members))}
    errors = [s.error for s in samples.values()]
    assert errors[0] is None
    assert "no image member" in errors[1]
    assert "duplicate key 'a'" in errors[2]
    assert "contains '..'" in errors[3]
    assert "two 'jpg' members" in errors[4]
    assert "absolute path" in errors[5]


def test_refused_entries_mark_their_sample(tmp_path):
    link = tarfile.TarInfo("s1.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    path = write_tar(tmp_path / "l.tar", sample_entries("s", 1) + [(link, b"")])
    members, refused, _ = scan_members(str(path))
    assert refused == [("s1.jpg", "symlink entries are not supported")]
    samples = group_samples(members, refused)
    assert [s.key for s in samples] == ["s0000", "s1"]
    assert "symlink" in samples[1].error


def test_unsafe_member_reason():
    assert unsafe_member_reason("ok/name.jpg") is None
    assert "'..'" in unsafe_member_reason("a/../../b.jpg")
    assert "absolute" in unsafe_member_reason("/etc/passwd")


def test_versions_come_with_the_urls_and_agree_however_the_shards_are_named(shard_dir, tmp_path):
    paths = sorted(str(p) for p in shard_dir.glob("*.tar"))
    by_glob = expand_shards_versions(str(shard_dir / "*.tar"))
    assert [url for url, _ in by_glob] == paths == expand_shards(str(shard_dir / "*.tar"))
    assert by_glob == expand_shards_versions(str(shard_dir)) == expand_shards_versions(paths)
    size = (shard_dir / "shard-00000.tar").stat().st_size
    assert by_glob[0][1].startswith(f"size={size} mtime=")
    fs = fsspec.filesystem("memory")
    fs.pipe("/versions/a.tar", b"x" * 10)
    listed, named = expand_shards_versions("memory://versions/*.tar"), expand_shards_versions("memory://versions/a.tar")
    assert listed == named and listed[0][1].startswith("size=10 created=")  # datetimes and numbers alike


def test_local_paths_are_canonical_so_that_one_shard_has_one_name(shard_dir, tmp_path, monkeypatch):
    """``..``, ``.`` and ``//`` are resolved (``link/..`` as the OS does): a shard named two ways is listed once."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    first = str(shard_dir / "shard-00000.tar")
    assert expand_shards(["../shards/shard-00000.tar", first, f"{shard_dir}/./shard-00000.tar"]) == [first]
    assert expand_shards("..//shards/*.tar") == sorted(str(p) for p in shard_dir.glob("*.tar"))
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "sub" / "link").symlink_to(tmp_path / "deep" / "er")
    (tmp_path / "deep" / "x.tar").write_bytes(b"")
    assert expand_shards("link/../x.tar") == [str(tmp_path / "deep" / "x.tar")]


def test_is_inside_resolves_relative_paths_and_links(tmp_path, monkeypatch):
    (tmp_path / "out" / "shards").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "out")
    monkeypatch.chdir(tmp_path / "out")
    assert is_inside(str(tmp_path / "link" / "shards" / "a.tar"), str(tmp_path / "out"))
    assert is_inside("../out/shards/a.tar", str(tmp_path / "out"))
    assert is_inside(f"file://{tmp_path}/out/a.tar", "../out")
    assert not is_inside(str(tmp_path / "outer" / "a.tar"), str(tmp_path / "out"))
    assert not is_inside(str(tmp_path / "out"), str(tmp_path / "out"))
    assert is_inside("memory://x/y/a.tar", "memory://x/y/")
    assert not is_inside("memory://x/yz/a.tar", "memory://x/y")


def test_files_matching_takes_the_folder_literally(tmp_path):
    """Glob characters in the folder name it, never its neighbours (``run?`` is not ``runA``)."""
    for folder in ("run?", "runA", "cur[1]"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "part-00000.parquet").write_bytes(b"")
        (tmp_path / folder / "notes.txt").write_bytes(b"")
    fs = fsspec.filesystem("file")
    assert files_matching(fs, str(tmp_path / "run?"), "part-*.parquet") == [str(tmp_path / "run?" / "part-00000.parquet")]
    assert files_matching(fs, str(tmp_path / "cur[1]"), "*.parquet") == [str(tmp_path / "cur[1]" / "part-00000.parquet")]
    assert files_matching(fs, str(tmp_path / "missing"), "*") == []


class _ListingWithoutVersions:
    """A filesystem whose listings give names only (as HTTP index pages do) and whose ``info`` has the headers."""

    def info(self, path):
        return {"name": path, "size": 10240, "ETag": '"abc"', "Last-Modified": "Tue, 08 Dec 2026 01:00:00 GMT"}


def test_a_listing_without_versions_takes_them_from_info():
    """What the workers compare when they read the shard (``check_unchanged``) is ``info()``'s version."""
    fs = _ListingWithoutVersions()
    assert listed_version(fs, "/a.tar", {"name": "/a.tar", "size": None, "type": "file"}) == shard_version(fs.info("/a.tar"))
    assert listed_version(fs, "/a.tar", {"size": 5, "mtime": 1.5}) == "size=5 mtime=1.5"


def test_an_http_shard_replaced_without_an_etag_changes_its_version():
    """HTTP servers without ETag still send Last-Modified (fsspec keeps the header's name)."""
    old = {"size": 10240, "Last-Modified": "Mon, 07 Dec 2026 10:00:00 GMT"}
    new = {"size": 10240, "Last-Modified": "Tue, 08 Dec 2026 10:00:00 GMT"}
    assert shard_version(old) != shard_version(new)
    assert shard_version({"size": 1, "Content-MD5": "x"}) != shard_version({"size": 1, "Content-MD5": "y"})


def test_members_without_a_key_are_a_failed_sample(tmp_path):
    """``.jpg`` (key "") cannot be grouped by WebDataset readers: an error row, not a sample to keep."""
    path = write_tar(tmp_path / "k.tar", [("a.jpg", b"1"), (".jpg", b"2"), (".txt", b"t"), ("d/.png", b"3"), ("b.jpg", b"4")])
    samples = group_samples(*scan_members(str(path))[:2])
    assert [s.key for s in samples] == ["a", "", "d/", "b"]
    assert samples[0].error is None and samples[3].error is None
    assert samples[1].error.startswith("no key: the member name(s) '.jpg', '.txt' begin with a dot")
    assert samples[2].error.startswith("no key:")


def test_a_member_name_that_is_not_utf8_fails_its_sample_only(tmp_path):
    path = tmp_path / "latin1.tar"
    write_tar(path, [("good.jpg", b"1"), ("caf\udce9.jpg", b"2"), ("good2.jpg", b"3")])
    members, refused, error = scan_members(str(path))
    assert error is None and [m.name for m in members] == ["good.jpg", "good2.jpg"]
    assert refused == [("caf\ufffd.jpg", "the name is not valid UTF-8 (b'caf\\xe9.jpg'), which WebDataset keys and Parquet need")]
    samples = group_samples(members, refused)
    assert [(s.key, s.error is None) for s in samples] == [("good", True), ("good2", True), ("caf\ufffd", False)]


class _FailingReads(MemoryFileSystem):
    """memory:// whose reads fail as an HTTP client's do: with an error that names nothing and cannot be pickled."""

    protocol = ("flaky",)

    class Unpicklable(Exception):
        def __init__(self):
            super().__init__("503, message='Service Unavailable'")
            self.headers = (x for x in ())  # a generator: pickling fails

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            raise self.Unpicklable()
        return super()._open(path, mode, **kwargs)


def test_remote_read_errors_name_the_file_and_travel_back_from_workers():
    import pickle

    import tblib.pickling_support

    fsspec.register_implementation("flaky", _FailingReads, clobber=True)
    fsspec.filesystem("flaky").pipe("/flaky-reads/a.tar", b"x" * 1024)
    with pytest.raises(RemoteReadError) as caught:
        scan_members("flaky:///flaky-reads/a.tar")
    assert str(caught.value) == "flaky:///flaky-reads/a.tar: could not be read (Unpicklable: 503, message='Service Unavailable')"
    tblib.pickling_support.install(caught.value)  # as distributed does: the chain is pickled too
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)
    with pytest.raises(RemoteReadError, match="flaky:///flaky-reads/a.tar"):
        read_ranges("flaky:///flaky-reads/a.tar", [(0, 10)])


@pytest.mark.parametrize("mode, name", [("w:gz", "gzip"), ("w:bz2", "bzip2"), ("w:xz", "xz")])
def test_a_compressed_tar_is_named_as_such(tmp_path, mode, name):
    path = tmp_path / "shard.tar.gz"
    with tarfile.open(path, mode) as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    members, _, error = scan_members(str(path))
    assert members == [] and error == (
        f"{path}: not a tar archive but a {name}-compressed file; images are read from shards by offset, "
        "so decompress it to a plain .tar first"
    )


def test_a_chained_url_keeps_its_cache_layer(shard_dir, tmp_path):
    """``simplecache::`` stays on every listed shard (the workers read through the cache too), and such a
    shard is still known to lie in its folder."""
    urls = expand_shards(f"simplecache::{shard_dir}/*.tar")
    assert urls == [f"simplecache::file://{p}" for p in sorted(str(p) for p in shard_dir.glob("*.tar"))]
    assert [len(scan_members(u)[0]) for u in urls] == [20, 12, 16]
    assert is_inside(urls[0], str(shard_dir)) and not is_inside(urls[0], str(tmp_path / "elsewhere"))
