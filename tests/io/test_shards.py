import tarfile

import fsspec
import pytest

from dask_imgcurator.io.shards import (
    Member,
    expand_shards,
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


@pytest.mark.parametrize("spec, phrase", [("/no/such/file.tar", "no such shard"), ("/no/such/*.tar", "matched no files")])
def test_expand_missing_paths_name_the_path(spec, phrase):
    with pytest.raises(FileNotFoundError, match=phrase):
        expand_shards(spec)


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
