from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from dask_imgcurator.models import ClipRef, WeightsNotFoundError, download_models, list_models, store
from dask_imgcurator.models.clip import clip_dir
from dask_imgcurator.models.manage import model_text

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
