import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import webdataset as wds

import dask_imgcurator as ic
from dask_imgcurator.io import writer as writer_module
from tests.conftest import jpeg_bytes, sample_entries, write_tar


def source_members(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    """key → {member name: bytes} read with the standard library, as ground truth."""
    out: dict[str, dict[str, bytes]] = {}
    for path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                out.setdefault(m.name.split(".")[0], {})[m.name] = tar.extractfile(m).read()
    return out


def kept_frame(shard_dir):
    ddf = ic.read_webdataset(str(shard_dir))
    return ddf[~ddf.key.str.endswith(("1", "3"))]


def test_filter_then_write_keeps_exact_keys_order_and_bytes(shard_dir, tmp_path):
    out = tmp_path / "out"
    kept = kept_frame(shard_dir)
    expected_keys = kept.compute()["key"].tolist()
    result = ic.to_webdataset(kept, str(out), samples_per_shard=3)
    assert result.samples == len(expected_keys) == 7
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{i:05d}.{e}" for i in range(3) for e in ("tar", "parquet", "idx")] + ["manifest.json"]
    )
    truth = source_members(shard_dir)
    samples = list(wds.WebDataset(str(out / "{00000..00002}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == expected_keys
    for s in samples:
        for name, data in truth[s["__key__"]].items():
            assert s[name.split(".", 1)[1]] == data
    counts = [json.loads(line.split()[1]) for line in [open(out / f"{i:05d}.idx").readline() for i in range(3)]]
    assert counts == [3, 3, 1]


def test_output_parquet_points_into_the_new_tar(shard_dir, tmp_path):
    out = tmp_path / "out"
    ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=4)
    meta = pd.read_parquet(out / "00001.parquet")
    assert len(meta) == 3
    data = (out / "00001.tar").read_bytes()
    for _, row in meta.iterrows():
        assert row["shard"] == str(out / "00001.tar")
        assert data[row["image_offset"] : row["image_offset"] + row["image_nbytes"]] == jpeg_bytes(
            int(row["key"][1]) * 1000 + int(row["key"][-1])
        )
        assert row["source_shard"].endswith(f"shard-0000{row['key'][1]}.tar")
    again = ic.read_webdataset(str(out)).compute()
    assert again["key"].tolist() == pd.concat([pd.read_parquet(out / f"{i:05d}.parquet") for i in range(2)])["key"].tolist()


def test_dali_webdataset_reader_reads_the_output(shard_dir, tmp_path):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    out = tmp_path / "out"
    ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=3)
    tars = [str(out / f"{i:05d}.tar") for i in range(3)]

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        jpg, txt = fn.readers.webdataset(
            paths=tars, index_paths=[t[:-3] + "idx" for t in tars], ext=["jpg", "txt"],
            missing_component_behavior="error", name="reader",
        )
        return jpg, txt

    p = pipe()
    p.build()
    truth = source_members(shard_dir)
    seen = []
    for _ in range(p.epoch_size("reader")):
        jpg, txt = p.run()
        caption = bytes(np.array(txt[0])).decode()
        key = caption.removeprefix("caption of ")
        assert bytes(np.array(jpg[0])) == truth[key][f"{key}.jpg"]
        seen.append(key)
    assert seen == kept_frame(shard_dir).compute()["key"].tolist()


def test_rekey_keeps_old_key_and_all_members(shard_dir, tmp_path):
    out = tmp_path / "out"
    ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=5, rekey=True)
    samples = list(wds.WebDataset(str(out / "{00000..00001}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000", "000001", "000002", "000003", "000004", "000010", "000011"]
    meta = pd.concat([pd.read_parquet(out / f"{i:05d}.parquet") for i in range(2)])
    assert meta["source_key"].tolist() == kept_frame(shard_dir).compute()["key"].tolist()
    assert meta["image_member"].tolist() == [k + ".jpg" for k in meta["key"]]
    truth = source_members(shard_dir)
    for s, old in zip(samples, meta["source_key"]):
        assert s["cls"] == truth[old][f"{old}.cls"]


def test_interrupted_write_resumes_to_identical_output(shard_dir, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    ic.to_webdataset(kept_frame(shard_dir), str(reference), samples_per_shard=2)

    out = tmp_path / "out"
    real = writer_module._write_shard
    calls = []

    def flaky(slices, root, name, *args):
        calls.append(name)
        if name == "00002":
            raise RuntimeError("simulated crash")
        return real(slices, root, name, *args)

    monkeypatch.setattr(writer_module, "_write_shard", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"), dask.config.set(scheduler="synchronous"):
        ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=2)
    assert not (out / "manifest.json").exists()
    assert not (out / "00002.tar").exists()
    done_before = len(list(out.glob("*.tar")))
    monkeypatch.setattr(writer_module, "_write_shard", real)
    result = ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=2)
    assert result.parts_skipped == 3 and result.shards_skipped == done_before
    assert_same_output(reference, out)


def test_killed_process_resumes_to_identical_output(shard_dir, tmp_path):
    reference = tmp_path / "reference"
    ic.to_webdataset(kept_frame(shard_dir), str(reference), samples_per_shard=2)
    out = tmp_path / "out"
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
import dask
from dask_imgcurator.io import writer
import dask_imgcurator as ic
real = writer._write_shard
calls = []
def dying(slices, root, name, *a):
    calls.append(name)
    if len(calls) == 3:
        os._exit(9)  # no cleanup, like a kill -9
    return real(slices, root, name, *a)
writer._write_shard = dying
ddf = ic.read_webdataset({str(shard_dir)!r})
with dask.config.set(scheduler="synchronous"):
    ic.to_webdataset(ddf[~ddf.key.str.endswith(("1", "3"))], {str(out)!r}, samples_per_shard=2)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert len(list(out.glob("*.tar"))) == 2
    result = ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=2)
    assert result.shards_skipped == 2
    assert_same_output(reference, out)


def assert_same_output(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".tar") or name.endswith(".idx"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
        elif name.endswith(".parquet"):
            pa_, pb = pd.read_parquet(a / name), pd.read_parquet(b / name)
            pb["shard"] = pb["shard"].str.replace(str(b), str(a))
            pd.testing.assert_frame_equal(pa_, pb)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["shards"] == mb["shards"]


def test_refuses_a_different_run_unless_overwrite(shard_dir, tmp_path):
    out = tmp_path / "out"
    ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=3)
    again = ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=3)
    assert again.samples == 7 and again.shards_skipped == 3
    with pytest.raises(ic.OutputExistsError, match="different run"):
        ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=2)
    result = ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=2, overwrite=True)
    assert len(result.shards) == 4 and not (out / "00004.tar").exists()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ic.OutputExistsError, match="did not write"):
        ic.to_webdataset(kept_frame(shard_dir), str(stranger))


def test_inputs_replaced_at_the_same_paths_are_another_run_not_a_resume(shard_dir, tmp_path):
    """Same paths, other bytes (the shards were regenerated): the old output is not taken for theirs."""
    import os

    out = tmp_path / "out"
    ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=3)
    first = shard_dir / "shard-00000.tar"
    stamp = first.stat().st_mtime
    write_tar(first, sample_entries("new-", 5, seed=9, extra_ext="cls"))  # same size, other samples
    os.utime(first, (stamp + 5, stamp + 5))  # a rewrite moves the mtime, however coarse the filesystem's clock
    with pytest.raises(ic.OutputExistsError, match="different run"):
        ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=3)
    ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=3, overwrite=True)
    keys = [s["__key__"] for s in wds.WebDataset(sorted(map(str, out.glob("*.tar"))), shardshuffle=False)]
    assert keys[:3] == ["new-0000", "new-0002", "new-0004"]


def test_a_shard_replaced_between_staging_and_writing_is_never_copied(shard_dir, tmp_path):
    """Hours may pass between staging a shard's rows and copying its members (or a resume of the
    same lazy frame reuses parts staged before the shard was regenerated)."""
    staged = writer_module.stage_partitions(ic.read_webdataset(str(shard_dir)), str(tmp_path / "staged"))
    write_tar(shard_dir / "shard-00001.tar", sample_entries("s1-", 3, seed=11, extra_ext="cls"))  # new images
    with pytest.raises(ic.ShardError, match=r"shard-00001\.tar: the tar header before byte \d+ does not describe"):
        writer_module.write_shards(staged.paths, str(tmp_path / "out"), samples_per_shard=20)


def test_overwrite_never_deletes_the_files_the_run_reads(shard_dir, tmp_path):
    """Re-sharding an earlier output in place: replacing that output would delete the inputs first."""
    out = tmp_path / "out"
    ic.to_webdataset(ic.read_webdataset(str(shard_dir)), str(out), samples_per_shard=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ic.OutputExistsError, match=r"this run reads .*00000\.tar.* write to another output directory"):
        ic.to_webdataset(ic.read_webdataset(str(out)), str(out), samples_per_shard=6, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    resharded = ic.to_webdataset(ic.read_webdataset(str(out)), str(tmp_path / "elsewhere"), samples_per_shard=6)
    assert resharded.samples == 12


def test_overwrite_sees_the_inputs_however_their_paths_are_written(shard_dir, tmp_path, monkeypatch):
    """``../out/*.tar`` and a link to ``out`` name files inside ``out`` as much as ``out/*.tar`` does."""
    out = tmp_path / "out"
    ic.to_webdataset(ic.read_webdataset(str(shard_dir)), str(out), samples_per_shard=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(out)
    monkeypatch.chdir(tmp_path / "sub")
    for spec in ("../out/*.tar", "../sub/../out", str(tmp_path / "link" / "00000.tar")):
        with pytest.raises(ic.OutputExistsError, match="this run reads"):
            ic.to_webdataset(ic.read_webdataset(spec), "../out", samples_per_shard=6, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_finishing_leaves_the_temporaries_of_a_neighbour_alone(shard_dir, tmp_path):
    """A folder named with glob characters (``run?x``) is one folder, not a pattern matching ``runAx``."""
    neighbour = tmp_path / "runAx" / "00000.tar.tmp-0123456789ab"
    neighbour.parent.mkdir()
    neighbour.write_bytes(b"another run is writing this")
    ic.to_webdataset(ic.read_webdataset(str(shard_dir)), str(tmp_path / "run?x"), samples_per_shard=5)
    assert neighbour.exists()


def test_an_output_that_cannot_be_written_is_a_permission_error(shard_dir, monkeypatch):
    """Read-only filesystems (HTTP) raise NotImplementedError or their client's errors, not OSError."""
    from fsspec.implementations.memory import MemoryFileSystem

    def refuse(self, path, value, **kwargs):
        raise NotImplementedError

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", refuse)
    from dask_imgcurator.pipeline import check_curated_output

    with pytest.raises(PermissionError, match="cannot write to the output directory memory://ro-out: NotImplementedError"):
        check_curated_output(ic.mark_kept(ic.read_webdataset(str(shard_dir))), "memory://ro-out")


def test_unsafe_member_names_are_never_written(tmp_path):
    write_tar(tmp_path / "in.tar", sample_entries("ok", 2) + [("../evil.jpg", jpeg_bytes(1))])
    ddf = ic.read_webdataset(str(tmp_path / "in.tar"))
    with pytest.raises(ValueError, match=r"refusing to write sample '../evil' of \S*/in.tar: member name '../evil.jpg' "
                       r"contains '..'"):
        ic.to_webdataset(ddf, str(tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.tar"))
    ic.to_webdataset(ddf[ddf.error.isna()], str(tmp_path / "out2"))
    assert len(list(wds.WebDataset(str(tmp_path / "out2" / "00000.tar"), shardshuffle=False))) == 2


def test_error_rows_without_members_are_refused_with_advice(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    ddf = ic.read_webdataset(str(tmp_path / "junk.tar"))
    with pytest.raises(ValueError, match=r"the error row of shard \S*/junk.tar .* no members to write.* "
                                         r"ddf\[ddf.error.isna\(\)\]"):
        ic.to_webdataset(ddf, str(tmp_path / "out"))


def _without_members(df):
    return df.assign(members=df["members"].where(df["key"] != "ok0001", "[]"))


def test_every_row_to_webdataset_writes_is_checked_even_with_a_kept_column(shard_dir, tmp_path):
    """to_webdataset writes all rows: a marked frame (or read_parquet of a run) is no exception."""
    (shard_dir / "zz-broken.tar").write_bytes(b"this is not a tar file" * 40)
    marked = ic.mark_kept(ic.read_webdataset(str(shard_dir)))
    with pytest.raises(ValueError, match=r"error row of shard .*zz-broken\.tar.* has no members"):
        ic.to_webdataset(marked, str(tmp_path / "out"), samples_per_shard=50)
    assert not list((tmp_path / "out").glob("*.tar"))


def test_a_sample_without_members_is_refused_naming_it_and_its_shard(tmp_path):
    write_tar(tmp_path / "in.tar", sample_entries("ok", 2))
    ddf = ic.read_webdataset(str(tmp_path / "in.tar"))
    with pytest.raises(ValueError, match=r"sample 'ok0001' of \S*/in.tar .*no members to write"):
        ic.to_webdataset(ddf.map_partitions(_without_members, meta=ddf._meta), str(tmp_path / "out"))


def test_a_sample_without_an_image_is_written_with_its_other_members(tmp_path):
    write_tar(tmp_path / "in.tar", [("a.txt", b"caption only"), ("b.jpg", jpeg_bytes(1)), ("b.txt", b"b")])
    ddf = ic.read_webdataset(str(tmp_path / "in.tar"))
    assert ddf.compute()["image_member"].isna().tolist() == [True, False]
    assert ic.to_webdataset(ddf, str(tmp_path / "out")).samples == 2
    samples = list(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False))
    assert [(s["__key__"], s["txt"]) for s in samples] == [("a", b"caption only"), ("b", b"b")]
    meta = pd.read_parquet(tmp_path / "out" / "00000.parquet")
    assert meta["image_member"].isna().tolist() == meta["image_offset"].isna().tolist() == [True, False]


def test_memory_filesystem_output():
    ic.make_demo_shards("memory://writer-in", n_shards=2, samples_per_shard=4)
    ddf = ic.read_webdataset("memory://writer-in")
    result = ic.to_webdataset(ddf, "memory://writer-out", samples_per_shard=3)
    assert [r["samples"] for r in result.shards] == [3, 3, 2]
    back = ic.read_webdataset("memory://writer-out/*.tar").compute()
    assert back["key"].tolist() == ddf.compute()["key"].tolist()


def test_write_uses_a_distributed_client_when_present(shard_dir, tmp_path):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, Client(cluster):
        result = ic.to_webdataset(kept_frame(shard_dir), str(tmp_path / "out"), samples_per_shard=3)
    assert result.samples == 7


def _fail_on_the_second_shard(df):
    if len(df) and df["shard"].iloc[0].endswith("shard-00001.tar"):
        raise RuntimeError("injected failure")
    return df


def test_a_failed_write_leaves_no_task_on_the_users_client(shard_dir, tmp_path):
    """The erred partition's future too is let go: the scheduler keeps nothing of the failed write."""
    from distributed import Client, LocalCluster

    ddf = ic.read_webdataset(str(shard_dir))
    ddf = ddf.map_partitions(_fail_on_the_second_shard, meta=ddf._meta)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(RuntimeError, match="injected failure"):
            ic.to_webdataset(ddf, str(tmp_path / "out"), samples_per_shard=3)
        for _ in range(100):  # the cancellation reaches the scheduler asynchronously
            left = client.run_on_scheduler(lambda dask_scheduler: [(k, t.state) for k, t in dask_scheduler.tasks.items()
                                                                   if t.who_wants])
            if not left:
                break
            time.sleep(0.05)
    assert left == []


def test_writing_without_the_member_columns_fails_before_anything_runs(shard_dir, tmp_path):
    ddf = ic.read_webdataset(str(shard_dir))[["key", "shard", "image_member", "error"]]
    with pytest.raises(ValueError, match=r"to_webdataset needs the columns \['members'\] of read_webdataset"):
        ic.to_webdataset(ddf, str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"write_curated needs the columns \['members'\]"):
        ic.write_curated(ic.mark_kept(ddf), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_each_partition_is_staged_by_the_task_that_computes_it(shard_dir, tmp_path):
    """One task per input shard: computed and written together, so no computed partition waits
    in a worker's memory for a separate writer task (which dask ran last for the first shards)."""
    from distributed import Client, LocalCluster, get_task_stream

    ddf = ic.mark_kept(kept_frame(shard_dir).assign(score=1.0))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client, get_task_stream(client) as stream:
        staged = writer_module.stage_partitions(ddf, str(tmp_path / "staged"))
    paths, skipped = staged.paths, staged.skipped
    assert skipped == 0 and all(Path(p.removeprefix("file://")).is_file() for p in paths)
    assert len(stream.data) == ddf.npartitions
    assert sum(pd.read_parquet(p).shape[0] for p in paths) == len(ddf)


def test_each_staging_task_carries_only_its_own_path(shard_dir, tmp_path, monkeypatch):
    """A list of every part's path as an argument would be serialised into every task: graphs
    quadratic in the number of shards."""
    import cloudpickle

    captured = []
    run_tasks = writer_module.run_tasks
    monkeypatch.setattr(writer_module, "run_tasks", lambda tasks, *a, **k: captured.extend(tasks) or run_tasks(tasks, *a, **k))
    ddf = ic.mark_kept(kept_frame(shard_dir).assign(score=1.0))
    paths = writer_module.stage_partitions(ddf, str(tmp_path / "staged")).paths
    assert len(paths) >= 2 and len(captured) == len(paths)
    graph = dict(dask.optimize(*captured)[0].__dask_graph__())
    for spec in graph.values():
        pickled = cloudpickle.dumps(spec)
        assert sum(p.encode() in pickled for p in paths) <= 1


def test_member_names_with_spaces_need_rekey_for_the_dali_index(tmp_path):
    write_tar(tmp_path / "in.tar", [("a b.jpg", jpeg_bytes(1)), ("a b.txt", b"caption")])
    ddf = ic.read_webdataset(str(tmp_path / "in.tar"))
    with pytest.raises(ValueError, match=r"white space; .* rekey=True \(--rekey\).* overwrite=True \(--overwrite\)"):
        ic.to_webdataset(ddf, str(tmp_path / "out"))
    with pytest.raises(ic.OutputExistsError, match="different run"):
        ic.to_webdataset(ddf, str(tmp_path / "out"), rekey=True)
    result = ic.to_webdataset(ddf, str(tmp_path / "out"), rekey=True, overwrite=True)  # as the message says
    sample = next(iter(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False)))
    assert sample["__key__"] == "000000000" and sample["jpg"] == jpeg_bytes(1) and result.samples == 1


def test_shard_tasks_read_only_the_rows_they_need(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"i": np.arange(5000), "kept": np.random.default_rng(0).random(5000) < 0.3})
    part = tmp_path / "part.parquet"
    pq.write_table(table, part, row_group_size=writer_module.STAGE_ROW_GROUP)
    kept = table.filter(table.column("kept"))
    for start, stop in [(0, 10), (100, 900), (1000, 1500), (1490, 1499)]:
        got = writer_module._read_slice(str(part), start, stop, only_kept=True)
        assert got.column("i").to_pylist() == kept.slice(start, stop - start).column("i").to_pylist()
    for start, stop in [(0, 10), (1000, 3100), (4990, 5000)]:
        assert writer_module._read_slice(str(part), start, stop, only_kept=False).column("i").to_pylist() == list(range(start, stop))


def test_finding_completed_shards_costs_no_request_per_shard(shard_dir, tmp_path, monkeypatch):
    """Each file check is a round trip on an object store: planning 7 output shards, fresh or
    all complete, must take as many listing and stat requests as planning 1 (reading the
    completed shards' records aside, which is one batched ``cat``)."""
    from collections import Counter

    from fsspec.implementations.local import LocalFileSystem

    ddf = ic.mark_kept(kept_frame(shard_dir).assign(score=1.0))
    parts = writer_module.stage_partitions(ddf, str(tmp_path / "staged")).paths
    assert sum(pd.read_parquet(p).kept.sum() for p in parts) == 7
    requests, depth = Counter(), []

    def counted(method, real):
        def call(self, *args, **kwargs):  # what local ls or cat_file does inside is one request on a store
            if not depth:
                requests.update([method])
            depth.append(method)
            try:
                return real(self, *args, **kwargs)
            finally:
                depth.pop()
        return call

    for method in ("exists", "info", "isfile", "isdir", "ls", "cat_file"):
        monkeypatch.setattr(LocalFileSystem, method, counted(method, getattr(LocalFileSystem, method)))

    class Planned(Exception):
        pass

    def planned(*_):
        raise Planned

    real_write = writer_module._write_shard
    seen = {}
    for per_shard in (1, 7):
        out = str(tmp_path / f"out{per_shard}")
        monkeypatch.setattr(writer_module, "_write_shard", planned)
        requests.clear()
        with pytest.raises(Planned), dask.config.set(scheduler="synchronous"):
            writer_module.write_shards(parts, out, per_shard, only_kept=True)
        fresh = dict(requests)
        monkeypatch.setattr(writer_module, "_write_shard", real_write)
        first = writer_module.write_shards(parts, out, per_shard, only_kept=True)
        requests.clear()
        again = writer_module.write_shards(parts, out, per_shard, only_kept=True)
        n_shards = 7 // per_shard
        assert len(again.shards) == n_shards and again.shards_skipped == n_shards
        assert again.shards == first.shards
        resumed = dict(requests)
        assert resumed.pop("cat_file", 0) <= n_shards
        seen[per_shard] = (fresh, resumed)
    assert seen[1] == seen[7], seen


def test_temporaries_of_attempts_that_died_mid_write_are_removed(shard_dir, tmp_path, monkeypatch):
    """A worker killed between writing a temporary and renaming it leaves the temporary behind;
    dask retries the task elsewhere, and the finished output must not keep the orphan."""
    real_atomic = writer_module.write_atomic
    orphans = []

    def dying_once(fs, path, data):
        if "/metadata/part-" in path and not any(o.startswith(path) for o in orphans):  # a staging task
            orphan = f"{path}.tmp-deadbeef0000"
            with fs.open(orphan, "wb") as f:
                f.write(data[: len(data) // 2])  # half written, then the worker died
            orphans.append(orphan)
        real_atomic(fs, path, data)  # the retry elsewhere succeeds

    real_shard = writer_module._write_shard

    def shard_dying_once(slices, root, name, *args):
        orphan = f"{root.removeprefix('file://')}/{name}.tar.tmp-deadbeef0001"
        Path(orphan).write_bytes(b"half a tar")
        orphans.append(orphan)
        return real_shard(slices, root, name, *args)

    monkeypatch.setattr(writer_module, "write_atomic", dying_once)
    monkeypatch.setattr(writer_module, "_write_shard", shard_dying_once)
    out = tmp_path / "out"
    with dask.config.set(scheduler="synchronous"):
        result = ic.write_curated(ic.mark_kept(ic.read_webdataset(str(shard_dir))), str(out), samples_per_shard=3)
    assert result.balanced
    assert any("/metadata/" in o for o in orphans) and any("/shards/" in o and ".tar." in o for o in orphans)
    assert [p for p in out.rglob("*") if ".tmp-" in p.name] == []


def test_a_shard_is_settled_once_the_parts_up_to_its_last_row_are_counted(tmp_path):
    parts = [str(tmp_path / f"part-{i}.parquet") for i in range(4)]
    plan = writer_module._ShardPlan(parts, str(tmp_path / "out"), 2, rekey=False, only_kept=True)

    def settled(counts):
        return [(j, plan._planner.shards[j]) for j, _ in plan.settle(counts)]

    assert settled([3, None, 2, 1]) == [(0, [(0, 0, 2)])]  # shard 1 needs rows of later parts
    assert settled([3, None, 2, 1]) == []  # nothing twice
    assert settled([3, 0, None, 1]) == []
    assert settled([3, 0, 2, None]) == [(1, [(0, 2, 3), (2, 0, 1)])]
    assert settled([3, 0, 2, 1]) == [(2, [(2, 1, 2), (3, 0, 1)])]  # the last one, full
    assert settled([3, 0, 2, 1]) == []
    assert writer_module._plan_shards([3, 0, 2, 1], 2) == writer_module._plan_shards([3, 0, 2, 1, 0], 2)
    assert writer_module._plan_shards([3, 0, 2], 2)[-1] == [(2, 1, 2)]  # a smaller last shard


def _slow_partition(df):
    import time

    time.sleep(0.2)
    return df


def test_output_shards_are_written_while_later_partitions_are_still_staging(tmp_path):
    """On a distributed client a shard's task does not wait for the last partition; the files
    are those of the local scheduler, which runs the two phases one after the other."""
    from distributed import Client, LocalCluster, get_task_stream

    ic.make_demo_shards(str(tmp_path / "in"), n_shards=6, samples_per_shard=4, min_side=32, max_side=48)
    ddf = ic.read_webdataset(str(tmp_path / "in"))
    ddf = ddf.map_partitions(_slow_partition, meta=ddf._meta)
    sequential = ic.to_webdataset(ddf, str(tmp_path / "sequential"), samples_per_shard=4)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client, get_task_stream(client) as stream:
        streamed = ic.to_webdataset(ddf, str(tmp_path / "streamed"), samples_per_shard=4)
    spans = {}
    for record in stream.data:
        key = record["key"] if isinstance(record["key"], str) else record["key"][0]
        kind = "write" if key.startswith("write-shard") else "stage"
        start = min(s["start"] for s in record["startstops"] if s["action"] == "compute")
        spans.setdefault(kind, []).append(start)
    assert len(spans["write"]) == 6 and len(spans["stage"]) == 6
    assert min(spans["write"]) < max(spans["stage"])
    assert streamed.shards == sequential.shards and streamed.samples == 24
    for name in (r["shard"] for r in streamed.shards):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes()


def test_a_failing_shard_task_stops_a_streamed_write(tmp_path):
    from distributed import Client, LocalCluster

    write_tar(tmp_path / "in.tar", [("a b.jpg", jpeg_bytes(1)), ("a b.txt", b"caption")])
    ddf = ic.read_webdataset(str(tmp_path / "in.tar"))
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        with pytest.raises(ValueError, match=r"pass rekey=True"):
            ic.to_webdataset(ddf, str(tmp_path / "out"))
        assert ic.to_webdataset(ddf, str(tmp_path / "out"), rekey=True, overwrite=True).samples == 1


def test_a_streamed_write_gives_its_output_bar_a_total_once_every_part_is_counted(shard_dir, tmp_path, monkeypatch):
    from distributed import Client, LocalCluster

    bars = {}

    class Bar:
        def __init__(self, total=None, desc="", *_, **__):
            self.total, self.n = total, 0
            bars[desc] = self

        def update(self, n):
            self.n += n

        def refresh(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(writer_module, "progress_bar", Bar)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        result = ic.to_webdataset(kept_frame(shard_dir), str(tmp_path / "out"), samples_per_shard=3, progress=True)
    assert len(result.shards) == 3
    assert (bars["input shards"].total, bars["input shards"].n) == (3, 3)
    assert (bars["output shards"].total, bars["output shards"].n) == (3, 3)


def test_overwrite_replaces_only_a_previous_runs_output(shard_dir, tmp_path):
    out = tmp_path / "out"
    ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=3)
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ic.OutputExistsError, match=r"did not write \(extra, notes.txt\)"):
        ic.to_webdataset(kept_frame(shard_dir), str(out), samples_per_shard=2, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before

    # a curation run (interrupted: staged parts, temporaries, a report) is replaced as a whole
    curated = tmp_path / "curated"
    marked = ic.mark_kept(ic.read_webdataset(str(shard_dir)))
    ic.write_curated(marked, str(curated), samples_per_shard=4)
    (curated / "report.html").write_text("<html/>")
    (curated / "manifest.json").rename(curated / "_run.json")  # as if stopped before the end
    (curated / "shards" / "00009.tar.tmp-0123456789ab").write_bytes(b"")
    ddf = ic.read_webdataset(str(shard_dir))
    other_rows = ic.mark_kept(ddf, ddf.key.str.len() > 0)  # (the same rows would keep their staged parts)
    summary = ic.write_curated(other_rows, str(curated), samples_per_shard=5, overwrite=True)
    assert summary.shards == 3 and summary.parts_skipped == 0
    assert sorted(p.name for p in (curated / "shards").iterdir()) == sorted(
        [f"{i:05d}.{e}" for i in range(3) for e in ("tar", "parquet", "idx")] + ["manifest.json"]
    )
    assert not (curated / "report.html").exists()


def test_overwrite_never_deletes_input_shards_in_the_output_dir(tmp_path):
    """``imgcurator reshard 'D/*.tar' --out D --overwrite`` deleted the inputs, then failed."""
    from dask_imgcurator.cli import main

    for s in range(2):
        write_tar(tmp_path / f"s-{s:05d}.tar", sample_entries(f"s{s}-", 3))
    (tmp_path / "precious.txt").write_text("x")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    ddf = ic.mark_kept(ic.read_webdataset(str(tmp_path / "*.tar")))
    with pytest.raises(ic.OutputExistsError, match=r"did not write \(precious.txt, s-00000.tar, s-00001.tar\)"):
        ic.write_curated(ddf, str(tmp_path), samples_per_shard=2, overwrite=True)
    assert main(["reshard", str(tmp_path / "*.tar"), "--out", str(tmp_path), "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # names like an output's are not enough: without a run's record nothing is ours
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_tar(inputs / "00000.tar", sample_entries("x", 2))
    with pytest.raises(ic.OutputExistsError, match=r"did not write \(00000.tar\)"):
        ic.to_webdataset(ic.read_webdataset(str(inputs)), str(inputs), overwrite=True)
    assert [p.name for p in inputs.iterdir()] == ["00000.tar"]


@pytest.mark.parametrize("bad", [0, -3])
def test_a_bad_samples_per_shard_is_refused_before_anything_is_written(shard_dir, tmp_path, bad):
    ddf = kept_frame(shard_dir)
    with pytest.raises(ValueError, match=f"samples_per_shard must be .* at least 1, got {bad}"):
        ic.to_webdataset(ddf, str(tmp_path / "out"), samples_per_shard=bad)
    with pytest.raises(ValueError, match="samples_per_shard"):
        ic.write_curated(ic.mark_kept(ddf), str(tmp_path / "curated"), samples_per_shard=bad)
    with pytest.raises(ValueError, match="samples_per_shard"):
        writer_module.stage_and_write(ddf, str(tmp_path / "staged"), str(tmp_path / "shards"), bad)
    assert list(tmp_path.iterdir()) == [shard_dir]  # nothing claimed, staged or computed
    assert ic.to_webdataset(ddf, str(tmp_path / "out"), samples_per_shard=3).samples == 7  # the fixed re-run


def test_rekeyed_keys_stay_unique_past_shard_99999(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tar(tmp_path / "in.tar", [("a.jpg", jpeg_bytes(1))])
    row = ic.read_webdataset(str(tmp_path / "in.tar")).compute().iloc[0]
    n = 100_001
    part = str(tmp_path / "part.parquet")
    table = pa.table({c: pa.array([row[c]] * n) for c in ("shard", "image_member", "members")})
    pq.write_table(table.append_column("key", pa.array([f"k{i}" for i in range(n)])), part,
                   row_group_size=writer_module.STAGE_ROW_GROUP)
    out = tmp_path / "out"
    plan = writer_module._ShardPlan([part], str(out), 1, rekey=True, only_kept=False)
    plan._completed = {writer_module.shard_name(j): {} for j in range(1, 100_000)}  # only write shards 0 and 100000
    tasks = plan.settle([n])
    assert [j for j, _ in tasks] == [0, 100_000]
    dask.compute(*[t for _, t in tasks])
    keys = [next(iter(wds.WebDataset(str(out / f"{name}.tar"), shardshuffle=False)))["__key__"]
            for name in ("00000", "100000")]
    assert keys == ["000000", "1000000"]


def _note_in_first_partition_only(df):
    first = len(df) > 0 and df["key"].iloc[0].startswith("s0")
    return df.assign(note=pd.Series(["hi" if first else None] * len(df), index=df.index, dtype=object))


def test_a_column_null_in_one_partition_and_strings_in_another_is_written(tmp_path):
    for s in range(2):
        write_tar(tmp_path / f"s-{s:05d}.tar", sample_entries(f"s{s}-", 3, seed=s))
    ddf = ic.read_webdataset(str(tmp_path / "s-*.tar"))
    ddf = ddf.map_partitions(_note_in_first_partition_only, meta=ddf._meta.assign(note=pd.Series([], dtype=object)))
    result = ic.to_webdataset(ddf, str(tmp_path / "out"), samples_per_shard=4)  # shard 0 takes rows of both
    assert result.samples == 6
    notes = pd.read_parquet(tmp_path / "out" / "00000.parquet")["note"].tolist()
    assert notes[:3] == ["hi"] * 3 and pd.isna(notes[3])


def test_duplicate_keys_in_one_output_shard_are_refused_without_rekey(tmp_path):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "a.tar", [("x.jpg", jpeg_bytes(1)), ("x.txt", b"from a")])
    write_tar(tmp_path / "in" / "b.tar", [("x.jpg", jpeg_bytes(2)), ("x.txt", b"from b")])
    ddf = ic.read_webdataset(str(tmp_path / "in"))
    with pytest.raises(ValueError, match=r"key 'x' .*from \S*/a.tar and \S*/b.tar.* rekey=True \(--rekey\)"):
        ic.to_webdataset(ddf, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "00000.tar").exists()
    ic.to_webdataset(ddf, str(tmp_path / "out"), rekey=True, overwrite=True)
    samples = list(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False))
    assert [(s["__key__"], s["txt"]) for s in samples] == [("000000000", b"from a"), ("000000001", b"from b")]
    assert ic.to_webdataset(ddf, str(tmp_path / "apart"), samples_per_shard=1).samples == 2  # one per shard is fine


def test_a_run_that_failed_before_writing_anything_does_not_lock_its_output_dir(shard_dir, tmp_path):
    """A run that died before its first part (say, a mistyped model) left only its marker: the
    corrected command must not be refused as 'a different run'."""
    out = tmp_path / "out"
    marked = ic.mark_kept(ic.read_webdataset(str(shard_dir)))
    from dask_imgcurator.io.writer import claim_output

    assert claim_output(str(out), "an-earlier-attempt", {"samples_per_shard": 4}) is None
    (out / "metadata").mkdir()  # an empty staging folder, as a failed curate leaves
    summary = ic.write_curated(marked, str(out), samples_per_shard=4)
    assert summary.balanced and summary.written > 0
    # once a run has written something, a different one is refused without overwrite
    with pytest.raises(ic.OutputExistsError, match="different run"):
        ic.write_curated(marked, str(out), samples_per_shard=5)
