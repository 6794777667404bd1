from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from dask_imgcurator.models import (
    ClipRef,
    DamagedWeightsError,
    UnsafeWeightsError,
    WeightsNotFoundError,
    WeightsVerificationError,
    load_head,
    store,
)
from dask_imgcurator.models.store import (
    Source,
    WeightFile,
    default_cache_dir,
    is_offline,
    load_state_dict,
    resolve,
)

from .conftest import NetworkUsed, Payload
from .test_heads import _original_aesthetic_state, _original_nsfw_state


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_dir_and_offline_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("IMGCURATOR_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    assert is_offline() and not is_offline(False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not is_offline()
    monkeypatch.setenv("IMGCURATOR_OFFLINE", "true")
    assert is_offline()


def test_model_dir_is_searched_before_the_cache(tmp_path: Path) -> None:
    entry = WeightFile("w", "heads/x/m")
    for root, suffix in ((tmp_path / "dir", ".pth"), (tmp_path / "cache", ".safetensors")):
        (root / "heads" / "x").mkdir(parents=True)
        (root / "heads" / "x" / f"m{suffix}").write_bytes(b"")
    assert resolve(entry, tmp_path / "dir", tmp_path / "cache") == tmp_path / "dir" / "heads/x/m.pth"
    assert resolve(entry, None, tmp_path / "cache") == tmp_path / "cache" / "heads/x/m.safetensors"


def test_download_from_url_is_verified_and_stored_in_the_cache(tmp_path: Path) -> None:
    served = tmp_path / "served.pth"
    torch.save(_original_aesthetic_state(), served)
    source = Source(url=served.as_uri(), size=served.stat().st_size, sha256=_sha256(served))
    entry = WeightFile("aesthetic test", "heads/aesthetic/ViT-L-14-openai", (source,))
    path = resolve(entry, offline=False)
    assert path == default_cache_dir() / "heads/aesthetic/ViT-L-14-openai.pth"
    assert path.read_bytes() == served.read_bytes()
    assert resolve(entry) == path  # found locally now, even offline


@pytest.mark.parametrize("bad", [{"size": 12}, {"sha256": "0" * 64}])
def test_bad_download_is_rejected_and_not_stored(tmp_path: Path, bad: dict) -> None:
    served = tmp_path / "served.pth"
    served.write_bytes(b"not the weights")
    entry = WeightFile("w", "heads/x/m", (Source(url=served.as_uri(), **bad),))
    with pytest.raises(WeightsVerificationError):
        resolve(entry, cache_dir=tmp_path / "cache", offline=False)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_zip_member_is_extracted(tmp_path: Path) -> None:
    inner = tmp_path / "clip_autokeras_binary_nsfw.pth"
    torch.save(_original_nsfw_state(), inner)
    archive = tmp_path / "nsfw.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(inner, inner.name)
    entry = WeightFile(
        "nsfw", "heads/nsfw/m", (Source(url=archive.as_uri(), member=inner.name, sha256=_sha256(archive)),)
    )
    path = resolve(entry, cache_dir=tmp_path / "cache", offline=False)
    assert path.suffix == ".pth" and path.read_bytes() == inner.read_bytes()


def test_known_heads_download_through_the_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    served = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(_original_aesthetic_state(), served)
    known = store.KNOWN_HEAD_WEIGHTS[("aesthetic", "ViT-L-14-openai")]
    hub, url = known.sources
    assert hub.hf_repo == "ttj/sac-logos-ava1-l14-linearMSE" and url.size == 3_714_759
    local = Source(url=served.as_uri(), size=served.stat().st_size)
    monkeypatch.setitem(
        store.KNOWN_HEAD_WEIGHTS,
        ("aesthetic", "ViT-L-14-openai"),
        WeightFile(known.name, known.stem, (hub, local)),
    )
    # the hub source is refused by the test guard, so the URL is used
    head = load_head("aesthetic", 768, ClipRef().head_family, offline=False)
    assert head(torch.zeros(2, 768)).shape == (2,)
    assert (default_cache_dir() / "heads/aesthetic/ViT-L-14-openai.pth").is_file()


def test_all_sources_failing_reports_each(tmp_path: Path) -> None:
    entry = WeightFile(
        "w",
        "heads/x/m",
        (
            Source(hf_repo="org/repo", hf_filename="m.safetensors"),
            Source(url="https://example.invalid/m.pth"),
        ),
    )
    with pytest.raises(WeightsNotFoundError) as err:
        resolve(entry, cache_dir=tmp_path, offline=False)
    text = str(err.value)
    assert (
        "hf-hub:org/repo/m.safetensors@main: NetworkUsed" in text
        and "https://example.invalid/m.pth: NetworkUsed" in text
    )
    assert NetworkUsed.__name__ in text


def test_offline_never_downloads(tmp_path: Path) -> None:
    entry = WeightFile("w", "heads/x/m", (Source(url=(tmp_path / "x").as_uri()),))
    with pytest.raises(WeightsNotFoundError, match=r"Downloads are disabled \(offline=True\)"):
        resolve(entry, cache_dir=tmp_path, offline=True)


def test_load_state_dict_refuses_pickled_code(tmp_path: Path) -> None:
    marker, control = tmp_path / "pwned", tmp_path / "control"
    torch.save({"w": Payload(marker)}, tmp_path / "evil.pth")
    torch.save({"w": Payload(control)}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)  # the payload is real...
    assert control.exists()
    with pytest.raises(UnsafeWeightsError, match=r"refusing to load .*evil\.pth"):
        load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()  # ...and never runs through the store


def test_load_state_dict_formats(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"a": torch.ones(2)}
    save_file(tensors, tmp_path / "w.safetensors")
    torch.save({"state_dict": tensors, "epoch": 3}, tmp_path / "ckpt.pth")
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    assert torch.equal(load_state_dict(tmp_path / "w.safetensors")["a"], tensors["a"])
    assert torch.equal(load_state_dict(tmp_path / "ckpt.pth")["a"], tensors["a"])
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.pth")


def test_errors_survive_pickling_back_from_workers(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as err:
        resolve(WeightFile("w", "heads/x/m"), cache_dir=tmp_path)
    copy = pickle.loads(pickle.dumps(err.value))
    assert type(copy) is WeightsNotFoundError and str(copy) == str(err.value)


def _damaged_files(tmp_path: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    state = {"w": torch.arange(64, dtype=torch.float32)}
    save_file(state, tmp_path / "good.safetensors")
    torch.save(state, tmp_path / "good.pth")
    files = {
        "truncated.safetensors": (tmp_path / "good.safetensors").read_bytes()[:40],
        "empty.pth": b"",
        "truncated.pth": (tmp_path / "good.pth").read_bytes()[:100],
        "page.pth": b"<html>404 Not Found</html>",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


def test_damaged_weights_name_the_file_and_say_what_to_do(tmp_path: Path) -> None:
    for name, path in _damaged_files(tmp_path).items():
        with pytest.raises(DamagedWeightsError) as err:
            load_state_dict(path)
        message = str(err.value)
        assert str(path) in message and "damaged" in message and "download it again" in message, name
        assert isinstance(err.value, WeightsNotFoundError)  # the CLI prints it as one line
        assert "arbitrary code" not in message
        assert type(pickle.loads(pickle.dumps(err.value))) is DamagedWeightsError
    with pytest.raises(DamagedWeightsError, match="the file is empty"):
        load_state_dict(tmp_path / "empty.pth")
    with pytest.raises(DamagedWeightsError, match="not a PyTorch weights file"):
        load_state_dict(tmp_path / "page.pth")


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 1216888832 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.13 GiB"),
    MemoryError(),
])
def test_running_out_of_memory_while_loading_is_not_called_damage(tmp_path: Path, monkeypatch, failure) -> None:
    """An out-of-memory error must not read 'damaged, delete it': the file is good."""
    torch.save({"w": torch.zeros(4)}, tmp_path / "good.pth")

    def out_of_memory(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(type(failure)) as err:
        load_state_dict(tmp_path / "good.pth")
    assert not isinstance(err.value, DamagedWeightsError)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_refused_pickles_keep_pytorchs_reason(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": Payload(marker)}, tmp_path / "evil.pth")
    (tmp_path / "raw.pth").write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=4))
    with pytest.raises(UnsafeWeightsError, match=r"evil\.pth.*arbitrary code.*said: .*(posix|os)\.system"):
        load_state_dict(tmp_path / "evil.pth")
    with pytest.raises(UnsafeWeightsError, match=r"raw\.pth.*arbitrary code"):
        load_state_dict(tmp_path / "raw.pth")
    assert not marker.exists()


def test_saved_weights_get_the_umask_mode_not_0600(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    from dask_imgcurator.models import make_tiny_model_dir

    def private_fetch(source: Source, tmp: Path) -> Path:  # as hub downloads can leave them
        target = tmp / "download"
        torch.save(_original_aesthetic_state(), target)
        target.chmod(0o600)
        return target

    monkeypatch.setattr(store, "_fetch", private_fetch)
    old = os.umask(0o027)
    try:
        ref = make_tiny_model_dir(tmp_path / "models")
        dest = tmp_path / "cache" / "head.pth"
        store.download(Source(url="https://example.invalid/head.pth"), dest)
    finally:
        os.umask(old)
    weights = sorted((tmp_path / "models").rglob("*.safetensors"))
    assert len(weights) == 3, weights  # CLIP and both heads
    for path in [*weights, dest]:
        assert path.stat().st_mode & 0o777 == 0o640, path
    assert ref.load() is not None


def test_saving_the_same_weights_again_leaves_the_file_and_its_time_alone(tmp_path: Path) -> None:
    """The time is part of a run's identity: the demo's model, made again, must stay the same run."""
    from dask_imgcurator.models import make_tiny_model_dir

    ref = make_tiny_model_dir(tmp_path / "m")
    files = sorted(p for p in (tmp_path / "m").rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    again = make_tiny_model_dir(tmp_path / "m")
    assert again == ref and {p: p.stat().st_mtime_ns for p in files} == before
    assert sorted(p for p in (tmp_path / "m").rglob("*") if p.is_file()) == files  # no temporaries left
    make_tiny_model_dir(tmp_path / "m", seed=1)  # another model: its own files
    assert {p: p.stat().st_mtime_ns for p in files} == before
