from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from dask_imgcurator.decode.base import OPENAI_MEAN, OPENAI_STD, PreprocessSpec
from dask_imgcurator.models import (
    ClipRef,
    DamagedWeightsError,
    UnsafeWeightsError,
    WeightsNotFoundError,
    load_clip,
    make_tiny_model_dir,
)
from dask_imgcurator.models.onednn import PackedLinear
from dask_imgcurator.models.clip import clip_dir, clip_info, model_cfg, open_clip_kwargs

from .conftest import Payload


def _pixels(n: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _activations(module: torch.nn.Module) -> set[type]:
    """Activation types in ``module``; a GELU fused into a oneDNN linear layer counts as GELU."""
    found = {type(m) for m in module.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}
    fused = any(isinstance(m, PackedLinear) and m.activation == "gelu" for m in module.modules())
    return found | ({torch.nn.GELU} if fused else set())


def test_tiny_round_trip_is_deterministic_and_normalised(tmp_path: Path) -> None:
    a = make_tiny_model_dir(tmp_path / "a", seed=3).load()
    b = make_tiny_model_dir(tmp_path / "b", seed=3).load()
    other = make_tiny_model_dir(tmp_path / "c", seed=4).load()
    x = _pixels()
    ea, eb = a.encode(x), b.encode(x)
    assert ea.dtype == torch.float32 and ea.shape == (4, 32)
    torch.testing.assert_close(ea.norm(dim=1), torch.ones(4))
    assert torch.equal(ea, eb)
    assert not torch.allclose(ea, other.encode(x))
    assert a.embed_dim == 32 and a.device == torch.device("cpu") and a.precision == "fp32"
    assert a.preprocess == PreprocessSpec(size=32, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic")
    sims = ea @ ea.T
    assert sims[~torch.eye(4, dtype=torch.bool)].max() < 0.95  # different images, different embeddings


def test_tiny_loads_through_model_dir_lookup_only(tiny: ClipRef) -> None:
    assert tiny.kind == "tag" and tiny.offline
    assert clip_dir(tiny) == Path(tiny.model_dir) / "clip" / tiny.slug
    assert tiny.info() == tiny.load().info


def test_local_dir_and_plain_path_forms_load_the_same_weights(tiny: ClipRef) -> None:
    folder = Path(tiny.model_dir) / "clip" / tiny.slug
    x = _pixels()
    expected = tiny.load().encode(x)
    for text in (f"local-dir:{folder}", str(folder)):
        torch.testing.assert_close(ClipRef.parse(text).load().encode(x), expected)


def test_saved_dir_is_open_clip_local_dir_format(tiny: ClipRef) -> None:
    folder = Path(tiny.model_dir) / "clip" / tiny.slug
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    x = _pixels()
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    torch.testing.assert_close(tiny.load().encode(x), direct)
    assert json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["quick_gelu"] is True


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_tiny_activation_is_configurable(tmp_path: Path, quick_gelu: bool) -> None:
    ref = make_tiny_model_dir(tmp_path, quick_gelu=quick_gelu)
    loaded = ref.load()
    assert _activations(loaded._forward) == ({QuickGELU} if quick_gelu else {torch.nn.GELU})


def test_vit_l_14_openai_is_built_with_quick_gelu() -> None:
    ref = ClipRef.parse("ViT-L-14/openai")
    kwargs = open_clip_kwargs(ref)
    assert kwargs == {"model_name": "ViT-L-14", "pretrained": "openai", "force_quick_gelu": True}
    assert model_cfg(ref)["quick_gelu"] is True  # what a download saves into the model dir
    with torch.device("meta"):
        model = open_clip.create_model("ViT-L-14", force_quick_gelu=kwargs["force_quick_gelu"], device="meta")
    assert _activations(model.visual) == {QuickGELU}
    assert open_clip_kwargs(ClipRef("ViT-L-14", "laion2b_s32b_b82k"))["force_quick_gelu"] is False


def test_vit_l_14_info_needs_no_download() -> None:
    info = clip_info(ClipRef())
    assert info.embed_dim == 768
    assert info.preprocess == PreprocessSpec(size=224, interpolation="bicubic")


def test_download_goes_through_open_clip_and_saves_a_local_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = []
    source = make_tiny_model_dir(tmp_path / "src")
    tiny_model = open_clip.create_model(f"local-dir:{clip_dir(source)}")

    def fake_create_model(**kwargs):
        calls.append(kwargs)
        return tiny_model

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    ref = ClipRef(cache_dir=str(tmp_path / "cache"), offline=False)
    folder = clip_dir(ref)
    assert folder == tmp_path / "cache" / "clip" / "ViT-L-14-openai"
    assert calls[0]["force_quick_gelu"] is True and calls[0]["require_pretrained"] is True
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"]["quick_gelu"] is True
    assert (folder / "open_clip_model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == ["ViT-L-14-openai"]  # no temp leftovers


def test_offline_error_says_where_it_looked_and_how_to_prepare(tmp_path: Path) -> None:
    ref = ClipRef(model_dir=str(tmp_path / "models"))
    with pytest.raises(WeightsNotFoundError) as err:
        load_clip(ref)
    text = str(err.value)
    assert "CLIP model ViT-L-14/openai not found" in text
    assert str(tmp_path / "models" / "clip" / "ViT-L-14-openai") in text
    assert "HF_HUB_OFFLINE" in text
    assert "imgcurator models download --model-dir DIR --model ViT-L-14/openai`" in text


def test_a_missing_local_folder_gets_no_download_hint(tmp_path: Path) -> None:
    """Downloading cannot bring a folder of one's own: the error says what the folder needs."""
    with pytest.raises(WeightsNotFoundError) as err:
        load_clip(ClipRef.parse(f"local-dir:{tmp_path / 'mine'}"))
    assert "A model folder needs open_clip_config.json and open_clip_model.safetensors." in str(err.value)
    assert "models download" not in str(err.value)


def test_failed_download_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(**kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(open_clip, "create_model", broken)
    with pytest.raises(WeightsNotFoundError, match="Download failed: RuntimeError"):
        clip_dir(ClipRef(cache_dir=str(tmp_path), offline=False))


def test_a_failed_download_leaves_the_root_logger_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """open_clip logs the failure with logging.error, which set up the root logger where nothing had
    and printed "ERROR:root:..." before the error that says the same."""
    import logging

    def broken(**kwargs):
        logging.error("Failed to download weights for tag 'openai'")
        raise RuntimeError("Failed to download weights for tag 'openai'")

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a plain script; pytest's capture handlers set aside
    monkeypatch.setattr(open_clip, "create_model", broken)
    with pytest.raises(WeightsNotFoundError, match="Download failed: RuntimeError"):
        clip_dir(ClipRef(cache_dir=str(tmp_path), offline=False))
    assert root.handlers == []


def test_bf16_on_cpu_matches_fp32(tiny: ClipRef) -> None:
    x = _pixels(8)
    fp32 = tiny.load(precision="fp32").encode(x)
    bf16 = tiny.load(precision="bf16")
    out = bf16.encode(x)
    assert out.dtype == torch.float32
    assert next(bf16._forward.parameters()).dtype == torch.bfloat16
    assert (fp32 * out).sum(dim=1).min() >= 0.99


def test_precision_errors(tiny: ClipRef) -> None:
    with pytest.raises(ValueError, match="needs a GPU"):
        tiny.load(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        tiny.load(precision="int8")


def test_encode_checks_input_shape(tiny: ClipRef) -> None:
    model = tiny.load()
    with pytest.raises(ValueError, match=r"expects pixels of shape \(N, 3, 32, 32\)"):
        model.encode(torch.zeros(2, 3, 64, 64))
    assert model.encode(torch.zeros(0, 3, 32, 32)).shape == (0, 32)


def _register_tiny_architecture(monkeypatch: pytest.MonkeyPatch, tiny: ClipRef) -> str:
    cfg = json.loads((clip_dir(tiny) / "open_clip_config.json").read_text())["model_cfg"]
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "imgcurator-tiny-arch", cfg)
    return "imgcurator-tiny-arch"


def test_checkpoint_file_loads(monkeypatch: pytest.MonkeyPatch, tiny: ClipRef, tmp_path: Path) -> None:
    name = _register_tiny_architecture(monkeypatch, tiny)
    folder = clip_dir(tiny)
    state = open_clip.create_model(f"local-dir:{folder}").state_dict()
    torch.save(state, tmp_path / "ckpt.pt")
    ref = ClipRef.parse(str(tmp_path / "ckpt.pt"), name=name)
    x = _pixels()
    torch.testing.assert_close(ref.load().encode(x), tiny.load().encode(x))


def test_a_checkpoint_of_another_architecture_says_how_to_name_it(
    monkeypatch: pytest.MonkeyPatch, tiny: ClipRef, tmp_path: Path
) -> None:
    """A bare checkpoint path means ViT-L-14: another architecture's weights gave torch's page-long
    list of keys (or open_clip's bare AssertionError); now one line that says to write ARCH/PATH."""
    name = _register_tiny_architecture(monkeypatch, tiny)
    state = open_clip.create_model(f"local-dir:{clip_dir(tiny)}").state_dict()
    torch.save(state, tmp_path / "ckpt.pt")
    path = tmp_path / "ckpt.pt"
    with pytest.raises(ValueError, match="does not fit the ViT-L-14 architecture") as caught:
        ClipRef.parse(str(path)).load()
    assert str(caught.value).endswith(f"as ARCH/PATH (a bare path means ViT-L-14), e.g. --model ViT-B-32/{path}")
    assert ClipRef.parse(f"{name}/{path}").pretrained == str(path)  # the form the message gives
    del state["visual.proj"]
    state["visual.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=rf"does not fit the {name} architecture \(1 missing keys, 1 unexpected keys\)"):
        ClipRef.parse(f"{name}/{path}").load()


@pytest.mark.parametrize("form", ["zip", "legacy", "wrapped", "safetensors"])
def test_a_checkpoint_is_checked_against_its_architecture_from_shapes_alone(
    monkeypatch: pytest.MonkeyPatch, tiny: ClipRef, tmp_path: Path, form: str
) -> None:
    """check_weights refuses another architecture's checkpoint before any cluster starts (the load
    would, in the first worker task), reading no tensor data; a fitting one passes in every form."""
    from safetensors.torch import save_file

    from dask_imgcurator.models.clip import check_checkpoint_fits

    name = _register_tiny_architecture(monkeypatch, tiny)
    state = open_clip.create_model(f"local-dir:{clip_dir(tiny)}").state_dict()
    path = tmp_path / ("ckpt.safetensors" if form == "safetensors" else "ckpt.pt")
    if form == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif form == "wrapped":  # as a training script saves it: {"state_dict": {"module.visual...": ...}}
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=form == "zip")
    check_checkpoint_fits(ClipRef.parse(f"{name}/{path}"))  # fits
    with pytest.raises(ValueError, match=r"does not fit the ViT-L-14 architecture \(\d+ tensors of other shapes"):
        check_checkpoint_fits(ClipRef.parse(str(path)))
    check_checkpoint_fits(ClipRef.parse(f"local-dir:{clip_dir(tiny)}"))  # other kinds: nothing to do


def test_an_unreadable_checkpoint_is_left_to_the_load_which_names_it(tiny: ClipRef, tmp_path: Path) -> None:
    from dask_imgcurator.models.clip import check_checkpoint_fits

    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    check_checkpoint_fits(ClipRef.parse(str(tmp_path / "ckpt.pt")))
    with pytest.raises(WeightsNotFoundError, match="ckpt.pt"):
        ClipRef.parse(str(tmp_path / "ckpt.pt")).load()


def test_malicious_checkpoint_is_refused(
    monkeypatch: pytest.MonkeyPatch, tiny: ClipRef, tmp_path: Path
) -> None:
    name = _register_tiny_architecture(monkeypatch, tiny)
    marker = tmp_path / "pwned"
    torch.save({"visual.proj": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeWeightsError, match="refusing to load"):
        ClipRef.parse(str(tmp_path / "evil.pt"), name=name).load()
    assert not marker.exists()


def test_damaged_clip_files_are_named(tiny: ClipRef) -> None:
    weights = clip_dir(tiny) / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(DamagedWeightsError, match=rf"{weights}.*damaged.*download it again"):
        tiny.load()
    config = clip_dir(tiny) / "open_clip_config.json"
    config.write_text(config.read_text()[:50])
    for call in (tiny.load, tiny.info):
        with pytest.raises(DamagedWeightsError, match=rf"{config}.*not valid JSON"):
            call()


def test_a_model_folder_whose_weights_do_not_fit_its_config_is_named(tiny: ClipRef) -> None:
    """One line naming the file (it was torch's list of hundreds of keys, as a traceback from the CLI)."""
    from safetensors.torch import save_file

    weights = clip_dir(tiny) / "open_clip_model.safetensors"
    save_file({"foo": torch.zeros(3)}, str(weights))
    with pytest.raises(DamagedWeightsError) as err:
        tiny.load()
    assert str(err.value).startswith(f"{weights} is damaged")
    assert "its tensors do not fit open_clip_config.json beside it (" in str(err.value) and "\n" not in str(err.value)


def test_out_of_memory_while_building_the_model_is_not_called_damage(monkeypatch: pytest.MonkeyPatch,
                                                                      tiny: ClipRef) -> None:
    import open_clip

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1216888832 bytes")

    monkeypatch.setattr(open_clip, "create_model", out_of_memory)
    with pytest.raises(RuntimeError, match="can't allocate memory") as err:
        tiny.load()
    assert not isinstance(err.value, DamagedWeightsError)


def test_damaged_checkpoint_file_is_named(monkeypatch: pytest.MonkeyPatch, tiny: ClipRef, tmp_path: Path) -> None:
    name = _register_tiny_architecture(monkeypatch, tiny)
    for data in (b"", b"<html>404 Not Found</html>"):
        (tmp_path / "ckpt.pt").write_bytes(data)
        with pytest.raises(DamagedWeightsError, match=r"ckpt\.pt is damaged"):
            ClipRef.parse(str(tmp_path / "ckpt.pt"), name=name).load()


def test_weights_saved_over_at_the_same_path_are_another_model(tiny: ClipRef, tmp_path: Path) -> None:
    """A fine-tuned model saved over the old one: another run, and no stale encoder from the cache."""
    import os

    import dask_imgcurator as ic
    from dask.base import tokenize
    from safetensors.torch import load_file, save_file

    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=2)
    ddf = ic.read_webdataset(str(tmp_path / "in"))
    before = tokenize(ic.embed(ddf, tiny))
    x = torch.randn(2, 3, tiny.info().preprocess.size, tiny.info().preprocess.size)
    old = tiny.load().encode(x)
    weights = clip_dir(tiny) / "open_clip_model.safetensors"
    state = load_file(str(weights))
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}, str(weights))
    stamp = weights.stat().st_mtime + 5
    os.utime(weights, (stamp, stamp))
    assert tokenize(ic.embed(ddf, tiny)) != before
    assert not torch.allclose(tiny.load().encode(x), old)  # the same ref loads the new weights
    head = clip_dir(tiny).parent.parent / "heads" / "aesthetic" / f"{tiny.slug}.safetensors"
    middle = tokenize(ic.embed(ddf, tiny))
    os.utime(head, (stamp + 5, stamp + 5))
    assert tokenize(ic.embed(ddf, tiny)) != middle  # a head's weights count too
