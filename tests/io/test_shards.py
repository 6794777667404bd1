import shutil
import subprocess
import tarfile

import fsspec
import pytest
import webdataset as wds

from dask_imgcurator.io.shards import (
    Member,
    expand_shards,
    expand_shards_versions,
    group_samples,
    scan_members,
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
