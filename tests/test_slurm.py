"""``imgcurator curate`` on workers that SLURM launched gives the same output as a local run.

Needs a working SLURM (``bash .ci/slurm-up`` starts a single-node one as root); skipped otherwise.
"""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest

import dask_imgcurator as ic
from dask_imgcurator.cli import DEMO_FILTER, main
from tests.test_cluster import assert_same_output, probe_each_worker

pytestmark = pytest.mark.slurm


def _slurm_problem() -> str | None:
    """Why SLURM cannot run jobs here, or None when it can."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (bash .ci/slurm-up installs and starts a single-node one)"
    try:  # a local controller answers at once; a stopped one makes sinfo retry for ~10 s
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 5 s (is slurmctld running? bash .ci/slurm-up)"
    except OSError as exc:
        return f"sinfo failed: {exc}"
    if states.returncode != 0:
        return f"sinfo failed: {states.stderr.strip() or states.returncode} (is slurmctld running? bash .ci/slurm-up)"
    if not {s.strip("*~#") for s in states.stdout.split()} & {"idle", "mix", "alloc", "comp"}:
        return f"no usable SLURM node (states: {states.stdout.split()})"
    return None


@pytest.fixture(scope="module")
def slurm():
    pytest.importorskip("dask_jobqueue")
    problem = _slurm_problem()
    if problem:
        pytest.skip(problem)


def _squeue(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %t"], capture_output=True, text=True, timeout=10)
    return [line for line in out.stdout.splitlines() if line.strip()]


def test_curate_on_slurm_workers_equals_a_local_run(slurm, tmp_path, capsys):
    from distributed import Client, get_task_stream

    from dask_imgcurator.cluster import slurm_cluster

    ic.make_demo_shards(str(tmp_path / "in"), n_shards=3, samples_per_shard=6)
    ref = ic.make_tiny_model_dir(tmp_path / "models")
    argv = ["curate", str(tmp_path / "in"), "--model", f"{ref.name}/{ref.pretrained}", "--model-dir", ref.model_dir,
            "--offline", "--filter", DEMO_FILTER, "--samples-per-shard", "5", "--decoder", "pillow"]
    timings = {}

    t0 = time.perf_counter()
    assert main([*argv, "--out", str(tmp_path / "local"), "--workers", "1"]) == 0, capsys.readouterr().err
    timings["local run (1 worker, 2 torch threads)"] = time.perf_counter() - t0

    job_name = f"imgc-{tmp_path.name[-12:]}"
    t0 = time.perf_counter()
    with slurm_cluster(
        jobs=2, cores=2, processes=1, memory="4GiB", walltime="00:10:00", job_name=job_name,
        job_extra_directives=["--oversubscribe"],            # 2 jobs x 2 cores on a 2-core node
        scheduler_options={"host": "127.0.0.1"},              # single node: scheduler on loopback
        local_directory=str(tmp_path / "scratch"), log_directory=str(tmp_path / "logs"),
        job_script_prologue=["export IMGCURATOR_TEST_JOB=1"],
    ) as cluster, Client(cluster) as client:
        timings["cluster + 2 jobs submitted"] = time.perf_counter() - t0
        client.wait_for_workers(2, timeout=120)
        timings["2 SLURM workers connected"] = time.perf_counter() - t0
        jobs = _squeue(job_name)
        assert len(jobs) == 2 and all(j.endswith(" R") for j in jobs), jobs
        assert set(client.nthreads().values()) == {1}          # our --nthreads 1 beat jobqueue's 2
        seen = probe_each_worker(client)
        assert {s["torch_threads"] for s in seen.values()} == {2}   # cores / task threads, via TorchThreads
        tick = client.run(lambda: __import__("dask").config.get("distributed.admin.tick.interval"))
        assert set(tick.values()) == {"500ms"}                  # housekeeping settings, from the job script

        t1 = time.perf_counter()
        with get_task_stream(client) as stream:
            assert main([*argv, "--out", str(tmp_path / "slurm"), "--scheduler", cluster.scheduler_address]) == 0, \
                capsys.readouterr().err
        timings["curate on SLURM workers"] = time.perf_counter() - t1
        assert stream.data and {t["worker"] for t in stream.data} <= set(seen)   # ran on the SLURM workers
    t1 = time.perf_counter()
    for _ in range(100):                                        # closing the cluster cancels the jobs
        if not _squeue(job_name):
            break
        time.sleep(0.1)
    assert not _squeue(job_name)
    timings["jobs gone after close"] = time.perf_counter() - t1
    timings["total SLURM part"] = time.perf_counter() - t0

    assert_same_output(tmp_path / "slurm", tmp_path / "local")
    logs = list((tmp_path / "logs").glob(f"{job_name}-*.err"))
    assert len(logs) == 2 and any("Starting Worker" in p.read_text() or "Start worker" in p.read_text() for p in logs)
    print("\nSLURM timings: " + ", ".join(f"{k}: {v:.1f}s" for k, v in timings.items()))
