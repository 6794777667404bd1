"""write_curated's accounting: counted by the tasks that stage the parts, read back only on resume."""
import json
import posixpath
import tarfile

import pytest
from dask.base import tokenize

import dask_imgcurator as ic
from dask_imgcurator.io import writer as writer_module
from dask_imgcurator.pipeline import _count


@pytest.fixture
def marked(tmp_path):
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=3, samples_per_shard=6, broken=True, min_side=64, max_side=96)
    ddf = ic.read_webdataset(str(tmp_path / "in"))
    keep = ~ddf.key.str.endswith(("1", "4"))
    return ic.mark_kept(ddf, keep)


def run_with_task_stream(fn):
    from distributed import Client, LocalCluster, get_task_stream

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client, get_task_stream(client) as stream:
        result = fn()
    return result, [r["key"] if isinstance(r["key"], str) else r["key"][0] for r in stream.data]


def task_count(keys, prefix):
    return sum(k.startswith(prefix) for k in keys)


def test_a_fresh_run_reads_no_part_back_to_count_it(marked, tmp_path):
    summary, keys = run_with_task_stream(lambda: ic.write_curated(marked, str(tmp_path / "out"), samples_per_shard=4))
    assert task_count(keys, "_count_rows") == 0 and task_count(keys, "_count_part") == 0
    parts = sorted(str(p) for p in (tmp_path / "out" / "metadata").glob("part-*.parquet"))
    read_back = _count(parts, [None] * len(parts), progress=False)
    assert (summary.samples_in, summary.kept, summary.filtered, summary.failed) == (
        read_back.samples_in, read_back.kept, read_back.filtered, read_back.failed)
    frame = marked.compute()
    assert summary.samples_in == len(frame) > 0
    assert summary.kept == summary.written == int(frame.kept.sum()) > 0
    assert sum(summary.failed.values()) == int(frame.error.notna().sum()) > 0
    assert summary.filtered == {"filter": int((frame.error.isna() & ~frame.kept).sum())} and summary.balanced


def test_a_resumed_run_counts_only_the_parts_an_earlier_run_staged(marked, tmp_path):
    fresh = ic.write_curated(marked, str(tmp_path / "fresh"), samples_per_shard=4)
    out = tmp_path / "out"
    # an earlier run that staged parts 0 and 2, then stopped
    writer_module.claim_output(str(out), tokenize(marked, 4, False), {"samples_per_shard": 4, "rekey": False})
    staged = writer_module.stage_partitions(marked, str(out / "metadata"))
    assert staged.skipped == 0 and [s["rows"] for s in staged.stats] == [len(p) for p in marked.partitions]
    (out / "metadata" / "part-00001.parquet").unlink()

    summary, keys = run_with_task_stream(lambda: ic.write_curated(marked, str(out), samples_per_shard=4))
    assert task_count(keys, "_count_rows") == 2 and task_count(keys, "_count_part") == 2
    assert summary.parts_skipped == 2
    assert {**summary.to_dict(), "parts_skipped": 0} == fresh.to_dict()
    assert json.loads((out / "summary.json").read_text()) == summary.to_dict()
    assert (out / "shards" / "00000.tar").read_bytes() == (tmp_path / "fresh" / "shards" / "00000.tar").read_bytes()


def test_staging_returns_what_it_wrote(marked, tmp_path):
    staged = writer_module.stage_partitions(marked, str(tmp_path / "staged"), summarise=lambda t: t.column_names[:2])
    frame = marked.compute()
    assert [s["rows"] for s in staged.stats] == [len(p) for p in marked.partitions]
    assert sum(s["kept"] for s in staged.stats) == int(frame.kept.sum())
    assert staged.counts(only_kept=True) == [s["kept"] for s in staged.stats]
    assert all(s["summary"] == list(frame.columns[:2]) for s in staged.stats)
    again = writer_module.stage_partitions(marked, str(tmp_path / "staged"))
    assert again.skipped == 3 and again.stats == [None] * 3 and again.counts(only_kept=False) == [None] * 3
    assert [posixpath.basename(p) for p in again.paths] == [f"part-{i:05d}.parquet" for i in range(3)]


def test_unreadable_shards_are_counted_apart_from_the_samples(tmp_path):
    """A cut tar gives its samples' rows plus one error row for the shard (empty key), a file that
    is no tar only the latter: those rows are shards, not samples, and 'samples in' counts samples."""
    from tests.conftest import sample_entries, write_tar

    (tmp_path / "in").mkdir()
    data = write_tar(tmp_path / "in" / "a.tar", sample_entries("k", 3)).read_bytes()
    member = data.index(b"k0002.jpg\0")
    (tmp_path / "in" / "a.tar").write_bytes(data[: member + 512 + 100])  # cut inside k0002.jpg's bytes
    (tmp_path / "in" / "b.tar").write_bytes(b"garbage" * 100)
    frame = ic.read_webdataset(str(tmp_path / "in")).compute()
    assert sorted(frame["key"]) == ["", "", "k0000", "k0001", "k0002"]

    summary = ic.write_curated(ic.mark_kept(ic.read_webdataset(str(tmp_path / "in"))), str(tmp_path / "out"))
    assert (summary.samples_in, summary.kept, sum(summary.failed.values()), summary.unreadable_shards) == (3, 2, 1, 2)
    assert summary.balanced and "unreadable shards: 2" in summary.report()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["unreadable_shards"] == 2
    from dask_imgcurator.report import write_report

    html = open(write_report(str(tmp_path / "out"), thumbnails=0)).read()
    assert 'data-count="unreadable_shards"' in html and "NO: see summary.json" not in html


def test_a_sample_without_a_key_is_a_failed_sample_not_an_unreadable_shard(tmp_path):
    """Members named ``.jpg`` have an empty key, like a shard's error row, but they are a sample."""
    from tests.conftest import jpeg_bytes, write_tar

    write_tar(tmp_path / "in.tar", [("a.jpg", jpeg_bytes(1)), (".jpg", jpeg_bytes(2)), (".txt", b"t"), ("b.jpg", jpeg_bytes(3))])
    summary = ic.write_curated(ic.mark_kept(ic.read_webdataset(str(tmp_path / "in.tar"))), str(tmp_path / "out"))
    assert (summary.samples_in, summary.kept, summary.failed, summary.unreadable_shards) == (3, 2, {"no key": 1}, 0)
    assert summary.balanced and summary.written == 2
    names = sorted(m.name for m in tarfile.open(tmp_path / "out" / "shards" / "00000.tar"))
    assert names == ["a.jpg", "b.jpg"]


def test_a_key_that_holds_an_error_phrase_does_not_change_the_kind_of_its_error(tmp_path):
    """"duplicate key 'truncated tar'" is a duplicate key, not an unreadable shard."""
    from tests.conftest import jpeg_bytes, write_tar

    write_tar(tmp_path / "in.tar", [("truncated tar.jpg", jpeg_bytes(1)), ("b.jpg", jpeg_bytes(2)),
                                    ("truncated tar.jpg", jpeg_bytes(3))])
    summary = ic.write_curated(ic.mark_kept(ic.read_webdataset(str(tmp_path / "in.tar"))), str(tmp_path / "out"),
                               rekey=True)  # a key with a space needs new names in the output
    assert (summary.samples_in, summary.kept, summary.failed, summary.unreadable_shards) == (3, 2, {"duplicate key": 1}, 0)


def test_a_run_that_only_writes_shards_differently_keeps_the_computed_parts(marked, tmp_path):
    """Changing samples_per_shard or rekey with overwrite must not compute the embeddings again."""
    out = tmp_path / "out"
    first = ic.write_curated(marked, str(out), samples_per_shard=4)
    parts = {p.name: p.stat().st_mtime_ns for p in (out / "metadata").glob("part-*.parquet")}
    with pytest.raises(ic.OutputExistsError, match="different run"):
        ic.write_curated(marked, str(out), samples_per_shard=5, rekey=True)
    summary, keys = run_with_task_stream(
        lambda: ic.write_curated(marked, str(out), samples_per_shard=5, rekey=True, overwrite=True))
    assert summary.parts_skipped == len(parts) == 3 and task_count(keys, "stage-part") == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "metadata").glob("part-*.parquet")} == parts
    assert (summary.kept, summary.written, summary.samples_in) == (first.kept, first.written, first.samples_in)
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == [f"{i:05d}.tar" for i in range(-(-first.kept // 5))]
    other = ic.mark_kept(marked, ~marked.key.str.endswith("2"))  # another filter: other rows, computed again
    again = ic.write_curated(other, str(out), samples_per_shard=5, overwrite=True)
    assert again.parts_skipped == 0
