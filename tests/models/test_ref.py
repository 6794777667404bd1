from __future__ import annotations

import dataclasses
import os
import pickle

import pytest

from dask_imgcurator.models import ClipRef


@pytest.mark.parametrize(
    ("text", "name", "pretrained", "kind", "slug"),
    [
        ("ViT-L-14/openai", "ViT-L-14", "openai", "tag", "ViT-L-14-openai"),
        ("ViT-B-32", "ViT-B-32", "openai", "tag", "ViT-B-32-openai"),
        ("hf-hub:org/repo", "hf-hub:org/repo", None, "hf-hub", "hf-hub-org--repo"),
        ("local-dir:/m/clip/x", "local-dir:/m/clip/x", None, "local-dir", "x"),
        ("/m/clip/x", "local-dir:/m/clip/x", None, "local-dir", "x"),
        ("/ckpt/my.pt", "ViT-L-14", "/ckpt/my.pt", "file", "ViT-L-14-my"),
        ("ViT-B-16//ckpt/my.safetensors", "ViT-B-16", "/ckpt/my.safetensors", "file", "ViT-B-16-my"),
    ],
)
def test_parse_forms(text: str, name: str, pretrained: str | None, kind: str, slug: str) -> None:
    ref = ClipRef.parse(text, model_dir="/models")
    assert (ref.name, ref.pretrained, ref.kind, ref.slug, ref.model_dir) == (
        name,
        pretrained,
        kind,
        slug,
        "/models",
    )
    assert ClipRef.parse(str(ref), model_dir="/models") == ref


def test_default_is_vit_l_14_openai_and_picklable() -> None:
    ref = ClipRef()
    assert str(ref) == "ViT-L-14/openai"
    assert pickle.loads(pickle.dumps(ref)) == ref
    assert len(pickle.dumps(ref)) < 500


def test_checkpoint_path_takes_architecture_from_kw() -> None:
    assert ClipRef.parse("./w/ckpt.bin", name="ViT-B-32") == ClipRef("ViT-B-32", "./w/ckpt.bin")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ClipRef.parse("imgcurator-nope"), "give a pretrained tag"),
        (lambda: ClipRef("ViT-L-14", None), "no weights given"),
        (lambda: ClipRef("hf-hub:org/repo", "openai"), "pretrained must be None"),
        (lambda: ClipRef("ViT-L-14/openai"), "use ClipRef.parse"),
    ],
)
def test_invalid_refs(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_existing_relative_paths_need_no_dot_slash(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "demo/models/clip/my-model").mkdir(parents=True)
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts/my.pt").touch()
    monkeypatch.chdir(tmp_path)
    folder = ClipRef.parse("demo/models/clip/my-model")
    assert (folder.name, folder.pretrained, folder.kind, folder.slug) == (
        f"local-dir:{tmp_path}/demo/models/clip/my-model", None, "local-dir", "my-model"
    )
    checkpoint = ClipRef.parse("ckpts/my.pt", name="ViT-B-32")
    assert checkpoint == ClipRef("ViT-B-32", "ckpts/my.pt") == ClipRef("ViT-B-32", f"{tmp_path}/ckpts/my.pt")
    # paths that do not exist keep the architecture/tag reading
    assert ClipRef.parse("demo/nothing-here") == ClipRef("demo", "nothing-here")


def test_a_folder_named_like_an_architecture_does_not_shadow_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ViT-B-32").mkdir()
    monkeypatch.chdir(tmp_path)
    assert ClipRef.parse("ViT-B-32") == ClipRef("ViT-B-32", "openai")
    assert ClipRef.parse("./ViT-B-32").kind == "local-dir"


def test_local_paths_are_absolute_so_that_workers_elsewhere_find_them(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker of a cluster started in another directory gets the paths the client meant."""
    (tmp_path / "models/clip/my-model").mkdir(parents=True)
    (tmp_path / "my.pt").touch()
    monkeypatch.chdir(tmp_path)
    folder = ClipRef.parse("./models/clip/my-model", model_dir="models", cache_dir="cache")
    checkpoint = ClipRef.parse("my.pt", name="ViT-B-32", model_dir="./models")
    monkeypatch.chdir("/")  # the worker's directory
    copies = pickle.loads(pickle.dumps((folder, checkpoint)))
    assert copies == (folder, checkpoint)
    assert copies[0].name == f"local-dir:{tmp_path}/models/clip/my-model"
    assert (copies[0].model_dir, copies[0].cache_dir) == (f"{tmp_path}/models", f"{tmp_path}/cache")
    assert (copies[1].pretrained, copies[1].model_dir) == (f"{tmp_path}/my.pt", f"{tmp_path}/models")
    # text that names no existing path keeps its architecture/tag (or as-given path) reading
    assert ClipRef("ViT-B-32", "nowhere/my.pt").pretrained == "nowhere/my.pt"


def test_custom_models_and_score_take_their_model_dirs_absolute_too(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dask_imgcurator as ic
    from dask_imgcurator.decode import PreprocessSpec
    from dask_imgcurator.stages.score import ScoreConfig

    monkeypatch.chdir(tmp_path)
    custom = ic.custom_model(lambda: None, PreprocessSpec(size=8), embed_dim=3, name="m")
    placed = dataclasses.replace(custom, model_dir="models", cache_dir="~/cache")  # as embed(model_dir=...) does
    assert (placed.model_dir, placed.cache_dir) == (f"{tmp_path}/models", os.path.expanduser("~/cache"))
    assert ScoreConfig((), "x", model_dir="models").model_dir == f"{tmp_path}/models"


def _fake_download(root, ref: ClipRef) -> None:
    """What a download leaves in ``root`` (files a version is taken of; their bytes do not matter here)."""
    folder = root / "clip" / ref.slug
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text("{}")
    (folder / "open_clip_model.safetensors").write_bytes(b"weights")
    for head in ("aesthetic", "nsfw"):
        (root / "heads" / head).mkdir(parents=True, exist_ok=True)
        (root / "heads" / head / f"{ref.head_family}.safetensors").write_bytes(b"head")


def test_a_run_that_downloads_its_weights_is_the_same_run_afterwards(tmp_path) -> None:
    """Weights in the download cache are the tag's by construction: a run that starts without them and
    downloads them is resumed by the same command (it was "a different run"). In ``model_dir``, the
    user's folder, weights saved over the old ones still make another run."""
    from dask.base import tokenize

    from dask_imgcurator.models.heads import head_spec
    from dask_imgcurator.stages.embed import EmbedConfig

    cache, model_dir = tmp_path / "cache", tmp_path / "models"
    ref = ClipRef.parse("ViT-L-14/openai", model_dir=str(model_dir), cache_dir=str(cache))

    def token() -> str:
        return tokenize(EmbedConfig(ref, heads=(head_spec("aesthetic"), head_spec("nsfw"))))

    before = token()
    _fake_download(cache, ref)
    assert token() == before
    _fake_download(model_dir, ref)
    in_model_dir = token()
    assert in_model_dir != before
    os.utime(model_dir / "clip" / ref.slug / "open_clip_model.safetensors", (1, 1))  # saved over
    assert token() != in_model_dir
