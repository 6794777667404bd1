"""Faults and reruns: worker death, Ctrl-C/SIGTERM then resume, determinism, accounting."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import dask_imgcurator as ic
from dask_imgcurator.cli import _report
from dask_imgcurator.pipeline import CurationSummary


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    ic.make_demo_shards(str(root / "in"), n_shards=6, samples_per_shard=10, broken=True, min_side=200, max_side=700)
    ref = ic.make_tiny_model_dir(root / "models")
    return root, ref


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of a finished run, by relative path (all must be byte-identical across runs)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def assert_same_run(a: Path, b: Path) -> None:
    fa, fb = output_files(a), output_files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name.startswith("shards/") and name.endswith(".parquet"):
            continue  # its `shard` column names the output path, which differs between the two dirs
        if name.endswith("manifest.json") or name == "summary.json":
            continue  # resume counters differ; compared below
        assert fa[name] == fb[name], name
    ka = ic.read_parquet(str(a / "shards" / "*.parquet")).compute().drop(columns=["shard"])
    kb = ic.read_parquet(str(b / "shards" / "*.parquet")).compute().drop(columns=["shard"])
    assert ka.equals(kb)
    leftovers = [p for p in b.rglob("*") if ".tmp-" in p.name or p.name in ("_progress", "_run.json")]
    assert leftovers == []


def curate_cmd(root: Path, ref, out: Path) -> list[str]:
    return [sys.executable, "-m", "dask_imgcurator.cli", "curate", str(root / "in"), "--out", str(out),
            "--model", f"{ref.name}/{ref.pretrained}", "--model-dir", ref.model_dir, "--offline",
            "--filter", "aesthetic_score >= 5.078", "--workers", "1", "--batch-size", "2",
            "--decoder", "pillow", "--samples-per-shard", "7"]


@pytest.fixture(scope="module")
def reference(workload):
    """An undisturbed CLI run, the yardstick for the others."""
    root, ref = workload
    done = subprocess.run(curate_cmd(root, ref, root / "ref"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root / "ref"


def test_two_runs_give_identical_outputs(workload, reference, tmp_path):
    root, ref = workload
    again = subprocess.run(curate_cmd(root, ref, tmp_path / "again"), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert_same_run(reference, tmp_path / "again")
    assert (reference / "summary.json").read_bytes() == (tmp_path / "again" / "summary.json").read_bytes()
    assert b"time" not in (reference / "summary.json").read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_cli_resumes_to_the_same_output(workload, reference, tmp_path, sig):
    root, ref = workload

    out = tmp_path / "out"
    proc = subprocess.Popen(curate_cmd(root, ref, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list((out / "metadata").glob("part-*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if sig == signal.SIGINT:  # Ctrl-C: to the terminal's whole process group, worker processes included
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "interrupted: completed work is kept" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
    done = len(list((out / "metadata").glob("part-*.parquet")))
    assert 1 <= done < 6

    again = subprocess.run(curate_cmd(root, ref, out), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resumed: {done} metadata parts" in again.stdout
    assert_same_run(reference, out)


def test_killed_worker_does_not_change_the_output(workload, tmp_path):
    from distributed import Client, LocalCluster

    from dask_imgcurator.cluster import TorchThreads

    root, ref = workload

    def run(out: Path):
        ddf = ic.embed(ic.read_webdataset(str(root / "in")), ref, batch_size=1, decoder="pillow")
        return ic.write_curated(ic.mark_kept(ddf), str(out), samples_per_shard=7)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.register_plugin(TorchThreads(1))
        undisturbed = run(tmp_path / "ref")
        result: dict = {}
        worker = threading.Thread(target=lambda: result.setdefault("summary", run(tmp_path / "out")))
        worker.start()
        deadline = time.time() + 120
        while not list((tmp_path / "out" / "metadata").glob("part-*")) and time.time() < deadline:
            time.sleep(0.02)
        victim = next(iter(client.run(os.getpid).values()))
        os.kill(victim, signal.SIGKILL)
        worker.join(timeout=300)
    assert result["summary"].balanced
    assert result["summary"].samples_in == undisturbed.samples_in == 62
    assert_same_run(tmp_path / "ref", tmp_path / "out")


def test_unbalanced_accounting_exits_non_zero(capsys):
    broken = CurationSummary(samples_in=10, kept=5, filtered={"x > 1": 3}, failed={}, written=5)
    assert not broken.balanced
    assert _report(broken, "OUT") == 1
    captured = capsys.readouterr()
    assert "DOES NOT ADD UP" in captured.out and "do not add up" in captured.err
    fine = CurationSummary(samples_in=10, kept=5, filtered={"x > 1": 3}, failed={"no image": 2}, written=5)
    assert fine.balanced and _report(fine, "OUT") == 0


def test_report_counts_its_nouns_in_the_singular_and_the_plural():
    one = CurationSummary(samples_in=1, kept=1, written=1, shards=1, parts_skipped=1, shards_skipped=1)
    assert "written: 1 sample in 1 shard\n" in one.report() + "\n"
    assert "resumed: 1 metadata part and 1 shard were already complete" in one.report()
    many = CurationSummary(samples_in=4, kept=4, written=4, shards=2, parts_skipped=3, shards_skipped=0)
    assert "written: 4 samples in 2 shards" in many.report()
    assert "resumed: 3 metadata parts and 0 shards were already complete" in many.report()
