"""Clusters (local picks, torch threads in workers, SLURM job scripts), their configuration, and
the library running inside a user's own client."""
from __future__ import annotations

import os
import pickle
import sys
import time
import types
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster, get_task_stream

import dask_imgcurator as ic
from dask_imgcurator import cluster as cl
from dask_imgcurator import config
from dask_imgcurator.cli import DEMO_FILTER

# ----------------------------------------------------------------------------- helpers (also used by test_slurm)


def curate_with_library(shards: str, ref, out: str, samples_per_shard: int = 5):
    """read -> embed (tiny model) -> filter -> write, on whatever client is active (or none)."""
    ddf = ic.read_webdataset(shards)
    scored = ic.embed(ddf, ref, heads=("aesthetic", "nsfw"), decoder="pillow", batch_size=4)
    filt = ic.parse_filter(DEMO_FILTER)
    marked = ic.mark_kept(scored, filt.mask(scored), ic.drop_reason(scored, filt))
    return ic.write_curated(marked, out, samples_per_shard=samples_per_shard)


def assert_same_output(got: Path, expected: Path) -> None:
    """Two curation outputs hold the same metadata rows, shard bytes and accounting."""
    def metadata(root: Path) -> pd.DataFrame:
        frame = ic.read_parquet(str(root / "metadata")).compute()
        return frame.sort_values("key").reset_index(drop=True)

    a, b = metadata(got), metadata(expected)
    assert len(a) == len(b) > 0
    assert list(a.columns) == list(b.columns)
    plain = [c for c in a.columns if c != "embedding"]
    pd.testing.assert_frame_equal(a[plain], b[plain])
    for x, y in zip(a["embedding"], b["embedding"]):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    names = sorted(p.name for p in (expected / "shards").iterdir())
    assert names == sorted(p.name for p in (got / "shards").iterdir())
    assert any(n.endswith(".tar") for n in names)
    for name in names:
        if name.endswith((".tar", ".idx")):
            assert (got / "shards" / name).read_bytes() == (expected / "shards" / name).read_bytes(), name
    assert (got / "summary.json").read_text() == (expected / "summary.json").read_text()


def probe_worker() -> dict:
    """What a task thread on a worker sees."""
    import threading

    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "thread": threading.current_thread().name,
        "pid": os.getpid(),
    }


def probe_each_worker(client: Client) -> dict[str, dict]:
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    futures = [client.submit(probe_worker, workers=[w], allow_other_workers=False, pure=False) for w in workers]
    return dict(zip(workers, client.gather(futures)))


@pytest.fixture
def env():
    """Set environment variables for dask's config; restores both afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        def setenv(**values):
            for key, value in values.items():
                mp.setenv(key, str(value))
            dask.config.refresh()

        yield setenv
    dask.config.refresh()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    ic.make_demo_shards(str(root / "in"), n_shards=3, samples_per_shard=6)
    return root, ic.make_tiny_model_dir(root / "models")


# ----------------------------------------------------------------------------- configuration


def test_defaults_are_registered_in_dask_config():
    assert dask.config.get("imgcurator.cluster.kind") == "auto"
    assert dask.config.get("imgcurator.slurm.walltime") == "01:00:00"
    assert dask.config.get("imgcurator.slurm.local-directory") == "${TMPDIR:-/tmp}"
    assert config.section("local")["threads_per_worker"] == 1
    # dask's own ``refresh`` keeps them (they are registered defaults, not a one-off set)
    dask.config.refresh()
    assert dask.config.get("imgcurator.cuda.rmm-pool-size") == 0.5


def test_environment_variables_override_defaults_and_kwargs_override_both(env):
    env(
        DASK_IMGCURATOR__SLURM__QUEUE="gpu",
        DASK_IMGCURATOR__SLURM__GPUS="2",
        DASK_IMGCURATOR__SLURM__JOB_SCRIPT_PROLOGUE='["module load cuda"]',
        DASK_IMGCURATOR__LOCAL__N_WORKERS="3",
        DASK_IMGCURATOR__CLUSTER__KIND="slurm",
    )
    assert config.get("slurm.queue") == "gpu"
    assert config.get("slurm.gpus") == 2
    assert config.get("local.n-workers") == config.get("local.n_workers") == 3
    assert config.get("cluster.kind") == "slurm"
    slurm = config.section("slurm", queue="debug", cores=None)
    assert slurm["queue"] == "debug"                      # keyword beats environment
    assert slurm["job_script_prologue"] == ["module load cuda"]
    assert slurm["cores"] == 8                            # None keeps the configured value
    with pytest.raises(TypeError, match="unknown imgcurator.slurm setting.*'qeue'"):
        config.section("slurm", qeue="x")


def test_config_file_overrides_environment_for_a_block(env, tmp_path):
    env(DASK_IMGCURATOR__SLURM__QUEUE="gpu", DASK_IMGCURATOR__SLURM__CORES="16")
    path = tmp_path / "cluster.yaml"
    path.write_text("imgcurator:\n  slurm:\n    queue: long\n    job_extra_directives: ['--qos=high']\n"
                    "    scheduler-options: {host: 127.0.0.1}\n")
    with config.use_config_file(path):
        s = config.section("slurm")
        assert (s["queue"], s["cores"]) == ("long", 16)   # the file's value; the environment's elsewhere
        assert s["job_extra_directives"] == ["--qos=high"]
        assert s["scheduler_options"] == {"host": "127.0.0.1"}
        assert s["walltime"] == "01:00:00"
    assert config.get("slurm.queue") == "gpu"
    path.write_text("imgcurator:\n  slurm:\n    wallclock: '1:00:00'\n")
    with pytest.raises(ValueError, match="unknown setting.*wallclock"):
        config.read_config_file(path)
    path.write_text("slurm:\n  queue: x\n")
    with pytest.raises(ValueError, match="top-level 'imgcurator:'"):
        config.read_config_file(path)


def test_ensure_config_file_writes_commented_defaults_once(tmp_path):
    target = config.ensure_config_file(str(tmp_path))
    assert target == str(tmp_path / "imgcurator.yaml")
    text = Path(target).read_text()
    assert "# imgcurator:" in text and "#   slurm:" in text
    Path(target).write_text("imgcurator: {}\n")
    config.ensure_config_file(str(tmp_path))
    assert Path(target).read_text() == "imgcurator: {}\n"


# ----------------------------------------------------------------------------- which local cluster


def test_make_cluster_refuses_unknown_kinds_and_impossible_gpu_requests(monkeypatch):
    with pytest.raises(ValueError, match="unknown cluster kind 'k8s'"):
        cl.make_cluster("k8s")
    monkeypatch.setattr(cl, "gpu_count", lambda: 0)
    with pytest.raises(ValueError, match="no GPU is visible"):
        cl.make_cluster("cuda")
    monkeypatch.setattr(cl, "gpu_count", lambda: 2)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)   # not installed
    with pytest.raises(ValueError, match="needs dask-cuda"):
        cl.local_cluster(gpu=True)


def test_gpus_with_dask_cuda_give_a_local_cuda_cluster_with_rmm_pool_for_torch(monkeypatch):
    made, registered = {}, []

    class FakeLocalCUDACluster:
        def __init__(self, **kwargs):
            made.update(kwargs)

    monkeypatch.setattr(cl, "gpu_count", lambda: 2)
    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=FakeLocalCUDACluster))
    monkeypatch.setitem(sys.modules, "rmm", types.ModuleType("rmm"))
    monkeypatch.setattr(cl, "_register_plugins", lambda cluster, plugins: registered.extend(plugins))
    cluster = cl.make_cluster("auto")
    assert isinstance(cluster, FakeLocalCUDACluster)
    assert "n_workers" not in made   # dask-cuda: one per visible GPU
    assert made["threads_per_worker"] == 2  # two shards in flight per GPU
    assert made["rmm_pool_size"] == 0.5 and made["rmm_allocator_external_lib_list"] == ["torch"]
    assert made["dashboard_address"] == ":0"
    assert [type(p) for p in registered] == [cl.TorchThreads, cl.StopWorkerProfiler]
    assert registered[0].threads == max(1, cl._usable_cores() // 4)

    made.clear()
    monkeypatch.setitem(sys.modules, "rmm", None)          # no RMM: no pool, a warning, still a cluster
    with pytest.warns(UserWarning, match="without an RMM pool"):
        cl.local_cluster(gpu=True, rmm_pool_size="10GB")
    assert "rmm_pool_size" not in made and "rmm_allocator_external_lib_list" not in made


def test_gpus_without_dask_cuda_fall_back_to_one_pinned_worker_per_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(cl, "gpu_count", lambda: 2)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    monkeypatch.setattr(cl, "_cpu_cluster", lambda *args, **kwargs: calls.append((args, kwargs)))
    with pytest.warns(UserWarning, match="dask-cuda is not installed"):
        cl.local_cluster()
    (args, kwargs), = calls
    assert args[0] == 2 and kwargs["pin_gpus"] is True
    assert args[1] == 2  # task threads per worker as the cuda cluster's: two shards in flight per GPU


def test_pin_gpu_gives_each_worker_one_of_the_visible_gpus(monkeypatch):
    assert [cl.worker_index(n) for n in (3, "SLURMCluster-7-1", "SLURMCluster-7", "w")] == [3, 1, 7, 0]
    for name, expected in (("job-0-0", "4"), ("job-0-1", "6"), (2, "4")):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
        cl.PinGpu().setup(types.SimpleNamespace(name=name))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == expected


def test_local_cluster_sets_torch_threads_in_every_worker_process(env):
    """Workers get torch threads from config (env) or kwargs (kwargs win), new workers too."""
    env(DASK_IMGCURATOR__LOCAL__N_WORKERS="2", DASK_IMGCURATOR__CLUSTER__TORCH_THREADS="3")
    with cl.local_cluster(gpu=False, torch_threads=2) as cluster, Client(cluster) as client:
        assert isinstance(cluster, LocalCluster)
        assert sorted(client.nthreads().values()) == [1, 1]          # n-workers from env, 1 task thread each
        seen = probe_each_worker(client)
        assert len({s["pid"] for s in seen.values()}) == 2 and os.getpid() not in {s["pid"] for s in seen.values()}
        assert {s["torch_threads"] for s in seen.values()} == {2}    # kwarg beats env's 3, dask's default 1
        assert {s["cuda_visible"] for s in seen.values()} == {""}    # gpu=False hides GPUs
        assert all("Dask-Default-Threads" in s["thread"] for s in seen.values())
        cluster.scale(3)                                              # later workers get the plugin as well
        client.wait_for_workers(3, timeout=60)
        assert {s["torch_threads"] for s in probe_each_worker(client).values()} == {2}


def test_torch_threads_for_splits_cores():
    assert cl.torch_threads_for(2, cores=16) == 8
    assert cl.torch_threads_for(32, cores=16) == 1
    assert cl.torch_threads_for(0, cores=4) == 4


def test_cpu_workers_one_per_core_while_memory_holds_a_model_each(env):
    gib = 2**30
    assert cl.cpu_workers_for(cores=2, memory=24 * gib, memory_per_worker="6GiB") == 2
    assert cl.cpu_workers_for(cores=8, memory=32 * gib, memory_per_worker="6GiB") == 4   # 5 fit; 4 divides 8
    assert cl.cpu_workers_for(cores=6, memory=8 * gib, memory_per_worker=6 * gib) == 1
    assert cl.cpu_workers_for(cores=3, memory=1, memory_per_worker=0) == 3                # no memory rule
    assert cl.cpu_workers_for(cores=4, memory=1, memory_per_worker=0, at_most=1) == 1
    assert cl.cpu_workers_for(cores=6, memory=1, memory_per_worker=0, at_most=5) == 3
    env(DASK_IMGCURATOR__LOCAL__MEMORY_PER_WORKER="16GiB")
    assert cl.cpu_workers_for(cores=4, memory=40 * gib) == 2                              # from config
    assert cl.cpu_workers_for(cores=4, memory=40 * gib, memory_per_worker="1GiB") == 4    # keyword wins


def test_local_cluster_default_layout_comes_from_cpu_workers_for(env, monkeypatch):
    made, registered = {}, []

    class FakeLocalCluster:
        def __init__(self, **kwargs):
            made.update(kwargs)

    monkeypatch.setattr(cl, "LocalCluster", FakeLocalCluster)
    monkeypatch.setattr(cl, "_usable_cores", lambda: 4)
    monkeypatch.setattr(cl, "_register_plugins", lambda cluster, plugins: registered.extend(plugins))
    env(DASK_IMGCURATOR__LOCAL__MEMORY_PER_WORKER=str(10**30))   # nothing fits twice: 1 worker x 4 threads
    cl.local_cluster(gpu=False)
    assert made["n_workers"] == 1 and registered[0].threads == 4
    env(DASK_IMGCURATOR__LOCAL__MEMORY_PER_WORKER="1")            # 4 workers x 1 thread
    made.clear(), registered.clear()
    cl.local_cluster(gpu=False)
    assert made["n_workers"] == 4 and made["threads_per_worker"] == 1 and registered[0].threads == 1
    made.clear(), registered.clear()
    cl.local_cluster(gpu=False, max_workers=3)                     # 3 partitions: 2 workers x 2 threads
    assert made["n_workers"] == 2 and registered[0].threads == 2
    made.clear(), registered.clear()
    cl.local_cluster(3, gpu=False, max_workers=1)                  # an explicit count is kept
    assert made["n_workers"] == 3 and registered[0].threads == 1
    assert made["processes"] is True
    made.clear(), registered.clear()
    cl.local_cluster(1, gpu=False, processes=False)                # LocalCluster's own keywords pass through
    assert made["processes"] is False


def test_cli_caps_default_local_workers_at_the_number_of_input_shards(monkeypatch):
    from argparse import Namespace

    from dask_imgcurator import cli

    asked = []

    class Stop(Exception):
        pass

    def fake_make_cluster(kind, **kwargs):
        asked.append((kind, kwargs))
        raise Stop

    monkeypatch.setattr(cl, "make_cluster", fake_make_cluster)
    for kind, expected in (("local", 3), ("auto", 3), ("slurm", None)):
        with pytest.raises(Stop), cli._curation_client(Namespace(cluster=kind), partitions=3):
            pass
        assert asked[-1][0] == kind and asked[-1][1].get("max_workers") == expected


# ----------------------------------------------------------------------------- SLURM job scripts (no SLURM needed)


@pytest.fixture
def sbatch_on_path(tmp_path, monkeypatch):
    """An ``sbatch`` to find where SLURM is not installed: these tests submit no job."""
    import shutil

    if shutil.which("sbatch") is None:
        stub = tmp_path / "bin" / "sbatch"
        stub.parent.mkdir()
        stub.write_text("#!/bin/sh\necho 'no SLURM here' >&2\nexit 1\n")
        stub.chmod(0o755)
        monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")


def test_slurm_cluster_without_sbatch_says_so_before_it_starts(tmp_path, monkeypatch, capsys):
    """Off a SLURM node: one error naming sbatch (exit 2), not tracebacks from a submission and a wait."""
    pytest.importorskip("dask_jobqueue")
    from dask_imgcurator.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch (nor anything else) on it
    with pytest.raises(FileNotFoundError, match="submits its worker jobs with sbatch, which is not on PATH"):
        cl.slurm_cluster(jobs=1)
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=2)
    ref = ic.make_tiny_model_dir(tmp_path / "models")
    argv = ["curate", str(tmp_path / "in"), "--out", str(tmp_path / "cur"), "--cluster", "slurm",
            "--model", f"{ref.name}/{ref.pretrained}", "--model-dir", ref.model_dir]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the slurm cluster submits its worker jobs with sbatch") and "Traceback" not in err


def _plugins_on(cluster) -> dict:
    return {name: pickle.loads(blob) for name, blob in cluster.scheduler.worker_plugins.items()}


def test_slurm_job_script_has_gres_walltime_environment_and_scratch(sbatch_on_path):
    pytest.importorskip("dask_jobqueue")
    with cl.slurm_cluster(
        jobs=0, gpus=2, cores=16, memory="64GiB", walltime="02:30:00", queue="gpu", account="proj42",
        job_script_prologue=["module load cuda/12.4", "source /shared/venv/bin/activate"],
        job_extra_directives=["--constraint=a100"], local_directory="/scratch/$SLURM_JOB_ID",
        scheduler_options={"host": "127.0.0.1"},
    ) as cluster:
        script = cluster.job_script()
        plugins = _plugins_on(cluster)
    lines = script.splitlines()
    for directive in ("-J imgcurator", "-p gpu", "-A proj42", "--cpus-per-task=16", "--mem=64G", "-t 02:30:00",
                      "--constraint=a100", "--gres=gpu:2"):
        assert f"#SBATCH {directive}" in lines, directive
    prologue = lines.index("module load cuda/12.4")
    assert lines[prologue + 1] == "source /shared/venv/bin/activate"
    command = lines[prologue + 2]
    assert f"{sys.executable} -m distributed.cli.dask_worker tcp://127.0.0.1:" in command
    assert "--nworkers 2" in command                                  # one worker process per GPU
    assert command.endswith("--nthreads 1")                           # one task thread each (the last one counts)
    assert "--local-directory /scratch/$SLURM_JOB_ID" in command
    assert "--death-timeout 60" in command
    assert plugins["imgcurator-torch-threads"].threads == 8           # 16 cores / 2 workers
    assert "imgcurator-pin-gpu" in plugins


def test_slurm_job_script_defaults_come_from_config(env, sbatch_on_path):
    pytest.importorskip("dask_jobqueue")
    env(DASK_IMGCURATOR__SLURM__WALLTIME="00:20:00", DASK_IMGCURATOR__SLURM__CORES="4",
        DASK_IMGCURATOR__SLURM__JOB_SCRIPT_PROLOGUE='["export HF_HUB_OFFLINE=1"]',
        DASK_IMGCURATOR__SLURM__SCHEDULER_OPTIONS='{"host": "127.0.0.1"}')
    with cl.slurm_cluster(jobs=0) as cluster:
        script = cluster.job_script()
        plugins = _plugins_on(cluster)
    assert "#SBATCH -t 00:20:00" in script and "#SBATCH --cpus-per-task=4" in script
    assert "--gres" not in script and "--nworkers" not in script
    assert "\nexport HF_HUB_OFFLINE=1\n" in script
    assert "--local-directory ${TMPDIR:-/tmp}" in script             # node-local scratch, expanded in the job
    assert "--nthreads 4 " in script and script.rstrip().endswith("--nthreads 1")
    assert plugins["imgcurator-torch-threads"].threads == 4
    assert "imgcurator-pin-gpu" not in plugins


def test_slurm_options_refuse_more_threads_than_cores():
    s = config.section("slurm", cores=2, processes=2, threads_per_worker=2)
    with pytest.raises(ValueError, match="need more than the job's 2 cores"):
        cl.slurm_options(s)


# ----------------------------------------------------------------------------- library etiquette


def slow_square(x: int) -> int:
    time.sleep(0.01)
    return x * x


def test_pipeline_runs_in_a_users_running_client_beside_unrelated_work(demo, tmp_path, monkeypatch):
    """The library uses the user's client, creates no cluster, and leaves the user's work alone."""
    import torch

    root, ref = demo
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # as in the workers below, so the floats match bit for bit
    try:
        with dask.config.set(scheduler="sync"):                           # local scheduler, no client
            curate_with_library(str(root / "in"), ref, str(tmp_path / "local"))
    finally:
        torch.set_num_threads(threads)

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as user_cluster, \
            Client(user_cluster) as client:
        def no_new_clusters(*args, **kwargs):
            raise AssertionError("the library must not create a cluster")

        monkeypatch.setattr("distributed.deploy.spec.SpecCluster.__init__", no_new_clusters)
        unrelated = client.map(slow_square, range(300))
        total = client.submit(sum, unrelated)
        with get_task_stream(client) as stream:
            summary = curate_with_library(str(root / "in"), ref, str(tmp_path / "dist"))
        assert total.result(timeout=120) == sum(x * x for x in range(300))
        assert all(f.status == "finished" for f in unrelated)
        assert client.submit(slow_square, 7).result() == 49      # the client is still the user's and usable
        ran_on = {t["worker"] for t in stream.data}
        assert ran_on <= set(client.scheduler_info()["workers"]) and stream.data
    assert summary.balanced and summary.samples_in == 18
    assert_same_output(tmp_path / "dist", tmp_path / "local")


def test_an_embedded_frame_merges_under_a_client_with_task_shuffles(demo):
    """As the README says: dask's P2P shuffle cannot rebuild the embedding column's fixed-size-list
    dtype, the task-based shuffle carries it."""
    root, ref = demo
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        scored = ic.embed(ic.read_webdataset(str(root / "in")), ref, decoder="pillow")
        labels = dd.from_pandas(pd.DataFrame({"key": scored["key"].compute(), "label": 1}), npartitions=2)
        merged = scored.merge(labels, on="key", shuffle_method="tasks").compute()
    assert len(merged) == 18 and merged["label"].eq(1).all()
    assert merged["embedding"].dtype == scored["embedding"].dtype


def _has_profiler(dask_worker) -> bool:
    return "profile" in dask_worker.periodic_callbacks and "profile-cycle" in dask_worker.periodic_callbacks


@pytest.mark.parametrize("profile", [False, True])
def test_local_cluster_workers_run_without_dask_profiler_unless_asked(profile):
    with dask.config.set({"imgcurator.cluster.worker-profile": profile}):
        with cl.local_cluster(1, dashboard_address=None) as cluster, Client(cluster) as client:
            assert list(client.run(_has_profiler).values()) == [profile]
            assert client.submit(sum, [1, 2]).result() == 3


# ----------------------------------------------------------------------------- dask's housekeeping

_HOUSEKEEPING = ("distributed.admin.tick.interval", "distributed.admin.system-monitor.interval",
                 "distributed.worker.memory.monitor-interval", "distributed.scheduler.work-stealing-interval")


def _housekeeping_seen() -> dict:
    return {key: dask.config.get(key) for key in _HOUSEKEEPING}


def _periodic_intervals(server) -> dict:
    """Milliseconds between runs of a server's periodic callbacks, by name."""
    return {name: pc.callback_time for name, pc in server.periodic_callbacks.items()}


def test_local_cluster_runs_dask_housekeeping_less_often_in_scheduler_nanny_and_workers():
    dask_defaults = _housekeeping_seen()
    assert dask_defaults["distributed.admin.tick.interval"] == "20ms"         # what dask would do here
    wanted = cl.housekeeping_settings()
    assert wanted == {"distributed.admin.tick.interval": "500ms", "distributed.admin.system-monitor.interval": "2s",
                      "distributed.worker.memory.monitor-interval": "500ms",
                      "distributed.scheduler.work-stealing-interval": "1s"}
    with cl.local_cluster(1, dashboard_address=None) as cluster, Client(cluster) as client:
        assert list(client.run(_housekeeping_seen).values()) == [wanted]       # the worker process
        worker = list(client.run(lambda dask_worker: _periodic_intervals(dask_worker)).values())[0]
        assert (worker["tick"], worker["monitor"], worker["memory_monitor"]) == (500, 2000, 500)
        scheduler = _periodic_intervals(cluster.scheduler)                      # in this process, read at start
        assert (scheduler["tick"], scheduler["monitor"], scheduler["stealing"]) == (500, 2000, 1000)
        (nanny,) = cluster.workers.values()
        assert (_periodic_intervals(nanny)["tick"], _periodic_intervals(nanny)["memory_monitor"]) == (500, 500)
        assert client.submit(sum, [1, 2]).result() == 3
    assert _housekeeping_seen() == dask_defaults                               # only while the cluster started


def test_housekeeping_setting_set_to_null_keeps_dasks_value(env):
    env(DASK_IMGCURATOR__CLUSTER__DASK_CONFIG__DISTRIBUTED__ADMIN__TICK__INTERVAL="None")   # as imgcurator.yaml says
    settings = cl.housekeeping_settings()
    assert "distributed.admin.tick.interval" not in settings
    assert settings["distributed.admin.system-monitor.interval"] == "2s"       # the others stay
    with cl.local_cluster(1, dashboard_address=None) as cluster, Client(cluster) as client:
        assert list(client.run(lambda: dask.config.get("distributed.admin.tick.interval")).values()) == ["20ms"]
        assert list(client.run(lambda: dask.config.get("distributed.admin.system-monitor.interval")).values()) == ["2s"]


def test_slurm_job_script_exports_housekeeping_settings_before_the_users_prologue(sbatch_on_path):
    pytest.importorskip("dask_jobqueue")
    with cl.slurm_cluster(jobs=0, job_script_prologue=["source /venv/bin/activate"],
                          scheduler_options={"host": "127.0.0.1"}) as cluster:
        script = cluster.job_script()
        assert _periodic_intervals(cluster.scheduler)["tick"] == 500           # the scheduler, in this process
    lines = script.splitlines()
    exports = [line for line in lines if line.startswith("export DASK_DISTRIBUTED__")]
    assert exports == [
        "export DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=500ms",
        "export DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL=2s",
        "export DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL=500ms",
        "export DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING_INTERVAL=1s",
    ]
    assert lines.index(exports[-1]) < lines.index("source /venv/bin/activate")
    # what a worker started by that job script reads back
    env = {line.split()[1].split("=", 1)[0]: line.split("=", 1)[1] for line in exports}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        dask.config.refresh()
        assert _housekeeping_seen() == cl.housekeeping_settings()
    dask.config.refresh()



def _torch_threads(apply: bool) -> int:
    import torch

    from dask_imgcurator.backend import apply_torch_threads

    if apply:
        apply_torch_threads()
    return torch.get_num_threads()


def test_torch_threads_registered_after_the_workers_ran_torch_reach_the_stages():
    """A task thread keeps the torch thread count it first ran with; the stages apply the plugin's."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert client.submit(_torch_threads, False, pure=False).result() == 1  # the nanny's OMP_NUM_THREADS=1
        client.register_plugin(cl.TorchThreads(2))
        assert client.submit(_torch_threads, True, pure=False).result() == 2
