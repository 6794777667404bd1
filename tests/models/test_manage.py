from __future__ import annotations

import shutil
from pathlib import Path

import open_clip
import pytest
import torch

from dask_imgcurator.models import (
    ClipRef,
    WeightsNotFoundError,
    download_models,
    list_models,
    make_tiny_model_dir,
    store,
)
from dask_imgcurator.models.clip import clip_dir
from dask_imgcurator.models.manage import check_weights, model_text

from .test_heads import _original_aesthetic_state


def test_download_models_fills_a_model_dir_with_the_cache_layout(
    monkeypatch: pytest.MonkeyPatch, tiny: ClipRef, tmp_path: Path
) -> None:
    tiny_model = open_clip.create_model(f"local-dir:{clip_dir(tiny)}")
    monkeypatch.setattr(open_clip, "create_model", lambda **kwargs: tiny_model)
    served = tmp_path / "aesthetic.pth"
    torch.save(_original_aesthetic_state(), served)
    key = ("aesthetic", "ViT-L-14-openai")
    entry = store.KNOWN_HEAD_WEIGHTS[key]
    monkeypatch.setitem(
        store.KNOWN_HEAD_WEIGHTS,
        key,
        store.WeightFile(entry.name, entry.stem, (store.Source(url=served.as_uri()),), 768),
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    target = tmp_path / "prepared"
    paths = download_models(target, heads=("aesthetic",))
    assert paths == [target / "clip/ViT-L-14-openai", target / "heads/aesthetic/ViT-L-14-openai.pth"]
    assert {p.name for p in paths[0].iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors"}
    rows = {row.name: row for row in list_models(target)}
    assert rows["ViT-L-14-openai"].location == str(paths[0]) and rows["ViT-L-14-openai"].embed_dim == 768
    assert rows["aesthetic/ViT-L-14-openai"].location == str(paths[1])
    assert rows["nsfw/ViT-L-14-openai"].location is None
    assert "CLIP-based-NSFW-Detector" in rows["nsfw/ViT-L-14-openai"].source


def test_download_models_offline_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="Downloads are disabled"):
        download_models(tmp_path)


def test_download_models_rejects_local_models(tiny: ClipRef, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already local"):
        download_models(tmp_path, clip=f"local-dir:{clip_dir(tiny)}")


def test_list_models_shows_tiny_models(tiny: ClipRef) -> None:
    rows = {row.name: row for row in list_models(tiny.model_dir)}
    clip_row = rows[tiny.slug]
    assert (clip_row.kind, clip_row.embed_dim, clip_row.source) == ("clip", 32, "local only")
    assert clip_row.model == str(tiny) == "imgcurator-tiny/d32-px32-seed0-quickgelu"
    assert rows["ViT-L-14-openai"].model == "ViT-L-14/openai"
    for head in ("aesthetic", "nsfw"):
        row = rows[f"{head}/{tiny.slug}"]
        assert row.kind == "head" and row.embed_dim == 32 and row.location.endswith(".safetensors")
    assert rows["ViT-L-14-openai"].location is None


@pytest.mark.parametrize(
    "text",
    ["ViT-L-14/openai", "ViT-B-32-quickgelu/openai", "ViT-B-32/random", "imgcurator-tiny/d32-px32-seed0",
     "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"],
)
def test_model_text_inverts_the_slug(text: str, tmp_path: Path) -> None:
    slug = ClipRef.parse(text).slug
    assert model_text(tmp_path / "clip" / slug) == text


def test_model_text_falls_back_to_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "clip" / "my-finetune"
    assert model_text(folder) == f"local-dir:{folder}"
    assert ClipRef.parse(model_text(folder)).kind == "local-dir"


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads allowed; the conftest still fails any network access, so nothing may download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


@pytest.mark.parametrize("offline", [False, True])
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ViT-B-32/nonexistent", r"open_clip has no pretrained tag 'nonexistent' for ViT-B-32 \(its tags: openai, "),
        ("ViT-B-33/openai", r"unknown open_clip architecture 'ViT-B-33' \(near: ViT-B-32"),
        ("demo/models/clip/typo", r"architecture 'demo' .*'demo/models/clip/typo' is not an existing path"),
    ],
)
def test_check_weights_refuses_what_open_clip_does_not_know(text: str, message: str, offline: bool, online) -> None:
    with pytest.raises(ValueError, match=message) as err:
        check_weights(ClipRef.parse(text, offline=offline), ["aesthetic", "nsfw"])
    assert "\n" not in str(err.value)


def test_unknown_tags_fail_on_workers_too_without_a_download(tmp_path: Path, online) -> None:
    ref = ClipRef.parse("ViT-B-32/nonexistent", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no pretrained tag 'nonexistent'"):
        clip_dir(ref)
    with pytest.raises(ValueError, match="no pretrained tag 'nonexistent'"):
        ref.info()


def test_check_weights_online_refuses_heads_without_a_source(online, tmp_path: Path) -> None:
    ref = ClipRef.parse("ViT-B-32/openai", model_dir=str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="(?s)aesthetic head for ViT-B-32-openai.*No download source"):
        check_weights(ref, ["aesthetic", "nsfw"])
    with pytest.raises(WeightsNotFoundError, match="nsfw head for ViT-B-32-openai"):
        check_weights(ref, ["nsfw"])
    check_weights(ref, ["my-custom-head"])  # custom heads are built by their own factories, on the workers


def test_check_weights_online_accepts_downloadable_models_without_downloading(online) -> None:
    check_weights(ClipRef.parse("ViT-L-14/openai"), ["aesthetic", "nsfw"])
    check_weights(ClipRef.parse("ViT-B-32/LAION2B-S34B-B79K"), [])  # open_clip's own tag spelling rules
    check_weights(ClipRef.parse("hf-hub:org/repo"), [])


@pytest.mark.parametrize("offline", [False, True])
def test_check_weights_accepts_local_models_open_clip_does_not_list(
    tiny: ClipRef, offline: bool, online, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model, a local ``random`` tag (as the benchmarks make), a local dir and a checkpoint
    (of its own architecture; as a ViT-B-32 checkpoint it is refused from its shapes)."""
    import json

    store_kw = {"model_dir": tiny.model_dir, "offline": offline}
    check_weights(ClipRef(tiny.name, tiny.pretrained, **store_kw), ["aesthetic", "nsfw"])
    random_dir = Path(tiny.model_dir) / "clip" / "ViT-B-32-random"
    shutil.copytree(clip_dir(tiny), random_dir)
    check_weights(ClipRef.parse("ViT-B-32/random", **store_kw), [])
    check_weights(ClipRef.parse(str(random_dir), offline=offline), [])
    checkpoint = random_dir / "open_clip_model.safetensors"
    cfg = json.loads((random_dir / "open_clip_config.json").read_text())["model_cfg"]
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "imgcurator-tiny-arch", cfg)
    check_weights(ClipRef.parse(f"imgcurator-tiny-arch/{checkpoint}", offline=offline), [])
    with pytest.raises(ValueError, match="does not fit the ViT-B-32 architecture"):
        check_weights(ClipRef.parse(f"ViT-B-32/{checkpoint}", offline=offline), [])


@pytest.mark.parametrize("offline", [False, True])
def test_check_weights_refuses_missing_local_files(tmp_path: Path, offline: bool, online) -> None:
    with pytest.raises(WeightsNotFoundError, match="CLIP model local-dir:"):
        check_weights(ClipRef.parse(str(tmp_path / "no-model"), offline=offline), [])
    with pytest.raises(WeightsNotFoundError, match="checkpoint file .*no.pt for ViT-B-32 does not exist"):
        check_weights(ClipRef.parse(f"ViT-B-32/{tmp_path}/no.pt", offline=offline), [])


def test_check_weights_offline_refuses_missing_downloads(tmp_path: Path) -> None:
    ref = ClipRef.parse("ViT-L-14/openai", model_dir=str(tmp_path), offline=True)
    with pytest.raises(WeightsNotFoundError, match="Downloads are disabled"):
        check_weights(ref, [])


def test_list_models_marks_a_damaged_folder_and_lists_the_rest(tiny: ClipRef, tmp_path: Path) -> None:
    other = make_tiny_model_dir(tiny.model_dir, embed_dim=48, seed=1)
    config = Path(tiny.model_dir) / "clip" / tiny.slug / "open_clip_config.json"
    config.write_text(config.read_text()[:40])
    rows = {row.name: row for row in list_models(tiny.model_dir)}
    damaged = rows[tiny.slug]
    assert damaged.embed_dim is None and "DAMAGED" in damaged.location
    assert str(config) in damaged.problem and "not valid JSON" in damaged.problem
    assert rows[other.slug].embed_dim == 48 and rows[other.slug].problem is None
    assert rows[f"aesthetic/{other.slug}"].embed_dim == 48
