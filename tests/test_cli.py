import json

import dask
import numpy as np
import pandas as pd
import pytest
import webdataset as wds

import dask_imgcurator as ic
from dask_imgcurator.cli import DEMO_FILTER, main
from dask_imgcurator.models import ClipRef, make_tiny_model_dir


@pytest.fixture(scope="module")
def demo_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ic.make_demo_shards(str(root / "in"), n_shards=3, samples_per_shard=6, broken=True)
    ref = make_tiny_model_dir(root / "models")
    return root, ref


def test_inspect_prints_counts(demo_input, capsys):
    root, _ = demo_input
    assert main(["inspect", str(root / "in")]) == 0
    out = capsys.readouterr().out
    assert "3 shards, 20 samples, 1 with errors" in out
    assert "no image member" in out
    assert main(["inspect", str(root / "in"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["samples"] for r in rows] == [8, 6, 6]


def test_inspect_counts_an_unreadable_shard_apart_from_samples(tmp_path, capsys):
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=2)
    (tmp_path / "in" / "zz-broken.tar").write_bytes(b"not a tar" * 100)
    assert main(["inspect", str(tmp_path / "in" / "demo-00000.tar")]) == 0
    assert "1 shard, 2 samples, 0 with errors" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "in")]) == 0
    out = capsys.readouterr().out
    assert "2 shards (1 unreadable), 2 samples, 0 with errors" in out
    assert main(["inspect", str(tmp_path / "in"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["samples"], r["errors"], r["shard_errors"]) for r in rows] == [(2, 0, 0), (0, 0, 1)]


def test_inspect_counts_a_sample_without_a_key_as_a_sample(tmp_path, capsys):
    from tests.conftest import jpeg_bytes, write_tar

    write_tar(tmp_path / "k.tar", [("a.jpg", jpeg_bytes(1)), (".jpg", jpeg_bytes(2)), ("b.jpg", jpeg_bytes(3))])
    assert main(["inspect", str(tmp_path / "k.tar")]) == 0
    out = capsys.readouterr().out
    assert "1 shard, 3 samples, 1 with errors" in out and "no key:" in out


def test_a_memory_filesystem_is_refused_where_worker_processes_would_use_it(demo_input, tmp_path, capsys):
    """memory:// lives in one process: the CLI's workers would not see its files, nor keep what they write."""
    root, ref = demo_input
    model = ["--model", f"{ref.name}/{ref.pretrained}", "--model-dir", ref.model_dir, "--offline"]
    assert main(["curate", str(root / "in"), "--out", "memory://cli-out", *model]) == 2
    assert "error: memory://cli-out: a memory:// filesystem lives inside one process" in capsys.readouterr().err
    assert main(["curate", "memory://cli-in/*.tar", "--out", str(tmp_path / "o"), *model]) == 2
    assert "error: memory://cli-in/*.tar: a memory:// filesystem" in capsys.readouterr().err
    assert main(["reshard", str(root / "in"), "--out", "memory://cli-out", "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "error: memory://cli-out: a memory:// filesystem" in capsys.readouterr().err
    ic.make_demo_shards("memory://cli-mem-in", n_shards=1, samples_per_shard=2)
    for argv in (["inspect", "memory://cli-mem-in"], ["index", "memory://cli-mem-in"]):
        assert main([*argv, "--scheduler", "tcp://127.0.0.1:1"]) == 2
        assert "error: memory://cli-mem-in: a memory:// filesystem" in capsys.readouterr().err


def test_index_next_to_shards_on_a_read_only_filesystem_says_to_give_out(demo_input, tmp_path, capsys, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    def refuse(self, path, mode="rb", **kwargs):
        if "w" in mode:
            raise NotImplementedError
        return original(self, path, mode, **kwargs)

    original = LocalFileSystem._open
    monkeypatch.setattr(LocalFileSystem, "_open", refuse)
    root, _ = demo_input
    assert main(["index", str(root / "in" / "demo-00000.tar")]) == 1
    err = capsys.readouterr().err
    assert "demo-00000.tar: cannot write " in err and "demo-00000.idx (NotImplementedError); give --out DIR" in err


def test_reshard_writes_all_readable_samples_and_accounts_for_the_rest(demo_input, tmp_path, capsys):
    root, _ = demo_input
    assert main(["reshard", str(root / "in"), "--out", str(tmp_path / "out"), "--samples-per-shard", "7"]) == 0
    out = capsys.readouterr().out
    assert "samples in: 20 = kept 19 + filtered 0 + failed 1" in out
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "out" / "shards" / "{00000..00002}.tar"), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 19
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["balanced"] and summary["failed"] == {"no image": 1}


def test_index_writes_dali_index_files(demo_input, tmp_path, capsys):
    root, _ = demo_input
    assert main(["index", str(root / "in"), "--out", str(tmp_path / "idx")]) == 0
    first = (tmp_path / "idx" / "demo-00000.idx").read_text().splitlines()
    assert first[0] == "v1.2 8" and first[1].startswith("jpg ") and len(first) == 9


def test_reshard_with_out_inside_the_input_folder_leaves_its_own_shards_out(demo_input, tmp_path, capsys):
    root, _ = demo_input
    data = tmp_path / "data"
    ic.make_demo_shards(str(data), n_shards=2, samples_per_shard=4)
    argv = ["reshard", str(data), "--out", str(data / "curated"), "--samples-per-shard", "3"]
    assert main(argv) == 0, capsys.readouterr().err
    first = capsys.readouterr().out
    tars = sorted((data / "curated" / "shards").glob("*.tar"))
    before = [t.read_bytes() for t in tars]
    assert main(argv) == 0, capsys.readouterr().err  # the directory now also holds curated/shards/*.tar
    captured = capsys.readouterr()
    assert f"warning: leaving out {len(tars)} .tar file(s) in {data / 'curated'}," in captured.err
    assert "samples in: 8 = kept 8" in first and "samples in: 8 = kept 8" in captured.out
    assert "already complete" in captured.out
    assert [t.read_bytes() for t in sorted((data / "curated" / "shards").glob("*.tar"))] == before
    # the run's folder names the sample once each: read_parquet(OUT) reads OUT/metadata, not OUT/shards too
    assert len(ic.read_parquet(str(data / "curated")).compute()) == 8


def test_a_second_output_inside_the_input_folder_does_not_read_the_first(demo_input, tmp_path, capsys):
    """curate data --out data/v1, then --out data/v2: v2 read data/v1/shards/*.tar as inputs too (the
    samples twice, under the same keys), and v1 run again would read v2's."""
    data = tmp_path / "data"
    ic.make_demo_shards(str(data), n_shards=2, samples_per_shard=4)
    for out in ("v1", "v2"):
        assert main(["reshard", str(data), "--out", str(data / out), "--samples-per-shard", "3"]) == 0
        captured = capsys.readouterr()
        assert "samples in: 8 = kept 8" in captured.out, captured
    assert f"warning: leaving out 3 .tar file(s) in {data / 'v1'}," in captured.err
    assert "UserWarning" not in captured.err
    # naming the earlier output (the folder the warning names, or its shards) reads it
    for folder in (data / "v1", data / "v1" / "shards"):
        assert main(["inspect", str(folder)]) == 0
        captured = capsys.readouterr()
        assert "3 shards, 8 samples" in captured.out and "warning" not in captured.err


def test_index_into_one_folder_refuses_shards_that_share_a_name(demo_input, tmp_path, capsys):
    for folder in ("a", "b"):
        ic.make_demo_shards(str(tmp_path / folder), n_shards=1, samples_per_shard=2)
    argv = ["index", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "idx")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "demo-00000.idx" in err and str(tmp_path / "a" / "demo-00000.tar") in err
    assert not (tmp_path / "idx").exists()
    assert main(["index", str(tmp_path / "a"), str(tmp_path / "b")]) == 0  # next to each shard: no clash
    assert (tmp_path / "a" / "demo-00000.idx").exists() and (tmp_path / "b" / "demo-00000.idx").exists()


def test_curate_end_to_end_with_filter(demo_input, tmp_path, capsys):
    import logging

    import distributed  # noqa: F401  (its import sets its loggers' levels)

    root, ref = demo_input
    levels = [logging.getLogger(name).level for name in ("distributed", "asyncio")]
    out = tmp_path / "cur"
    argv = ["curate", str(root / "in"), "--out", str(out), "--model", f"{ref.name}/{ref.pretrained}",
            "--model-dir", ref.model_dir, "--offline", "--filter", DEMO_FILTER, "--samples-per-shard", "5",
            "--workers", "1", "--decoder", "pillow"]
    assert main(argv) == 0, capsys.readouterr().err
    # the teardown's quiet is over with the run (main() may be called from a program that logs)
    assert [logging.getLogger(name).level for name in ("distributed", "asyncio")] == levels
    text, err = capsys.readouterr()
    # stderr is no terminal here (as in a SLURM log): plain progress lines, no redrawing
    assert "\r" not in err and "\x1b" not in err
    assert "input shards: 100% 3/3 shards [" in err and "output shards: 100% " in err
    meta = ic.read_parquet(str(out / "metadata")).compute()
    assert len(meta) == 20 and meta["key"].is_unique
    failed = meta[meta["error"].notna()]
    assert set(failed["key"]) == {"00000b001", "00000b002"}
    ok = meta[meta["error"].isna()]
    expected_kept = (ok["aesthetic_score"] >= 5.078) & (ok["nsfw_score"] < 0.5102)
    assert (ok["kept"] == expected_kept).all()
    assert meta.loc[meta["error"].notna(), "kept"].eq(False).all()
    dropped = ok[~ok["kept"]]
    assert set(dropped["drop_reason"]) <= {"aesthetic_score >= 5.078", "nsfw_score < 0.5102"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_in"] == 20 and summary["balanced"]
    assert summary["kept"] == int(expected_kept.sum())
    assert sum(summary["filtered"].values()) == int((~expected_kept).sum())
    assert f"samples in: 20 = kept {summary['kept']}" in text
    shard_files = sorted((out / "shards").glob("*.tar"))
    written = [s["__key__"] for s in wds.WebDataset([str(p) for p in shard_files], shardshuffle=False)]
    assert written == ok.loc[ok["kept"], "key"].tolist()
    shard_meta = pd.concat([pd.read_parquet(p.with_suffix(".parquet")) for p in shard_files])
    assert shard_meta["key"].tolist() == written
    emb = np.stack(shard_meta["embedding"].to_numpy())
    assert emb.shape == (len(written), 32)


def test_a_model_dir_moved_with_its_files_times_is_the_same_run(demo_input, tmp_path, capsys):
    """The weights' folder (and --offline) is not what identifies a run: the same weights moved
    (mv, rsync -a) resume the run; weights saved over are another run (tests/models/test_clip.py)."""
    import shutil

    root, _ = demo_input
    first = make_tiny_model_dir(tmp_path / "models")
    base = ["curate", str(root / "in"), "--out", str(tmp_path / "cur"), "--model", f"{first.name}/{first.pretrained}",
            "--workers", "1", "--decoder", "pillow"]
    assert main([*base, "--model-dir", first.model_dir, "--offline"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    moved = shutil.move(first.model_dir, tmp_path / "elsewhere")
    assert main([*base, "--model-dir", str(moved)]) == 0, capsys.readouterr().err
    assert "already complete" in capsys.readouterr().out


def test_no_draft_is_passed_to_embed(demo_input, tmp_path, capsys, monkeypatch):
    from dask_imgcurator.stages import embed as embed_module

    root, ref = demo_input
    seen = []
    real = embed_module.embed
    monkeypatch.setattr(embed_module, "embed", lambda *a, **kw: seen.append(kw["draft"]) or real(*a, **kw))
    base = ["curate", str(root / "in"), "--model", f"{ref.name}/{ref.pretrained}", "--model-dir", ref.model_dir,
            "--offline", "--workers", "1", "--decoder", "pillow"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--no-draft"]) == 0
    assert seen == [True, False]


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["inspect", "/no/such/shards-*.tar"], "error: pattern '/no/such/shards-*.tar' matched no files"),
        (["curate", "IN", "--out", "OUT", "--filter", "aesthetic_score >> 5"], "invalid filter"),
        (["curate", "IN", "--out", "OUT", "--filter", "__import__('os').system('x')"], "invalid filter"),
        (["curate", "IN", "--out", "OUT", "--filter", "aesthetic > 5"], "unknown column 'aesthetic'"),
    ],
)
def test_user_errors_are_one_clear_line(demo_input, tmp_path, capsys, argv, phrase):
    root, ref = demo_input
    argv = [str(root / "in") if a == "IN" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    if argv[0] == "curate":
        argv += ["--model", f"{ref.name}/{ref.pretrained}", "--model-dir", ref.model_dir, "--offline"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err


def test_a_url_whose_filesystem_package_is_missing_is_one_clear_line(capsys, monkeypatch):
    """fsspec says which package a protocol needs ("Install s3fs to access S3") with an ImportError."""
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "nopkg",
                        {"class": "no_such_package.NoFileSystem", "err": "Install no-such-package to access nopkg://"})
    assert main(["inspect", "nopkg://bucket/x.tar"]) == 2
    err = capsys.readouterr().err
    assert err == "error: Install no-such-package to access nopkg://\n"


@pytest.mark.parametrize("address", ["99999", ":70000", "localhost:", "localhost", "0.0.0.0:87a"])
def test_a_bad_dashboard_address_is_a_usage_error(address, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["curate", "IN", "--out", "OUT", f"--dashboard={address}"])
    assert stop.value.code == 2
    assert f"argument --dashboard: expected [HOST]:PORT with a port from 0 to 65535 (e.g. :8787), got {address!r}" in capsys.readouterr().err


@pytest.mark.parametrize("address", [":8787", "8787", "127.0.0.1:0", "[::1]:8787"])
def test_good_dashboard_addresses_parse(address):
    from dask_imgcurator.cli import build_parser

    assert build_parser().parse_args(["curate", "IN", "--out", "OUT", f"--dashboard={address}"]).dashboard == address


def test_a_model_error_in_the_workers_is_one_line_without_their_logs(demo_input, tmp_path, capfd):
    """Weights that fail to load fail in every worker: the run printed each worker's "Compute Failed"
    record (a repr'd traceback) and shutdown warnings. A checkpoint of another architecture than the
    bare path's ViT-L-14 is refused before that, from its tensors' shapes."""
    import shutil

    import open_clip
    import torch

    from dask_imgcurator.models.clip import clip_dir

    root, ref = demo_input
    state = open_clip.create_model(f"local-dir:{clip_dir(ref)}").state_dict()
    torch.save(state, tmp_path / "ckpt.pt")
    argv = ["curate", str(root / "in"), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "ckpt.pt"),
            "--heads", "", "--workers", "1", "--decoder", "pillow"]
    assert main(argv) == 2  # the image tower's shapes are checked here, before a cluster starts
    err = capfd.readouterr().err
    assert err.startswith(f"error: checkpoint {tmp_path / 'ckpt.pt'} does not fit the ViT-L-14 architecture"), err
    assert "dask dashboard" not in err

    broken = tmp_path / "broken-model"  # weights that only the workers read
    shutil.copytree(clip_dir(ref), broken)
    weights = broken / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    argv[argv.index("--model") + 1] = f"local-dir:{broken}"
    assert main(argv) == 2
    err = capfd.readouterr().err  # the worker processes' output too
    assert "dask dashboard" in err and f"error: {weights} is damaged" in err
    assert "Compute Failed" not in err and "Traceback" not in err and "WARNING" not in err, err


@pytest.mark.parametrize("argv", [["reshard", "IN", "--out", ""], ["index", "IN", "--out", " "],
                                  ["reshard", "IN", "--out", "OUT", "--scheduler", ""]])
def test_an_empty_path_or_address_is_a_usage_error(argv, capsys):
    """--out "$UNSET" wrote into the working directory; --scheduler "$UNSET" started a local cluster."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "empty (an unset variable?)" in capsys.readouterr().err


def test_cluster_options_with_a_scheduler_are_refused_before_connecting(demo_input, tmp_path, capsys):
    root, ref = demo_input
    argv = ["curate", str(root / "in"), "--out", str(tmp_path / "o"), "--model", f"{ref.name}/{ref.pretrained}",
            "--model-dir", ref.model_dir, "--scheduler", "tcp://127.0.0.1:1", "--workers", "2", "--dashboard", ":0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workers, --dashboard set up a cluster that this run starts; with --scheduler")
    assert "cannot reach" not in err


def test_models_download_while_offline_says_nothing_is_downloaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMGCURATOR_OFFLINE", "1")
    monkeypatch.setenv("IMGCURATOR_HOME", str(tmp_path / "home"))
    assert main(["models", "download", "--model-dir", str(tmp_path / "m"), "--model", "ViT-B-32/openai"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("note: HF_HUB_OFFLINE or IMGCURATOR_OFFLINE is set, so nothing is downloaded")
    assert "error: CLIP model ViT-B-32/openai not found" in err


def test_the_cluster_teardown_after_a_run_keeps_distributed_quiet():
    """A worker slow to exit after a successful run made its nanny log "Worker process still alive
    after 4.0 seconds, killing" under the run's accounting."""
    import io
    import logging

    from dask_imgcurator.cli import _quiet_teardown

    names = ("distributed", "distributed.nanny", "tornado.application", "asyncio")
    levels = {name: logging.getLogger(name).level for name in names}
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    nanny = logging.getLogger("distributed.nanny")
    nanny.addHandler(handler)
    try:
        for name in names:  # as distributed sets them (an earlier test may have stopped a run)
            logging.getLogger(name).setLevel(logging.INFO if name == "distributed" else logging.NOTSET)
        nanny.warning("before: shown")
        assert _quiet_teardown(None, None, None, None) is False  # a run that succeeded: nothing to swallow
        nanny.warning("Worker process still alive after 4.0 seconds, killing")
    finally:
        nanny.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert out.getvalue() == "before: shown\n"


def test_missing_weights_offline_explain_how_to_get_them(demo_input, tmp_path, capsys, monkeypatch):
    root, _ = demo_input
    monkeypatch.setenv("IMGCURATOR_HOME", str(tmp_path / "home"))
    argv = ["curate", str(root / "in"), "--out", str(tmp_path / "o"), "--model", "ViT-B-32/openai",
            "--model-dir", str(tmp_path / "empty"), "--offline", "--workers", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "imgcurator models download --model-dir DIR --model ViT-B-32/openai`" in err and "Traceback" not in err
    assert "dask dashboard" not in err  # refused before any cluster started


def test_demo_runs_offline_and_says_scores_are_random(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--shards", "2", "--samples", "8"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out
    summary = json.loads((tmp_path / "demo" / "curated" / "summary.json").read_text())
    assert summary["samples_in"] == 18 and summary["balanced"]
    assert summary["failed"] == {"decode or model error": 1, "no image": 1} or sum(summary["failed"].values()) == 2


def test_the_same_demo_again_uses_its_input_and_resumes(tmp_path, capsys):
    """Regenerated input shards would have new modification times: another run, refused."""
    demo = tmp_path / "demo"
    argv = ["demo", "--out", str(demo), "--shards", "1", "--samples", "3", "--workers", "1"]
    assert main(argv) == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (demo / "input").glob("*.tar")}
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "using the demo shards already in" in out and "resumed: 1 metadata part" in out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (demo / "input").glob("*.tar")} == before


def test_a_demo_of_other_sizes_refuses_before_touching_the_earlier_demo(tmp_path, capsys):
    demo = tmp_path / "demo"
    assert main(["demo", "--out", str(demo), "--shards", "2", "--samples", "4"]) == 0
    before = {p.name: p.read_bytes() for p in (demo / "input").glob("*.tar")}
    capsys.readouterr()
    assert main(["demo", "--out", str(demo), "--shards", "1", "--samples", "5"]) == 2
    assert "holds a demo of 2 shards x 4 samples; pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (demo / "input").glob("*.tar")} == before
    # replaced with --overwrite: the second, stale shard is neither kept nor read
    assert main(["demo", "--out", str(demo), "--shards", "1", "--samples", "5", "--overwrite"]) == 0
    assert sorted(p.name for p in (demo / "input").glob("*.tar")) == ["demo-00000.tar"]
    assert json.loads((demo / "curated" / "summary.json").read_text())["samples_in"] == 5 + 2


def test_replacing_a_demo_whose_folder_has_glob_characters_touches_no_other_demo(tmp_path, capsys):
    """``--out 'd?'`` names one folder: replacing its input must not delete ``dA``'s shards."""
    assert main(["demo", "--out", str(tmp_path / "dA"), "--shards", "1", "--samples", "3"]) == 0
    assert main(["demo", "--out", str(tmp_path / "d?"), "--shards", "1", "--samples", "3"]) == 0
    assert main(["demo", "--out", str(tmp_path / "d?"), "--shards", "1", "--samples", "4", "--overwrite"]) == 0
    assert (tmp_path / "dA" / "input" / "demo-00000.tar").exists()
    assert json.loads((tmp_path / "d?" / "curated" / "summary.json").read_text())["samples_in"] == 4 + 2
    assert main(["report", str(tmp_path / "d?" / "curated")]) == 0


def test_a_malformed_cluster_config_is_one_line(demo_input, tmp_path, capsys):
    root, ref = demo_input
    bad = tmp_path / "bad.yaml"
    bad.write_text("imgcurator:\n  local: [unclosed\n")
    argv = ["curate", str(root / "in"), "--out", str(tmp_path / "o"), "--model", f"{ref.name}/{ref.pretrained}",
            "--model-dir", ref.model_dir, "--offline", "--cluster-config", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: not valid YAML" in err and "Traceback" not in err


def test_an_unreachable_scheduler_is_one_line(demo_input, capsys):
    root, _ = demo_input
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main(["inspect", str(root / "in"), "--scheduler", "tcp://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot reach the dask scheduler at tcp://127.0.0.1:1" in err and "Traceback" not in err


def test_models_without_an_action_shows_its_own_usage(capsys):
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert "usage: imgcurator models" in err and "download" in err


def test_models_list_shows_the_tiny_model(demo_input, capsys):
    root, ref = demo_input
    assert main(["models", "list", "--model-dir", ref.model_dir]) == 0
    out = capsys.readouterr().out
    assert ref.head_family in out and "ViT-L-14/openai" in out
    clip_lines = [line.split() for line in out.splitlines() if line.startswith("clip ") and ref.model_dir in line]
    assert [fields[1] for fields in clip_lines] == [str(ref)]
    # what the list prints is what --model takes
    from dask_imgcurator.models.clip import clip_dir

    printed = ClipRef.parse(clip_lines[0][1], model_dir=ref.model_dir, offline=True)
    assert clip_dir(printed) == clip_dir(ref)


def curate_twice(root, ref, tmp_path, first: list[str], second: list[str]):
    """The same curate job with two sets of cluster options; metadata of both, by key."""
    base = ["curate", str(root / "in"), "--model", f"{ref.name}/{ref.pretrained}", "--model-dir", ref.model_dir,
            "--offline", "--samples-per-shard", "7"]
    metas = []
    for name, extra in (("a", first), ("b", second)):
        assert main([*base, "--out", str(tmp_path / name), *extra]) == 0
        metas.append(ic.read_parquet(str(tmp_path / name / "metadata")).compute().set_index("key"))
    return metas


@pytest.mark.gpu
def test_curate_on_the_cuda_cluster_matches_the_cpu_cluster(demo_input, tmp_path, capsys):
    """`--cluster cuda` (dask-cuda, DALI `mixed`, the model on the GPU) against one CPU worker."""
    pytest.importorskip("dask_cuda")
    root, ref = demo_input
    cpu, gpu = curate_twice(root, ref, tmp_path, ["--cluster", "local", "--workers", "1"], ["--cluster", "cuda"])
    assert gpu.index.tolist() == cpu.index.tolist() and len(cpu) == 20
    assert gpu["error"].isna().tolist() == cpu["error"].isna().tolist()
    ok = cpu["error"].isna()
    cosine = (np.stack(cpu.loc[ok, "embedding"].to_numpy()) * np.stack(gpu.loc[ok, "embedding"].to_numpy())).sum(axis=1)
    assert cosine.min() >= 0.99
    assert gpu["kept"].tolist() == cpu["kept"].tolist()  # no filter: every readable sample
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("a", "b")]
    assert summaries[0]["samples_in"] == summaries[1]["samples_in"] == 20 and summaries[1]["balanced"]


@pytest.mark.parametrize("option", ["--batch-size", "--workers", "--torch-threads", "--samples-per-shard"])
def test_counts_of_zero_are_usage_errors_not_defaults(option, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["curate", "IN", "--out", "OUT", option, "0"])
    assert stop.value.code == 2
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


def test_an_interrupt_caught_inside_extension_run_code_still_exits_130(tmp_path):
    """The stop-while-starting test above failed now and then with the process killed by SIGINT: a
    bare KeyboardInterrupt raised while a C extension ran code as a string (optree imports modules so)
    makes Python 3.11 exit by SIGINT even though the CLI caught it. Its handlers raise a subclass."""
    import subprocess
    import sys

    script = tmp_path / "stop_in_run_string.py"
    script.write_text(
        "import ctypes, signal, sys\n"
        "from dask_imgcurator import cli\n"
        "run = ctypes.pythonapi.PyRun_String\n"
        "run.restype, run.argtypes = ctypes.py_object, [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]\n"
        "def work(args):\n"
        "    g = {'signal': signal, '__builtins__': __builtins__}\n"
        "    run(b'signal.raise_signal(signal.SIGTERM)', 257, g, g)\n"
        "from types import SimpleNamespace as NS\n"
        "cli.build_parser = lambda: NS(parse_args=lambda argv: NS(run=work))  # a command that does only work()\n"
        "sys.exit(cli.main([]))\n"
    )
    proc = subprocess.run([sys.executable, "-m", script.stem], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted: completed work is kept" in proc.stderr


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C"])
def test_a_stop_while_the_local_cluster_starts_is_clean(tmp_path, stop):
    """SIGTERM (or Ctrl-C) during the cluster's start left a half-built cluster to distributed's exit
    handler, which printed a traceback; the stop now waits for the start and ends like any other.
    Ctrl-C reaches the terminal's whole process group: the worker processes being started printed
    KeyboardInterrupt tracebacks from their imports, and the run exited 1."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "dask_imgcurator.cli", "demo", "--out", str(tmp_path / "demo")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own process group, as a command in a terminal has
    )
    for line in proc.stdout:
        if line.startswith("curating with filter"):  # the cluster starts right after this line
            break
    time.sleep(0.3 if stop == "SIGTERM" else 1.0)  # Ctrl-C: while the worker processes import
    if stop == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: completed work is kept" in err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_each_filter_must_be_complete_on_its_own(demo_input, tmp_path, capsys):
    """Two --filter options joined as '(a) and (b)' let 'x) or (y' rewrite the conjunction."""
    root, ref = demo_input
    argv = ["curate", str(root / "in"), "--out", str(tmp_path / "o"), "--model", f"{ref.name}/{ref.pretrained}",
            "--model-dir", ref.model_dir, "--offline",
            "--filter", "aesthetic_score < 5.078) or (aesthetic_score > 5.085", "--filter", "nsfw_score < 0.5095"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "invalid filter" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_an_output_dir_it_cannot_use_is_refused_before_a_cluster_starts(demo_input, tmp_path, capsys):
    root, ref = demo_input
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["curate", str(root / "in"), "--out", str(out), "--model", f"{ref.name}/{ref.pretrained}",
            "--model-dir", ref.model_dir, "--offline", "--workers", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds files that this tool did not write (notes.txt)" in err
    assert "dask dashboard" not in err  # printed once a cluster is up
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_fp16_without_a_gpu_is_refused_before_a_cluster_starts(demo_input, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root, ref = demo_input
    argv = ["curate", str(root / "in"), "--out", str(tmp_path / "o"), "--model", f"{ref.name}/{ref.pretrained}",
            "--model-dir", ref.model_dir, "--offline", "--precision", "fp16"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--precision fp16 needs a GPU" in err and "dask dashboard" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_future_cut_off_in_its_init_by_the_interrupt_is_not_reported(monkeypatch):
    """A signal inside distributed's Future.__init__ left a future whose __del__ printed a traceback
    after the CLI's 'interrupted' line (seen in CI with SIGTERM); other unraisable errors still show."""
    import gc
    import sys

    import distributed

    from dask_imgcurator import cli

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    cli._ignore_half_made_futures()
    half_made = distributed.Future.__new__(distributed.Future)  # as if __init__ was interrupted
    del half_made
    gc.collect()
    assert reported == []

    class Broken:
        def __del__(self):
            raise AttributeError("not a future")

    broken = Broken()
    del broken
    gc.collect()
    assert [str(r.exc_value) for r in reported] == ["not a future"]


def test_models_list_says_when_the_model_dir_does_not_exist(tmp_path, capsys):
    assert main(["models", "list", "--model-dir", str(tmp_path / "nope")]) == 0
    captured = capsys.readouterr()
    assert f"--model-dir {tmp_path / 'nope'} does not exist" in captured.err
    assert "beside --model" not in captured.out
