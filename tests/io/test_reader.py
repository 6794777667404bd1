import tarfile

import pandas as pd
import pytest
import webdataset as wds

import dask_imgcurator as ic
from dask_imgcurator.io import shards as shards_module
from tests.conftest import jpeg_bytes, sample_entries, write_tar


def test_fixture_shards_counts_keys_captions_and_partitions(shard_dir):
    ddf = ic.read_webdataset(str(shard_dir / "shard-{00000..00002}.tar"))
    assert ddf.npartitions == 3
    df = ddf.compute()
    assert len(df) == 12
    assert df["key"].tolist() == [f"s{s}-{i:04d}" for s, n in enumerate((5, 3, 4)) for i in range(n)]
    assert df["caption"].tolist() == [f"caption of {k}" for k in df["key"]]
    assert df["json"].iloc[1] == '{"i": 1}'
    assert df["error"].isna().all()
    assert (df["image_member"] == df["key"] + ".jpg").all()
    assert [len(p) for p in ddf.partitions] == [5, 3, 4]


def test_image_offsets_point_at_image_bytes(shard_dir):
    df = ic.read_webdataset(str(shard_dir)).compute()
    row = df.iloc[6]
    with open(row["shard"], "rb") as f:
        f.seek(row["image_offset"])
        assert f.read(row["image_nbytes"]) == jpeg_bytes(1 * 1000 + 1)


def test_shards_written_by_webdataset_shardwriter(tmp_path):
    pattern = str(tmp_path / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=4) as sink:
        for i in range(10):
            sink.write({"__key__": f"sample{i:03d}", "jpg": jpeg_bytes(i), "txt": f"text {i}"})
    ddf = ic.read_webdataset(str(tmp_path / "wds-*.tar"))
    assert ddf.npartitions == 3
    df = ddf.compute()
    assert df["key"].tolist() == [f"sample{i:03d}" for i in range(10)]
    assert df["caption"].tolist() == [f"text {i}" for i in range(10)]
    assert df["error"].isna().all()


def test_reading_is_lazy_until_compute(shard_dir, monkeypatch):
    calls = []
    real = shards_module.scan_members
    monkeypatch.setattr("dask_imgcurator.io.reader.scan_members", lambda url: calls.append(url) or real(url))
    ddf = ic.read_webdataset(str(shard_dir))
    filtered = ddf[ddf.key.str.endswith("1")]
    assert calls == []
    assert len(filtered.compute()) == 3
    assert len(calls) == 3


def test_extension_case_and_configurable_image_extensions(tmp_path):
    write_tar(tmp_path / "a.tar", [("x.JPG", jpeg_bytes(0)), ("y.raw", b"123"), ("y.txt", b"t")])
    df = ic.read_webdataset(str(tmp_path / "a.tar")).compute()
    assert df["image_member"].iloc[0] == "x.JPG" and pd.isna(df["image_member"].iloc[1])
    assert "no image member" in df["error"].iloc[1]
    df = ic.read_webdataset(str(tmp_path / "a.tar"), image_extensions=("raw",)).compute()
    assert pd.isna(df["image_member"].iloc[0]) and df["image_member"].iloc[1] == "y.raw"


@pytest.mark.parametrize(
    "case, phrase, rows",
    [
        ("truncated", "truncated tar", 3),
        ("garbage", "not a tar archive", 1),
        ("zero", "empty file (0 bytes)", 1),
        ("bad header", "corrupt tar after member 'g0001.json': invalid member header", 3),
    ],
)
def test_broken_shards_give_error_rows_and_keep_the_rest(tmp_path, shard_dir, case, phrase, rows):
    good = write_tar(tmp_path / "good.tar", sample_entries("g", 3))
    bad = tmp_path / "bad.tar"
    if case == "truncated":
        bad.write_bytes(good.read_bytes()[: 512 * 12 + 100])
    elif case == "bad header":  # g0002.jpg's header; tarfile alone would stop there without an error
        data = bytearray(good.read_bytes())
        at = data.index(b"g0002.jpg\0")
        data[at : at + 10] = b"X" * 10
        bad.write_bytes(bytes(data))
    elif case == "garbage":
        bad.write_bytes(b"\x89PNG not a tar" * 100)
    else:
        bad.write_bytes(b"")
    df = ic.read_webdataset([str(good), str(bad)]).compute()
    good_rows, bad_rows = df[df.shard == str(good)], df[df.shard == str(bad)]
    assert len(good_rows) == 3 and good_rows.error.isna().all()
    assert len(bad_rows) == rows
    assert phrase in bad_rows.error.iloc[-1] and str(bad) in bad_rows.error.iloc[-1]
    assert bad_rows.key.iloc[-1] == ""
    if case == "truncated":  # the cut member's sample is reported; the complete one before it is fine
        assert bad_rows.key.tolist()[:2] == ["g0000", "g0001"] and pd.isna(bad_rows.error.iloc[0])
        assert "member 'g0001.jpg': truncated tar" in bad_rows.error.iloc[1]
    if case == "bad header":  # samples before the damage stay; the last may have lost members
        assert bad_rows.key.tolist()[:2] == ["g0000", "g0001"] and pd.isna(bad_rows.error.iloc[0])
        assert bad_rows.caption.iloc[0] == "caption of g0000"
        assert "broken entry after this sample" in bad_rows.error.iloc[1]


def test_empty_tar_has_no_rows(tmp_path):
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    df = ic.read_webdataset(str(tmp_path / "empty.tar")).compute()
    assert len(df) == 0 and list(df.columns)[:3] == ["key", "shard", "image_member"]


def test_bad_samples_stay_as_error_rows(tmp_path):
    entries = sample_entries("a", 2) + [("b.txt", b"only text")] + sample_entries("a", 1)
    entries += [("../escape.jpg", jpeg_bytes(5)), ("/abs.jpg", jpeg_bytes(6))]
    write_tar(tmp_path / "x.tar", entries)
    df = ic.read_webdataset(str(tmp_path / "x.tar")).compute()
    assert df["key"].tolist() == ["a0000", "a0001", "b", "a0000", "../escape", "/abs"]
    errors = df["error"].tolist()
    assert df["error"].iloc[:2].isna().all()
    assert "no image member" in errors[2]
    assert "duplicate key 'a0000'" in errors[3]
    assert "contains '..'" in errors[4]
    assert "absolute path" in errors[5]


def test_memory_filesystem(shard_dir):
    ic.make_demo_shards("memory://reader-test", n_shards=2, samples_per_shard=3)
    ddf = ic.read_webdataset("memory://reader-test/demo-{00000..00001}.tar")
    df = ddf.compute()
    assert len(df) == 6 and df["shard"].iloc[0] == "memory:///reader-test/demo-00000.tar"
    assert df["error"].isna().all()


def test_a_shard_replaced_after_planning_stops_the_read_naming_it(shard_dir):
    import os

    ddf = ic.read_webdataset(str(shard_dir))
    second = shard_dir / "shard-00001.tar"
    stamp = second.stat().st_mtime
    write_tar(second, sample_entries("new-", 3, seed=7, extra_ext="cls"))
    os.utime(second, (stamp + 5, stamp + 5))
    assert len(ddf.partitions[0].compute()) == 5  # the others read as planned
    with pytest.raises(ic.ShardError, match=rf"{second} changed while this run was going"):
        ddf.partitions[1].compute()
    assert ic.read_webdataset(str(shard_dir)).partitions[1].compute()["key"].str.startswith("new-").all()


def test_path_objects_are_taken_like_strings(shard_dir, tmp_path):
    ddf = ic.read_webdataset(shard_dir)
    assert ddf.npartitions == 3 and ic.read_webdataset([shard_dir / "shard-00000.tar"]).npartitions == 1
    ic.to_webdataset(ddf, tmp_path / "out", samples_per_shard=5)
    assert len(ic.read_parquet(tmp_path / "out").compute()) == 12
